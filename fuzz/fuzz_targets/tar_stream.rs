//! The tar reader on arbitrary (already decompressed) bytes: every entry and all its data.
#![no_main]

use cresset::archive::tar::TarReader;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut reader = TarReader::new(data, cresset::archive::EXTENSION_LIMIT);
    let mut buf = [0u8; 4096];
    while let Ok(Some(_entry)) = reader.next_entry() {
        while let Ok(n) = reader.read_data(&mut buf) {
            if n == 0 {
                break;
            }
        }
    }
});
