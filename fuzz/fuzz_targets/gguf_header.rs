//! The GGUF header parser on an arbitrary file, then every metadata array decoded.
#![no_main]

use cresset_plan::gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.gguf");
    if let Ok(header) = gguf::parse(path, data) {
        for value in header.metadata.values() {
            if let Some(array) = value.as_array() {
                for v in array.values(data).take(1 << 16) {
                    // The parse walked these bytes: decoding them again must succeed.
                    assert!(v.is_ok(), "{v:?}");
                }
            }
        }
    }
});
