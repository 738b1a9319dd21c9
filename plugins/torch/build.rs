// Every crate that links libtorch needs the rpath and `--no-as-needed -ltorch` lines: tch's own
// build script sets the rpath for its own targets only, and without `--no-as-needed -ltorch`
// the linker drops libtorch_cuda, so CUDA is never found on a GPU machine. See ARCHITECTURE.md,
// "libtorch". This crate also compiles a small C++ shim for libtorch's InferenceMode,
// torch.jit.optimize_for_inference, torchvision's `nms` and `roi_align` operators and
// AOTInductor's package loader, the block-quantized matmul (`qblock.cpp`) and a CPU decode
// step's attention in one call (`decode_attention.cpp`). Where libtorch
// has its CUDA libraries and the CUDA headers are at hand (the PyPI wheels ship both), it also
// builds `libcresset_cuda_graph.so` from `cuda_graph.cpp`: CUDA graphs and the CUDA switches,
// loaded at run time only when a model is on a GPU (src/cuda_graph.rs).
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-changed=src/inference_mode.cpp");
    println!("cargo:rerun-if-changed=src/jit_optimize.cpp");
    println!("cargo:rerun-if-changed=src/torchvision_ops.cpp");
    println!("cargo:rerun-if-changed=src/aoti.cpp");
    println!("cargo:rerun-if-changed=src/qblock.cpp");
    println!("cargo:rerun-if-changed=src/decode_attention.cpp");
    println!("cargo:rerun-if-changed=src/mapped_tensor.cpp");
    println!("cargo:rerun-if-changed=src/cuda_graph.cpp");
    println!("cargo:rerun-if-changed=src/shim_error.h");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
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
        .file("src/decode_attention.cpp")
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
    let cuda_graph = build_cuda_graph_library(Path::new(&lib), &include).unwrap_or_else(|why| {
        println!("cargo:warning=no CUDA graph library: {why}");
        String::new()
    });
    println!("cargo:rustc-env=CRESSET_CUDA_GRAPH_LIB={cuda_graph}");
    let has_cuda = Path::new(&lib).join("libtorch_cuda.so").exists();
    println!(
        "cargo:rustc-env=CRESSET_LIBTORCH_HAS_CUDA={}",
        u8::from(has_cuda)
    );
}

/// The first `name` found under one of `dirs` (one level of subfolders searched too, for
/// the wheels' `nvidia/<package>/lib`).
fn find(dirs: &[PathBuf], name: &str) -> Option<PathBuf> {
    dirs.iter().find_map(|dir| {
        let direct = dir.join(name);
        if direct.exists() {
            return Some(direct);
        }
        std::fs::read_dir(dir)
            .ok()?
            .filter_map(Result::ok)
            .find_map(|e| {
                ["include", "lib", "lib64"]
                    .iter()
                    .map(|sub| e.path().join(sub).join(name))
                    .find(|p| p.exists())
            })
    })
}

/// Build `libcresset_cuda_graph.so` into OUT_DIR and return its path, or say why not.
fn build_cuda_graph_library(lib: &Path, include: &Path) -> Result<String, String> {
    for needed in ["libtorch_cuda.so", "libc10_cuda.so"] {
        if !lib.join(needed).exists() {
            return Err(format!("libtorch has no {needed} (a CPU-only build)"));
        }
    }
    // The wheels' CUDA packages sit beside torch, in site-packages/nvidia.
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Some(site) = lib.parent().and_then(Path::parent) {
        roots.push(site.join("nvidia"));
    }
    if let Ok(home) = std::env::var("CUDA_HOME") {
        roots.push(PathBuf::from(home));
    }
    roots.push(PathBuf::from("/usr/local/cuda"));
    let header = find(&roots, "cuda_runtime_api.h").ok_or("no cuda_runtime_api.h found")?;
    // Its crt/ headers come from another wheel (scripts/setup-venv.sh): build again once they
    // are there.
    println!(
        "cargo:rerun-if-changed={}",
        header
            .with_file_name("crt")
            .join("host_defines.h")
            .display()
    );
    let cudart = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
        .iter()
        .find_map(|name| find(&roots, name))
        .ok_or("no libcudart found")?;
    let parent = |p: &Path| p.parent().map(Path::to_path_buf).unwrap_or_default();
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?)
        .join("libcresset_cuda_graph.so");
    let compiler = cc::Build::new()
        .cpp(true)
        .try_get_compiler()
        .map_err(|e| e.to_string())?;
    let mut command = compiler.to_command();
    command
        .args([
            "-shared",
            "-fPIC",
            "-std=c++17",
            "-O2",
            "-D_GLIBCXX_USE_CXX11_ABI=1",
            "-w",
        ])
        .arg("-I")
        .arg(include.join("torch/csrc/api/include"))
        .arg("-I")
        .arg(include)
        .arg("-I")
        .arg(parent(&header))
        .arg("src/cuda_graph.cpp")
        .arg("-o")
        .arg(&out)
        .arg(format!("-L{}", lib.display()))
        .arg(format!("-L{}", parent(&cudart).display()))
        .args(["-ltorch_cuda", "-lc10_cuda", "-ltorch_cpu", "-lc10"])
        .arg(format!(
            "-l:{}",
            cudart.file_name().unwrap_or_default().to_string_lossy()
        ))
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg(format!("-Wl,-rpath,{}", parent(&cudart).display()));
    let output = command.output().map_err(|e| e.to_string())?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "compiling cuda_graph.cpp failed: {}",
            stderr.lines().take(20).collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok(out.display().to_string())
}
