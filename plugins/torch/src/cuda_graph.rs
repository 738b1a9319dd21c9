//! CUDA graphs, and the CUDA switches `tch` has no call for (TF32, the attention kernels, the
//! device's compute capability), through `libcresset_cuda_graph.so` (`cuda_graph.cpp`). The
//! library links libtorch's CUDA parts, so it is loaded at run time, the first time a model on
//! a GPU asks for it, and never on the CPU: a build or a distribution without it serves as
//! before, eagerly, and says why once in the log.
//!
//! Where it is looked for: `CRESSET_CUDA_GRAPH_LIB` if set, else the path this crate was built
//! with, else `libcresset_cuda_graph.so` beside the running program.

use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::OnceLock;

type ErrorOut = *mut *mut c_char;

/// The library's entry points.
struct Library {
    capability: unsafe extern "C" fn(c_int, ErrorOut) -> c_int,
    allow_tf32: unsafe extern "C" fn(c_int),
    sdp_backends: unsafe extern "C" fn(c_int, c_int, c_int, c_int),
    begin: unsafe extern "C" fn(c_int, ErrorOut) -> *mut c_void,
    end: unsafe extern "C" fn(*mut c_void, ErrorOut) -> c_int,
    replay: unsafe extern "C" fn(*mut c_void, ErrorOut) -> c_int,
    free: unsafe extern "C" fn(*mut c_void),
    free_string: unsafe extern "C" fn(*mut c_char),
    /// Keeps the functions above loaded.
    _lib: libloading::Library,
}

/// The library, loaded once, or why it cannot be.
fn library() -> Result<&'static Library, String> {
    static LIBRARY: OnceLock<Result<Library, String>> = OnceLock::new();
    LIBRARY.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Library, String> {
    let mut candidates: Vec<std::path::PathBuf> = Vec::new();
    if let Some(path) = std::env::var_os("CRESSET_CUDA_GRAPH_LIB") {
        candidates.push(path.into());
    }
    let built = env!("CRESSET_CUDA_GRAPH_LIB");
    if !built.is_empty() {
        candidates.push(built.into());
    }
    if let Some(dir) = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|p| p.to_path_buf()))
    {
        candidates.push(dir.join("libcresset_cuda_graph.so"));
    }
    let path = candidates
        .iter()
        .find(|p| p.exists())
        .ok_or_else(|| format!("libcresset_cuda_graph.so not found (looked at {candidates:?})"))?;
    // SAFETY: our own library, whose initialisers only register nothing; the symbols below
    // are the extern "C" functions of cuda_graph.cpp with these signatures.
    unsafe {
        let lib = libloading::Library::new(path)
            .map_err(|e| format!("loading {}: {e}", path.display()))?;
        macro_rules! symbol {
            ($name:literal) => {
                *lib.get($name)
                    .map_err(|e| format!("{}: {e}", path.display()))?
            };
        }
        Ok(Library {
            capability: symbol!(b"cresset_cuda_capability\0"),
            allow_tf32: symbol!(b"cresset_cuda_allow_tf32\0"),
            sdp_backends: symbol!(b"cresset_cuda_sdp_backends\0"),
            begin: symbol!(b"cresset_cuda_graph_begin\0"),
            end: symbol!(b"cresset_cuda_graph_end\0"),
            replay: symbol!(b"cresset_cuda_graph_replay\0"),
            free: symbol!(b"cresset_cuda_graph_free\0"),
            free_string: symbol!(b"cresset_cuda_free_c_string\0"),
            _lib: lib,
        })
    }
}

impl Library {
    /// The message the library made (or `fallback`), freed here.
    fn message(&self, error: *mut c_char, fallback: &str) -> String {
        if error.is_null() {
            return fallback.to_owned();
        }
        // SAFETY: a NUL-terminated string the library made with strdup, read and freed once.
        let text = unsafe { CStr::from_ptr(error) }
            .to_string_lossy()
            .into_owned();
        unsafe { (self.free_string)(error) };
        text
    }
}

/// The compute capability of CUDA device `index` (major × 10 + minor: 90 for an H100).
pub fn capability(index: usize) -> Result<u32, String> {
    let lib = library()?;
    let mut error = std::ptr::null_mut();
    // SAFETY: a plain call; the error, if any, is taken over by `message`.
    let value = unsafe { (lib.capability)(index as c_int, &mut error) };
    match u32::try_from(value) {
        Ok(v) => Ok(v),
        Err(_) => Err(lib.message(error, "no capability")),
    }
}

