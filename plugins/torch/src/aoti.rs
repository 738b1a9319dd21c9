//! AOTInductor packages (`.pt2` from `torch._inductor.aoti_compile_and_package`): a model that
//! `torch.compile`'s inductor compiled ahead of time into a shared library, run from Rust
//! through libtorch's package loader (`aoti.cpp`). This is how a compiled model is served
//! without Python.
//!
//! The library inside is native code built for the machine that compiled it (its CPU's vector
//! instructions, its platform). Before loading, the package's metadata is checked against this
//! machine, so a package built for another CPU is refused with a message instead of dying of
//! an illegal instruction. The compiled code trusts its inputs' dtypes and sizes: [`Package::run`]
//! checks them against the input checks in the package's source first (and the loader makes
//! them contiguous).

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
    /// What its inputs must be (from its source; `None` for a package without one).
    pub inputs: Option<Vec<InputSpec>>,
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
        // Packages of torchvision's detectors call its `nms` through the dispatcher, whose
        // schema must exist when the package is loaded.
        crate::torchscript::register_torchvision_ops();
        let c = c_path(path)?;
        let mut error: *mut c_char = std::ptr::null_mut();
        // SAFETY: `c` is a NUL-terminated path; the shim returns a new loader or sets `error`.
        let loader = unsafe { cresset_aoti_load(c.as_ptr(), runners as i64, &mut error) };
        if loader.is_null() {
            return Err(take_message(error, "the package cannot be loaded"));
        }
        Ok(Self {
            loader,
            metadata,
            inputs: input_specs(path),
        })
    }

    /// Run the model: its outputs, flattened as the package's call spec lists them. Inputs
    /// that are not what the package's input checks state are refused before the compiled
    /// code sees them.
    pub fn run(&self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        if let Some(specs) = &self.inputs {
            if specs.len() != inputs.len() {
                return Err(format!(
                    "the package takes {} inputs, not {}",
                    specs.len(),
                    inputs.len()
                ));
            }
            for (i, (spec, t)) in specs.iter().zip(inputs).enumerate() {
                if let Some(why) = spec.refusal(t) {
                    return Err(format!("input {i} ({:?}): {why}", t.size()));
                }
            }
        }
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

/// What one input of a package must be, as its generated input check states it: the dtype
/// (`float32`, `int64`, ...), the static sizes (dimension, size) and the bounds of the dynamic
/// ones (dimension, bound). The rank is at least one more than the highest dimension named.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct InputSpec {
    pub dtype: String,
    pub dims: Vec<(usize, i64)>,
    pub min: Vec<(usize, i64)>,
    pub max: Vec<(usize, i64)>,
}

impl InputSpec {
    /// The fewest dimensions an input may have: one more than the highest the check names.
    pub fn min_rank(&self) -> usize {
        self.dims
            .iter()
            .chain(&self.min)
            .chain(&self.max)
            .map(|&(i, _)| i + 1)
            .max()
            .unwrap_or(0)
    }

    /// Why `tensor` is not an input this spec takes, if it is not. Lower bounds of 2 are
    /// taken as 1: `torch.export` raises a dynamic dimension declared from 1 to 2 (its 0/1
    /// specialization) while the compiled code runs a size of 1 alike (callers that depend on
    /// it check it at load, as the vision plugin does its batch).
    pub fn refusal(&self, tensor: &Tensor) -> Option<String> {
        let dtype = dtype_name(tensor.kind());
        if dtype != self.dtype {
            return Some(format!("it is {dtype}; the package takes {}", self.dtype));
        }
        let size = tensor.size();
        if size.len() < self.min_rank() {
            return Some(format!(
                "it has {} dimensions; the package takes {}",
                size.len(),
                self.min_rank()
            ));
        }
        for &(i, n) in &self.dims {
            if size[i] != n {
                return Some(format!(
                    "dimension {i} is {}; the package takes {n}",
                    size[i]
                ));
            }
        }
        for &(i, n) in &self.min {
            let floor = if n == 2 { 1 } else { n };
            if size[i] < floor {
                return Some(format!(
                    "dimension {i} is {}; the package takes at least {floor}",
                    size[i]
                ));
            }
        }
        for &(i, n) in &self.max {
            if size[i] > n {
                return Some(format!(
                    "dimension {i} is {}; the package takes at most {n}",
                    size[i]
                ));
            }
        }
        None
    }
}

/// The name AOTInductor's checks give a dtype (`aoti_torch_dtype_<name>`).
fn dtype_name(kind: tch::Kind) -> &'static str {
    use tch::Kind::*;
    match kind {
        Float => "float32",
        Double => "float64",
        Half => "float16",
        BFloat16 => "bfloat16",
        Int64 => "int64",
        Int => "int32",
        Int16 => "int16",
        Int8 => "int8",
        Uint8 => "uint8",
        Bool => "bool",
        _ => "another dtype",
    }
}

/// The largest wrapper source read for the input checks.
const MAX_WRAPPER_SOURCE: u64 = 64 << 20;

