//! AOTInductor packages (`.pt2` from `torch._inductor.aoti_compile_and_package`): a model that
//! `torch.compile`'s inductor compiled ahead of time into a shared library, run from Rust
//! through libtorch's package loader (`aoti.cpp`). This is how a compiled model is served
//! without Python.
//!
//! The library inside is native code built for the machine that compiled it (its CPU's vector
//! instructions, its platform). Before loading, the package's metadata is checked against this
//! machine, so a package built for another CPU is refused with a message instead of dying of
//! an illegal instruction. The compiled code trusts its inputs' dtypes and ranks: callers check
//! them (the loader makes them contiguous).

use std::ffi::{c_char, c_void, CStr, CString};
use std::path::Path;

use tch::Tensor;

extern "C" {
    fn cresset_aoti_load(path: *const c_char, runners: i64, error: *mut *mut c_char)
        -> *mut c_void;
    fn cresset_aoti_run(
        loader: *mut c_void,
        inputs: *const *mut torch_sys::C_tensor,
        n_inputs: i64,
        outputs: *mut *mut torch_sys::C_tensor,
        max_outputs: i64,
        error: *mut *mut c_char,
    ) -> i64;
    fn cresset_aoti_package_metadata(path: *const c_char, error: *mut *mut c_char) -> *mut c_char;
    fn cresset_aoti_free(loader: *mut c_void);
    fn cresset_free_c_string(s: *mut c_char);
}

/// The most outputs a model may answer.
const MAX_OUTPUTS: usize = 64;

/// A message the shim made with strdup (or `fallback` when there is none), freed here.
fn take_message(error: *mut c_char, fallback: &str) -> String {
    if error.is_null() {
        return fallback.to_owned();
    }
    // SAFETY: a NUL-terminated string the shim made with strdup, read and freed once here.
    let text = unsafe { CStr::from_ptr(error) }
        .to_string_lossy()
        .into_owned();
    unsafe { cresset_free_c_string(error) };
    text
}

/// A loaded package. Calls may come from several threads; with one runner they take turns.
pub struct Package {
    loader: *mut c_void,
    /// The package's metadata (`AOTI_DEVICE_KEY`, `AOTI_CPU_ISA`, ...).
    pub metadata: Vec<(String, String)>,
}

// SAFETY: the loader's `run` is thread-safe (its runners are guarded by the model container's
// own lock), and the pointer is freed once, on drop.
unsafe impl Send for Package {}
unsafe impl Sync for Package {}

impl Drop for Package {
    fn drop(&mut self) {
        // SAFETY: a loader made by cresset_aoti_load, freed once; this removes its directory.
        unsafe { cresset_aoti_free(self.loader) };
    }
}

fn c_path(path: &Path) -> Result<CString, String> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("{}: the path holds a NUL byte", path.display()))
}

