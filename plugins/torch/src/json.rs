//! Tensors to and from JSON.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::TorchError;

fn invalid(message: String) -> TorchError {
    TorchError::InvalidInput(message)
}

/// Parse a nested list of numbers (`[[1, 2], [3, 4]]`) into an f32 tensor. Every row at a
/// level must have the same length.
pub fn tensor_from_nested(field: &str, value: &Value) -> Result<Tensor, TorchError> {
    let mut shape = Vec::new();
    let mut probe = value;
    while let Value::Array(items) = probe {
        shape.push(items.len() as i64);
        match items.first() {
            Some(first) => probe = first,
            None => break,
        }
    }
    if shape.is_empty() {
        return Err(invalid(format!(
            "`{field}` must be a (nested) list of numbers. Given: {}",
            json_type(value)
        )));
    }
    // No reservation from the claimed shape: it is read from first elements only, and a small
    // hostile body can claim terabytes. The values pushed are bounded by the body itself.
    let mut flat = Vec::new();
    flatten(field, value, &shape, 0, &mut flat)?;
    Ok(Tensor::from_slice(&flat).reshape(&shape))
}

pub use cresset_plugin_api::sdk::settings::json_type;

fn flatten(
    field: &str,
    value: &Value,
    shape: &[i64],
    depth: usize,
    out: &mut Vec<f32>,
) -> Result<(), TorchError> {
    match (value, shape.get(depth)) {
        (Value::Array(items), Some(&len)) => {
            if items.len() as i64 != len {
                return Err(invalid(format!(
                    "`{field}` must be rectangular: a list at depth {depth} has {} items where {len} were expected",
                    items.len()
                )));
            }
            items
                .iter()
                .try_for_each(|item| flatten(field, item, shape, depth + 1, out))
        }
        (Value::Number(n), None) => {
            out.push(n.as_f64().unwrap_or(f64::NAN) as f32);
            Ok(())
        }
        (other, _) => Err(invalid(format!(
            "`{field}` must be a rectangular nested list of numbers; found {} at depth {depth}",
            json_type(other)
        ))),
    }
}

/// A KServe v2 input tensor.
#[derive(Debug, Clone, Deserialize)]
pub struct V2Input {
    /// The input's name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// `FP32`, `FP64`, `INT64`, `INT32`, `INT16`, `INT8`, `UINT8` or `BOOL`.
    pub datatype: String,
    /// The values, flat or nested, in row-major order.
    pub data: Value,
}

/// A KServe v2 output tensor.
#[derive(Debug, Clone, Serialize)]
pub struct V2Output {
    /// The output's name.
    pub name: String,
    /// Its shape.
    pub shape: Vec<i64>,
    /// Its datatype.
    pub datatype: &'static str,
    /// The values, flat, row-major.
    pub data: Vec<Value>,
}

fn collect_flat(value: &Value, out: &mut Vec<Value>) {
    match value {
        Value::Array(items) => items.iter().for_each(|i| collect_flat(i, out)),
        other => out.push(other.clone()),
    }
}

/// Build a tensor from a KServe v2 input.
pub fn tensor_from_v2(input: &V2Input, position: usize) -> Result<Tensor, TorchError> {
    let field = format!("inputs[{position}]");
    if input.shape.iter().any(|&d| d < 0) {
        return Err(invalid(format!(
            "`{field}.shape` must not have negative sizes. Given: {:?}",
            input.shape
        )));
    }
    let expected = input
        .shape
        .iter()
        .try_fold(1i64, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| {
            invalid(format!(
                "`{field}.shape` is too large. Given: {:?}",
                input.shape
            ))
        })?;
    let mut flat = Vec::new();
    collect_flat(&input.data, &mut flat);
    if flat.len() as i64 != expected {
        return Err(invalid(format!(
            "`{field}.data` must hold {expected} values for shape {:?}. Given: {}",
            input.shape,
            flat.len()
        )));
    }
    let number = |v: &Value| -> Result<f64, TorchError> {
        v.as_f64().ok_or_else(|| {
            invalid(format!(
                "`{field}.data` must hold numbers for datatype {}; found {}",
                input.datatype,
                json_type(v)
            ))
        })
    };
    let integer = |v: &Value| -> Result<i64, TorchError> {
        v.as_i64().ok_or_else(|| {
            invalid(format!(
                "`{field}.data` must hold integers for datatype {}; found {v}",
                input.datatype
            ))
        })
    };
    let tensor = match input.datatype.as_str() {
        "FP32" | "FP16" | "BF16" => {
            let t = Tensor::from_slice(&flat.iter().map(|v| number(v).map(|x| x as f32)).collect::<Result<Vec<_>, _>>()?);
            match input.datatype.as_str() {
                "FP16" => t.to_kind(Kind::Half),
                "BF16" => t.to_kind(Kind::BFloat16),
                _ => t,
            }
        }
        "FP64" => Tensor::from_slice(&flat.iter().map(number).collect::<Result<Vec<_>, _>>()?),
        "INT64" | "INT32" | "INT16" | "INT8" | "UINT8" => {
            let t = Tensor::from_slice(&flat.iter().map(integer).collect::<Result<Vec<_>, _>>()?);
            match input.datatype.as_str() {
                "INT32" => t.to_kind(Kind::Int),
                "INT16" => t.to_kind(Kind::Int16),
                "INT8" => t.to_kind(Kind::Int8),
                "UINT8" => t.to_kind(Kind::Uint8),
                _ => t,
            }
        }
        "BOOL" => {
            let values = flat
                .iter()
                .map(|v| v.as_bool().ok_or_else(|| invalid(format!("`{field}.data` must hold booleans for datatype BOOL; found {v}"))))
                .collect::<Result<Vec<_>, _>>()?;
            Tensor::from_slice(&values)
        }
        other => {
            return Err(invalid(format!(
                "`{field}.datatype` must be one of FP32, FP16, BF16, FP64, INT64, INT32, INT16, INT8, UINT8, BOOL. Given: {other:?}"
            )))
        }
    };
    Ok(tensor.reshape(&input.shape))
}