/// Let f32 matmuls and convolutions on the GPU use TF32 (process-wide, as
/// `torch.backends.cuda.matmul.allow_tf32` is).
pub fn allow_tf32(on: bool) -> Result<(), String> {
    let lib = library()?;
    // SAFETY: sets two flags of libtorch's global context.
    unsafe { (lib.allow_tf32)(c_int::from(on)) };
    Ok(())
}

/// Which scaled-dot-product attention kernels libtorch may pick on the GPU (process-wide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SdpBackends {
    /// FlashAttention (no arbitrary masks: not for bucketed reads).
    pub flash: bool,
    /// Memory-efficient attention (masks allowed).
    pub efficient: bool,
    /// The reference composition of matmuls and softmax.
    pub math: bool,
    /// cuDNN's attention.
    pub cudnn: bool,
}

/// Allow only `backends`.
pub fn set_sdp_backends(backends: SdpBackends) -> Result<(), String> {
    let lib = library()?;
    let flag = |b: bool| c_int::from(b);
    // SAFETY: sets four flags of libtorch's global context.
    unsafe {
        (lib.sdp_backends)(
            flag(backends.flash),
            flag(backends.efficient),
            flag(backends.math),
            flag(backends.cudnn),
        )
    };
    Ok(())
}

/// A captured CUDA graph: the kernels of one call of a closure, replayed on the same memory.
pub struct CudaGraph {
    handle: *mut c_void,
    lib: &'static Library,
}

// SAFETY: a graph is replayed by whoever holds it (`&mut self`), and freed once on drop.
unsafe impl Send for CudaGraph {}

impl Drop for CudaGraph {
    fn drop(&mut self) {
        // SAFETY: a graph made by begin, freed once.
        unsafe { (self.lib.free)(self.handle) };
    }
}

impl CudaGraph {
    /// Capture what `body` runs on CUDA device `index` (on a side stream made current for this
    /// thread); `body`'s result (its output tensors, which replays overwrite in place) comes
    /// back with the graph. A body that fails, or runs something a capture cannot hold (a
    /// copy to the host, a synchronisation), gives an error, and no graph.
    pub fn capture<T>(
        index: usize,
        body: impl FnOnce() -> Result<T, String>,
    ) -> Result<(Self, T), String> {
        let lib = library()?;
        let mut error = std::ptr::null_mut();
        // SAFETY: begins a capture on this thread; ended below on every path.
        let handle = unsafe { (lib.begin)(index as c_int, &mut error) };
        if handle.is_null() {
            return Err(lib.message(error, "the capture did not begin"));
        }
        let graph = Self { handle, lib };
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
        let mut error = std::ptr::null_mut();
        // SAFETY: ends the capture begun above (also after a failed body: the stream must
        // leave capture mode) and restores the thread's stream.
        let ended = unsafe { (lib.end)(graph.handle, &mut error) };
        let ended = match ended {
            0 => Ok(()),
            _ => Err(lib.message(error, "the capture did not end")),
        };
        let output = match result {
            Ok(output) => output?,
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                return Err(format!("the captured pass failed: {what}"));
            }
        };
        ended?;
        Ok((graph, output))
    }

    /// Run the captured kernels again, on this thread's current stream.
    pub fn replay(&mut self) -> Result<(), String> {
        let mut error = std::ptr::null_mut();
        // SAFETY: a captured graph; its memory is alive as long as `self`.
        match unsafe { (self.lib.replay)(self.handle, &mut error) } {
            0 => Ok(()),
            _ => Err(self.lib.message(error, "the replay failed")),
        }
    }
}

#[cfg(test)]
mod tests {
    /// The build made the library where libtorch has CUDA (the wheels this project pins do),
    /// and it loads and answers without a GPU (capability then fails with a clear error).
    #[test]
    fn the_library_is_built_and_loads_without_a_gpu() {
        if env!("CRESSET_LIBTORCH_HAS_CUDA") == "0" {
            eprintln!("libtorch without CUDA: no CUDA graph library to build");
            return;
        }
        assert!(
            !env!("CRESSET_CUDA_GRAPH_LIB").is_empty(),
            "libtorch has CUDA but the build made no CUDA graph library (see the build warnings)"
        );
        super::library().expect("libcresset_cuda_graph.so loads");
        if !tch::Cuda::is_available() {
            assert!(super::capability(0).is_err());
        }
    }
}
