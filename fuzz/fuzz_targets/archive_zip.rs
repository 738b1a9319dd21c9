//! Extracting an arbitrary `.zip`.
#![no_main]

#[path = "extract_common.rs"]
mod extract_common;

use cresset::archive::ArchiveFormat;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    extract_common::extract_and_check(data, ArchiveFormat::Zip, "input.zip");
});