fn datatype_of(kind: Kind) -> &'static str {
    match kind {
        Kind::Double => "FP64",
        Kind::Half => "FP16",
        Kind::BFloat16 => "BF16",
        Kind::Int64 => "INT64",
        Kind::Int => "INT32",
        Kind::Int16 => "INT16",
        Kind::Int8 => "INT8",
        Kind::Uint8 => "UINT8",
        Kind::Bool => "BOOL",
        _ => "FP32",
    }
}

fn flat_values(t: &Tensor) -> Result<Vec<Value>, TorchError> {
    let t = t.to_device(Device::Cpu).contiguous().flatten(0, -1);
    Ok(match t.kind() {
        Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8 => {
            Vec::<i64>::try_from(&t.to_kind(Kind::Int64))?
                .into_iter()
                .map(Value::from)
                .collect()
        }
        Kind::Bool => Vec::<bool>::try_from(&t)?
            .into_iter()
            .map(Value::from)
            .collect(),
        Kind::Double => Vec::<f64>::try_from(&t)?
            .into_iter()
            .map(Value::from)
            .collect(),
        _ => Vec::<f32>::try_from(&t.to_kind(Kind::Float))?
            .into_iter()
            .map(|x| Value::from(f64::from(x)))
            .collect(),
    })
}

/// A tensor as a nested JSON list.
pub fn tensor_to_nested(t: &Tensor) -> Result<Value, TorchError> {
    let shape = t.size();
    let flat = flat_values(t)?;
    if shape.is_empty() {
        return Ok(flat.into_iter().next().unwrap_or(Value::Null));
    }
    fn build(flat: &mut std::vec::IntoIter<Value>, shape: &[i64]) -> Value {
        match shape {
            [last] => Value::Array(flat.take(*last as usize).collect()),
            [first, rest @ ..] => Value::Array((0..*first).map(|_| build(flat, rest)).collect()),
            [] => Value::Null,
        }
    }
    Ok(build(&mut flat.into_iter(), &shape))
}

/// A tensor as a KServe v2 output.
pub fn tensor_to_v2(name: &str, t: &Tensor) -> Result<V2Output, TorchError> {
    Ok(V2Output {
        name: name.to_owned(),
        shape: t.size(),
        datatype: datatype_of(t.kind()),
        data: flat_values(t)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn nested_lists_round_trip_through_tensors() {
        let value = json!([[1.0, 2.5], [3.0, -4.0]]);
        let t = tensor_from_nested("data", &value).expect("parses");
        assert_eq!(t.size(), vec![2, 2]);
        assert_eq!(tensor_to_nested(&t).expect("converts"), value);
    }

    #[test]
    fn ragged_lists_are_refused_with_the_field_name() {
        let err = tensor_from_nested("data", &json!([[1, 2], [3]]))
            .expect_err("ragged")
            .to_string();
        assert!(err.contains("`data` must be rectangular"), "{err}");
        let err = tensor_from_nested("data", &json!("x"))
            .expect_err("not a list")
            .to_string();
        assert!(err.contains("a string"), "{err}");
    }

    #[test]
    fn a_small_body_claiming_a_huge_shape_is_refused_without_allocating_it() {
        // The first-element chain claims 10^4 x 10^4 x 10^4 values; the body holds ~2 x 10^4.
        let row: Vec<Value> = (0..10_000).map(|_| json!(0)).collect();
        let mut middle = vec![Value::Array(row)];
        middle.extend((1..10_000).map(|_| json!(0)));
        let mut outer = vec![Value::Array(middle)];
        outer.extend((1..10_000).map(|_| json!(0)));
        let err = tensor_from_nested("data", &Value::Array(outer))
            .expect_err("not rectangular")
            .to_string();
        assert!(
            err.contains("`data` must be a rectangular nested list"),
            "{err}"
        );
    }

    #[test]
    fn v2_inputs_check_their_element_count_and_type() {
        let input: V2Input = serde_json::from_value(
            json!({"name": "x", "shape": [2, 2], "datatype": "INT64", "data": [1, 2, 3, 4]}),
        )
        .expect("parses");
        let t = tensor_from_v2(&input, 0).expect("builds");
        assert_eq!((t.size(), t.kind()), (vec![2, 2], Kind::Int64));
        let bad: V2Input = serde_json::from_value(
            json!({"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}),
        )
        .expect("parses");
        let err = tensor_from_v2(&bad, 1).expect_err("count").to_string();
        assert!(err.contains("`inputs[1].data` must hold 3 values"), "{err}");
        let out = tensor_to_v2("y", &t).expect("converts");
        let huge: V2Input = serde_json::from_value(
            json!({"name": "x", "shape": [i64::MAX, 4], "datatype": "FP32", "data": [1]}),
        )
        .expect("parses");
        let err = tensor_from_v2(&huge, 0).expect_err("overflow").to_string();
        assert!(err.contains("`inputs[0].shape` is too large"), "{err}");
        assert_eq!((out.datatype, out.data.len()), ("INT64", 4));
    }
}
