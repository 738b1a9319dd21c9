//! ONNX models through ONNX Runtime (the `ort` crate), loaded at run time from the shared
//! library that the `onnxruntime` wheel on the package index ships (nothing is downloaded or
//! linked at build time). The library is `$CRESSET_ONNXRUNTIME` when set (a path to
//! `libonnxruntime.so.1.x.y`), else `libonnxruntime.so.1` as the dynamic loader finds it
//! (`LD_LIBRARY_PATH`, or next to the plugins in a distribution). `make` sets the variable to
//! the pinned wheel's library in the asset cache. It needs ONNX Runtime 1.31 or later.
//!
//! Tensors cross as tch tensors: inputs are copied into ONNX Runtime's values, outputs copied
//! out, in f32 or i64 (what vision models take and give).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{Tensor as OrtTensor, TensorElementType, ValueType};
use tch::{Kind, Tensor};

/// The environment variable naming the ONNX Runtime library.
pub const LIBRARY_VAR: &str = "CRESSET_ONNXRUNTIME";

/// The ONNX Runtime library this process loads.
pub fn library() -> PathBuf {
    std::env::var_os(LIBRARY_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("libonnxruntime.so.1"))
}

/// ONNX Runtime allows one environment per process: made once, on first use.
fn environment() -> Result<&'static Environment, String> {
    static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let lib = library();
        ort::init_from(&lib)
            .map_err(|e| {
                format!(
                    "ONNX Runtime cannot be loaded from {}: {e} (set {LIBRARY_VAR} to the \
                     libonnxruntime.so of the onnxruntime wheel, 1.31 or later)",
                    lib.display()
                )
            })?
            .with_name("cresset")
            .with_telemetry(false)
            .build()
            .map_err(|e| format!("ONNX Runtime: {e}"))
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// One input or output of a model: its name, element type and shape (-1 where dynamic).
#[derive(Debug, Clone)]
pub struct Port {
    pub name: String,
    /// `Kind::Float`, `Kind::Int64`, ...; `None` for types tch has no kind for.
    pub kind: Option<Kind>,
    pub shape: Vec<i64>,
}

fn port(outlet: &ort::value::Outlet) -> Port {
    let (kind, shape) = match outlet.dtype() {
        ValueType::Tensor { ty, shape, .. } => (kind_of(*ty), shape.to_vec()),
        _ => (None, Vec::new()),
    };
    Port {
        name: outlet.name().to_owned(),
        kind,
        shape,
    }
}

fn kind_of(ty: TensorElementType) -> Option<Kind> {
    Some(match ty {
        TensorElementType::Float32 => Kind::Float,
        TensorElementType::Float64 => Kind::Double,
        TensorElementType::Int64 => Kind::Int64,
        TensorElementType::Int32 => Kind::Int,
        TensorElementType::Uint8 => Kind::Uint8,
        TensorElementType::Bool => Kind::Bool,
        _ => return None,
    })
}

/// ONNX Runtime's copy of a flat tch tensor of `T`, shaped `shape`.
fn ort_value<T>(shape: Vec<i64>, flat: &Tensor) -> Result<ort::value::DynValue, String>
where
    T: ort::value::PrimitiveTensorElementType + tch::kind::Element + std::fmt::Debug + 'static,
    Vec<T>: for<'a> TryFrom<&'a Tensor, Error = tch::TchError>,
{
    let data = Vec::<T>::try_from(flat).map_err(|e| e.to_string())?;
    Ok(OrtTensor::from_array((shape, data))
        .map_err(|e| e.to_string())?
        .into_dyn())
}

/// An ONNX model in an ONNX Runtime session.
pub struct OnnxModel {
    session: Session,
    pub inputs: Vec<Port>,
    pub outputs: Vec<Port>,
}

fn open(env: &Environment, path: &Path, threads: usize) -> ort::Result<Session> {
    Session::builder(env)?
        .with_optimization_level(GraphOptimizationLevel::All)?
        .with_intra_threads(threads.max(1))?
        .commit_from_file(path)
}

impl OnnxModel {
    /// Load the model at `path`, running each call on `threads` threads.
    pub fn load(path: &Path, threads: usize) -> Result<Self, String> {
        let env = environment()?;
        let session = open(env, path, threads).map_err(|e| format!("ONNX Runtime: {e}"))?;
        let inputs = session.inputs().iter().map(port).collect();
        let outputs = session.outputs().iter().map(port).collect();
        Ok(Self {
            session,
            inputs,
            outputs,
        })
    }

    /// Run the model on its inputs in order: its outputs in order.
    pub fn run(&mut self, inputs: &[&Tensor]) -> Result<Vec<Tensor>, String> {
        if inputs.len() != self.inputs.len() {
            return Err(format!(
                "the model takes {} inputs, not {}",
                self.inputs.len(),
                inputs.len()
            ));
        }
        let mut values = Vec::with_capacity(inputs.len());
        for (tensor, port) in inputs.iter().zip(&self.inputs) {
            let shape = tensor.size();
            let flat = tensor
                .to_device(tch::Device::Cpu)
                .contiguous()
                .flatten(0, -1);
            let value = match port.kind {
                Some(Kind::Float) => ort_value::<f32>(shape, &flat.to_kind(Kind::Float))?,
                Some(Kind::Int64) => ort_value::<i64>(shape, &flat.to_kind(Kind::Int64))?,
                _ => {
                    return Err(format!(
                        "input `{}` has an element type this server does not feed ({:?})",
                        port.name, port.kind
                    ))
                }
            };
            values.push((port.name.clone(), value));
        }
        let outputs = self
            .session
            .run(values)
            .map_err(|e| format!("ONNX Runtime: {e}"))?;
        let mut out = Vec::with_capacity(outputs.len());
        for (_, value) in outputs.iter() {
            let tensor = if let Ok((shape, data)) = value.try_extract_tensor::<f32>() {
                Tensor::from_slice(data).view(&shape[..])
            } else if let Ok((shape, data)) = value.try_extract_tensor::<i64>() {
                Tensor::from_slice(data).view(&shape[..])
            } else {
                return Err("the model answered an output that is neither f32 nor i64".into());
            };
            out.push(tensor);
        }
        Ok(out)
    }
}
