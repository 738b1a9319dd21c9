//! A well-formed shared library with no abi_stable root module.

#[no_mangle]
pub extern "C" fn cresset_fixture_answer() -> u32 {
    42
}