/// The inputs' specs, read from the C++ source that packages carry beside their library
/// (`*.wrapper.cpp`): its `check_input_N` functions name each input's dtype and its sizes.
/// The compiled library checks these only when `AOTI_RUNTIME_CHECK_INPUTS` is set, and
/// otherwise runs on whatever it is given (reading out of bounds where a size is wrong), so
/// [`Package::run`] checks them. `None` when the package has no source.
pub fn input_specs(path: &Path) -> Option<Vec<InputSpec>> {
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
    parse_input_checks(&source)
}

/// The first input's spec ([`input_specs`]).
pub fn input_spec(path: &Path) -> Option<InputSpec> {
    input_specs(path)?.into_iter().next()
}

fn parse_input_checks(source: &str) -> Option<Vec<InputSpec>> {
    let mut specs = Vec::new();
    while let Some(spec) = parse_input_check(source, specs.len()) {
        specs.push(spec);
    }
    (!specs.is_empty()).then_some(specs)
}

fn parse_input_check(source: &str, n: usize) -> Option<InputSpec> {
    let start = source.find(&format!("static void check_input_{n}("))?;
    let body = &source[start..];
    // The function ends where the next top-level definition starts.
    let body = &body[..body[1..].find("\nstatic ").map_or(body.len(), |e| e + 1)];
    let dtype = body
        .split("_expected_dtype = aoti_torch_dtype_")
        .nth(1)?
        .split('(')
        .next()?
        .to_owned();
    let mut spec = InputSpec {
        dtype,
        ..InputSpec::default()
    };
    // `if (224 != arg122_1_size[2]) {`, `if (arg1_size[1] < 32) {`, `if (arg1_size[1] > 4096) {`
    let index = |text: &str| -> Option<usize> {
        text.split_once("_size[")?.1.split(']').next()?.parse().ok()
    };
    for line in body.lines() {
        let Some(cond) = line
            .trim()
            .strip_prefix("if (")
            .and_then(|r| r.strip_suffix(") {"))
        else {
            continue;
        };
        if let Some((value, dim)) = cond.split_once(" != ") {
            if let (Ok(value), Some(i)) = (value.parse::<i64>(), index(dim)) {
                spec.dims.push((i, value));
            }
        } else if let Some((dim, value)) = cond.split_once(" < ") {
            if let (Some(i), Ok(value)) = (index(dim), value.parse::<i64>()) {
                spec.min.push((i, value));
            }
        } else if let Some((dim, value)) = cond.split_once(" > ") {
            if let (Some(i), Ok(value)) = (index(dim), value.parse::<i64>()) {
                spec.max.push((i, value));
            }
        }
    }
    Some(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_input_checks_of_a_package_are_read_from_its_source() {
        let source = r#"
static void check_input_0(
    AtenTensorHandle* input_handles
) {
    int32_t arg122_1_expected_dtype = aoti_torch_dtype_float32();
    if (arg122_1_size[0] < 2) {
    }
    if (arg122_1_size[0] > 15) {
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
    AtenTensorHandle* input_handles
) {
    int32_t arg1_expected_dtype = aoti_torch_dtype_int64();
    if (arg1_size[0] > 4096) {
    }
}
static bool _check_aoti_runtime_check_inputs_env() {
"#;
        let specs = parse_input_checks(source).expect("specs");
        assert_eq!(
            specs,
            vec![
                InputSpec {
                    dtype: "float32".into(),
                    dims: vec![(1, 3), (2, 224), (3, 224)],
                    min: vec![(0, 2)],
                    max: vec![(0, 15)],
                },
                InputSpec {
                    dtype: "int64".into(),
                    max: vec![(0, 4096)],
                    ..InputSpec::default()
                },
            ]
        );
        assert_eq!(parse_input_checks("no check here"), None);
        // What each refuses, and why.
        let image = &specs[0];
        assert_eq!(image.min_rank(), 4);
        let ok = Tensor::zeros([1, 3, 224, 224], (tch::Kind::Float, tch::Device::Cpu));
        assert_eq!(image.refusal(&ok), None, "a batch of 1 passes a floor of 2");
        for (t, says) in [
            (
                Tensor::zeros([1, 3, 224, 224], (tch::Kind::Double, tch::Device::Cpu)),
                "it is float64",
            ),
            (
                Tensor::zeros([3, 224, 224], (tch::Kind::Float, tch::Device::Cpu)),
                "3 dimensions",
            ),
            (
                Tensor::zeros([1, 3, 200, 224], (tch::Kind::Float, tch::Device::Cpu)),
                "dimension 2 is 200; the package takes 224",
            ),
            (
                Tensor::zeros([16, 3, 224, 224], (tch::Kind::Float, tch::Device::Cpu)),
                "at most 15",
            ),
            (
                Tensor::zeros([0, 3, 224, 224], (tch::Kind::Float, tch::Device::Cpu)),
                "at least 1",
            ),
        ] {
            let why = image.refusal(&t).expect(says);
            assert!(why.contains(says), "{why}");
        }
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
