// Every crate that links libtorch needs the rpath and `--no-as-needed -ltorch` lines: tch's own
// build script sets the rpath for its own targets only, and without `--no-as-needed -ltorch`
// the linker drops libtorch_cuda, so CUDA is never found on a GPU machine. See ARCHITECTURE.md,
// "libtorch". This crate also compiles a small C++ shim for libtorch's InferenceMode,
// torch.jit.optimize_for_inference, torchvision's `nms` and `roi_align` operators and
// AOTInductor's package loader, and the block-quantized matmul (`qblock.cpp`).
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=src/inference_mode.cpp");
    println!("cargo:rerun-if-changed=src/jit_optimize.cpp");
    println!("cargo:rerun-if-changed=src/torchvision_ops.cpp");
    println!("cargo:rerun-if-changed=src/aoti.cpp");
    println!("cargo:rerun-if-changed=src/qblock.cpp");
    println!("cargo:rerun-if-changed=src/mapped_tensor.cpp");
    let lib =
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys exports DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    // The OpenMP runtime of the shim's `at::parallel_for` is libtorch's own (the copy next to
    // libtorch_cpu, which needs it anyway: `libgomp.so.1` in the wheels, `libgomp-<hash>.so.1`
    // in some libtorch builds): one thread pool, not two.
    let gomp = std::fs::read_dir(&lib)
        .expect("libtorch's lib dir is readable")
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("libgomp") && n.contains(".so"))
        .min_by_key(|n| n.len())
        .expect("libtorch ships its OpenMP runtime (libgomp) next to libtorch_cpu");
    println!("cargo:rustc-link-search=native={lib}");
    println!("cargo:rustc-link-lib=dylib:+verbatim={gomp}");
    let include = Path::new(&lib)
        .parent()
        .expect("libtorch's lib dir has a parent")
        .join("include");
    cc::Build::new()
        .cpp(true)
        .file("src/inference_mode.cpp")
        .file("src/jit_optimize.cpp")
        .file("src/torchvision_ops.cpp")
        .file("src/aoti.cpp")
        .file("src/qblock.cpp")
        .file("src/mapped_tensor.cpp")
        .include(include.join("torch/csrc/api/include"))
        .include(&include)
        .flag("-std=c++17")
        .flag("-O3")
        // `at::parallel_for` is inline OpenMP: without this it runs on one thread.
        .flag("-fopenmp")
        // torch 2.x wheels use the new libstdc++ ABI.
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .warnings(false)
        .compile("cresset_torch_inference_mode");
}
