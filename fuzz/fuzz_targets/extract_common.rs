//! What the archive targets share: extract the input into a fresh folder, with small caps, and
//! check that nothing was written outside it.

use cresset::archive::{extract, ArchiveFormat, ExtractLimits};

pub fn extract_and_check(data: &[u8], format: ArchiveFormat, file_name: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join(file_name);
    std::fs::write(&file, data).expect("write input");
    let dest = dir.path().join("out");
    std::fs::create_dir(&dest).expect("mkdir");
    let limits = ExtractLimits {
        max_entries: 64,
        max_unpacked_bytes: 8 << 20,
        max_ratio: 100,
        ratio_floor_bytes: 1 << 20,
    };
    let _ = extract(&file, format, &dest, &limits);
    for entry in std::fs::read_dir(dir.path()).expect("read dir") {
        let name = entry.expect("entry").file_name();
        assert!(name == file_name || name == "out", "{name:?} escaped");
    }
}
