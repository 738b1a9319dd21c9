//! The plugin links the libpython of the Python that builds it (the venv's base interpreter):
//! record its folder as the run path, so the plugin finds it without `LD_LIBRARY_PATH`.

fn main() {
    let config = pyo3_build_config::get();
    if let Some(dir) = config.lib_dir() {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