/// The metadata of the package at `path`, read from the zip without loading anything.
pub fn package_metadata(path: &Path) -> Result<Vec<(String, String)>, String> {
    let c = c_path(path)?;
    let mut error: *mut c_char = std::ptr::null_mut();
    // SAFETY: `c` is a NUL-terminated path; the shim returns a malloc'd string or sets `error`.
    let lines = unsafe { cresset_aoti_package_metadata(c.as_ptr(), &mut error) };
    if lines.is_null() {
        return Err(take_message(error, "the package's metadata cannot be read"));
    }
    let text = take_message(lines, "");
    Ok(text
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// The `/proc/cpuinfo` flag of each name AOTInductor writes into `AOTI_CPU_ISA`.
fn cpu_flag(isa: &str) -> Option<&'static str> {
    Some(match isa {
        "AVX2" => "avx2",
        "AVX512" => "avx512f",
        "AVX512_VNNI" => "avx512_vnni",
        "AVX512_BF16" => "avx512_bf16",
        "AVX512_FP16" => "avx512_fp16",
        "AMX_TILE" => "amx_tile",
        "AMX_BF16" => "amx_bf16",
        "AMX_FP16" => "amx_fp16",
        _ => return None,
    })
}

/// Why this machine cannot run a package with this metadata, if it cannot.
pub fn incompatibility(metadata: &[(String, String)], cpu_flags: &[&str]) -> Option<String> {
    let get = |key: &str| {
        metadata
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.trim_matches('"').trim())
    };
    if let Some(device) = get("AOTI_DEVICE_KEY") {
        if device != "cpu" {
            return Some(format!(
                "the package was compiled for `{device}`; this build runs AOTInductor packages \
                 on the CPU"
            ));
        }
    }
    if let Some(platform) = get("AOTI_PLATFORM") {
        if platform != std::env::consts::OS {
            return Some(format!(
                "the package was compiled for {platform}, not {}",
                std::env::consts::OS
            ));
        }
    }
    if let Some(machine) = get("AOTI_MACHINE") {
        if machine != std::env::consts::ARCH {
            return Some(format!(
                "the package was compiled for {machine}, not {}",
                std::env::consts::ARCH
            ));
        }
    }
    let missing: Vec<&str> = get("AOTI_CPU_ISA")
        .unwrap_or_default()
        .split_whitespace()
        .filter(|isa| cpu_flag(isa).is_some_and(|flag| !cpu_flags.contains(&flag)))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "the package was compiled for a CPU with {} and this CPU lacks them: compile it \
             (torch._inductor.aoti_compile_and_package) on a machine like this one",
            missing.join(", ")
        )
    })
}

impl Package {
    /// Load the package at `path` with `runners` runners (calls that may run at once), after
    /// checking that it was compiled for a machine like this one.
    pub fn load(path: &Path, runners: usize) -> Result<Self, String> {
        let metadata = package_metadata(path)?;
        let flags = cresset_plan::cpu_flags();
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        if let Some(why) = incompatibility(&metadata, &flags) {
            return Err(why);
        }
        let c = c_path(path)?;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: `c` is a NUL-terminated path; the shim returns a new loader or sets `error`.
        let loader = unsafe { cresset_aoti_load(c.as_ptr(), runners as i64, &mut error) };
        if loader.is_null() {
            return Err(take_message(error, "the package cannot be loaded"));
        }
        Ok(Self { loader, metadata })
    }

    /// Run the model: its outputs, flattened as the package's call spec lists them.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        let ptrs: Vec<*mut torch_sys::C_tensor> =
            inputs.iter().map(|t| t.as_ptr().cast_mut()).collect();
        let mut outputs: Vec<*mut torch_sys::C_tensor> = vec![std::ptr::null_mut(); MAX_OUTPUTS];
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: `ptrs` are live tensors (borrowed for the call; the shim only reads them);
        // `outputs` has room for MAX_OUTPUTS pointers, which the shim fills with new tensors.
        let n = unsafe {
            cresset_aoti_run(
                self.loader,
                ptrs.as_ptr(),
                ptrs.len() as i64,
                outputs.as_mut_ptr(),
                MAX_OUTPUTS as i64,
                &mut error,
            )
        };
        if n < 0 {
            return Err(take_message(error, "the model failed"));
        }
        Ok(outputs[..n as usize]
            .iter()
            // SAFETY: each is a `new at::Tensor` the shim made for us; `Tensor` owns it now
            // and frees it as it frees tensors libtorch returns.
            .map(|&p| unsafe { Tensor::from_ptr(p) })
            .collect())
    }
}

/// What a package's first input must be, as its generated input check states it: the dtype
/// (`float32`, ...) and the static dimensions (index, size). Dynamic dimensions are absent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputSpec {
    pub dtype: String,
    pub dims: Vec<(usize, i64)>,
}

/// The largest wrapper source read for the input check.
const MAX_WRAPPER_SOURCE: u64 = 64 << 20;

