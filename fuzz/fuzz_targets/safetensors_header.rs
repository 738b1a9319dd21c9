//! The safetensors header parser on an arbitrary file.
#![no_main]

use cresset_plan::safetensors;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let path = std::path::Path::new("fuzz.safetensors");
    let _ = safetensors::parse_header(path, data, data.len() as u64);
});
