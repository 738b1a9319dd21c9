// Every crate that links libtorch needs these lines: tch's own build script sets the rpath for
// its own targets only, and without `--no-as-needed -ltorch` the linker drops libtorch_cuda,
// so CUDA is never found on a GPU machine. See ARCHITECTURE.md, "libtorch".
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
}