/// The first input's spec, read from the C++ source that packages carry beside their library
/// (`*.wrapper.cpp`): its `check_input_0` names the dtype and every static size. The compiled
/// library checks these only when `AOTI_RUNTIME_CHECK_INPUTS` is set, and otherwise runs on
/// whatever it is given, so the caller checks them. `None` when the package has no source.
pub fn input_spec(path: &Path) -> Option<InputSpec> {
    use std::io::Read;
    let mut archive = zip::ZipArchive::new(std::fs::File::open(path).ok()?).ok()?;
    let name = archive
        .file_names()
        .find(|n| n.ends_with(".wrapper.cpp"))?
        .to_owned();
    let entry = archive.by_name(&name).ok()?;
    let mut source = String::new();
    entry
        .take(MAX_WRAPPER_SOURCE)
        .read_to_string(&mut source)
        .ok()?;
    parse_input_check(&source)
}

fn parse_input_check(source: &str) -> Option<InputSpec> {
    let start = source.find("static void check_input_0(")?;
    let body = &source[start..];
    let body = &body[..body.find("\nstatic void ").unwrap_or(body.len())];
    let dtype = body
        .split("_expected_dtype = aoti_torch_dtype_")
        .nth(1)?
        .split('(')
        .next()?
        .to_owned();
    // `if (224 != arg122_1_size[2]) {`
    let mut dims = Vec::new();
    for line in body.lines() {
        let Some(rest) = line.trim().strip_prefix("if (") else {
            continue;
        };
        let Some((value, rest)) = rest.split_once(" != ") else {
            continue;
        };
        let Some((_, index)) = rest.split_once("_size[") else {
            continue;
        };
        let (Ok(value), Some(Ok(index))) = (
            value.parse::<i64>(),
            index.split(']').next().map(str::parse::<usize>),
        ) else {
            continue;
        };
        dims.push((index, value));
    }
    Some(InputSpec { dtype, dims })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_check_of_a_package_is_read_from_its_source() {
        let source = r#"
static void check_input_0(
    AtenTensorHandle* input_handles
) {
    int32_t arg122_1_expected_dtype = aoti_torch_dtype_float32();
    if (arg122_1_size[0] < 2) {
    }
    if (3 != arg122_1_size[1]) {
    }
    if (224 != arg122_1_size[2]) {
    }
    if (224 != arg122_1_size[3]) {
    }
    if (150528 != arg122_1_stride[0]) {
    }
}
static void check_input_1(
    if (7 != arg1_size[0]) {
"#;
        assert_eq!(
            parse_input_check(source),
            Some(InputSpec {
                dtype: "float32".into(),
                dims: vec![(1, 3), (2, 224), (3, 224)],
            })
        );
        assert_eq!(parse_input_check("no check here"), None);
    }

    fn meta(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn packages_for_other_machines_are_refused_before_loading() {
        let ours = meta(&[
            ("AOTI_DEVICE_KEY", "cpu"),
            ("AOTI_PLATFORM", std::env::consts::OS),
            ("AOTI_MACHINE", std::env::consts::ARCH),
            ("AOTI_CPU_ISA", "\"AVX512 AVX512_VNNI AMX_TILE\""),
        ]);
        assert_eq!(
            incompatibility(&ours, &["avx2", "avx512f", "avx512_vnni", "amx_tile"]),
            None
        );
        let why = incompatibility(&ours, &["avx2", "avx512f"]).expect("refused");
        assert!(why.contains("AVX512_VNNI, AMX_TILE"), "{why}");
        let cuda = meta(&[("AOTI_DEVICE_KEY", "cuda")]);
        assert!(incompatibility(&cuda, &[])
            .expect("refused")
            .contains("`cuda`"));
        let arm = meta(&[("AOTI_MACHINE", "aarch64_not_this")]);
        assert!(incompatibility(&arm, &[]).is_some());
    }
}
