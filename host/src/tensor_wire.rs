//! Open Inference Protocol tensors in their binary forms, to and from the JSON form that
//! plugins read and write (`"data": [...]`, row-major). Two binary forms exist: the REST
//! binary tensor extension (a JSON header, then each binary tensor's bytes, announced by
//! `Inference-Header-Content-Length`) and gRPC's `raw_input_contents`/`raw_output_contents`.
//! Both hold a tensor's elements little-endian, one after the other; a BYTES element is a
//! 4-byte little-endian length and that many bytes; a BOOL element one byte.
//!
//! Everything here reads client bytes: sizes are checked against the shape before anything is
//! decoded, and the decoded elements are as many as the bytes allow.

use serde_json::{Map, Number, Value};

/// Bytes per element of a fixed-size datatype; `None` for BYTES (and names the protocol does
/// not define).
pub fn element_size(datatype: &str) -> Option<usize> {
    Some(match datatype {
        "BOOL" | "UINT8" | "INT8" => 1,
        "UINT16" | "INT16" | "FP16" | "BF16" => 2,
        "UINT32" | "INT32" | "FP32" => 4,
        "UINT64" | "INT64" | "FP64" => 8,
        _ => return None,
    })
}

/// A float as a JSON number (NaN and the infinities have none).
pub fn number(x: f64) -> Result<Value, String> {
    Number::from_f64(x)
        .map(Value::Number)
        .ok_or_else(|| format!("holds {x}, which JSON cannot carry"))
}

/// The elements of one tensor's bytes, as JSON values (a flat list).
pub fn decode(datatype: &str, bytes: &[u8]) -> Result<Vec<Value>, String> {
    if datatype == "BYTES" {
        let mut out = Vec::new();
        let mut rest = bytes;
        while !rest.is_empty() {
            let (len, tail) = rest
                .split_first_chunk::<4>()
                .ok_or("a BYTES element is cut short in its 4-byte length")?;
            let len = u32::from_le_bytes(*len) as usize;
            if tail.len() < len {
                return Err(format!(
                    "a BYTES element says it holds {len} bytes but {} remain",
                    tail.len()
                ));
            }
            let (element, tail) = tail.split_at(len);
            let text = std::str::from_utf8(element)
                .map_err(|_| "a BYTES element is not UTF-8 text, which JSON cannot carry")?;
            out.push(Value::String(text.to_owned()));
            rest = tail;
        }
        return Ok(out);
    }
    let size = element_size(datatype).ok_or_else(|| format!("unknown datatype {datatype}"))?;
    if !bytes.len().is_multiple_of(size) {
        return Err(format!(
            "{} bytes are not a whole number of {datatype} elements ({size} bytes each)",
            bytes.len()
        ));
    }
    bytes
        .chunks_exact(size)
        .map(|b| {
            Ok(match datatype {
                "BOOL" => Value::Bool(b[0] != 0),
                "UINT8" => b[0].into(),
                "INT8" => (b[0] as i8).into(),
                "UINT16" => u16::from_le_bytes([b[0], b[1]]).into(),
                "INT16" => i16::from_le_bytes([b[0], b[1]]).into(),
                "FP16" => number(half::f16::from_le_bytes([b[0], b[1]]).to_f64())?,
                "BF16" => number(half::bf16::from_le_bytes([b[0], b[1]]).to_f64())?,
                "UINT32" => u32::from_le_bytes([b[0], b[1], b[2], b[3]]).into(),
                "INT32" => i32::from_le_bytes([b[0], b[1], b[2], b[3]]).into(),
                "FP32" => number(f64::from(f32::from_le_bytes([b[0], b[1], b[2], b[3]])))?,
                _ => {
                    let b8 = [b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]];
                    match datatype {
                        "UINT64" => u64::from_le_bytes(b8).into(),
                        "INT64" => i64::from_le_bytes(b8).into(),
                        _ => number(f64::from_le_bytes(b8))?,
                    }
                }
            })
        })
        .collect()
}

/// The bytes of a tensor's JSON `data` (nested lists flattened, row-major).
pub fn encode(datatype: &str, data: &Value) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    encode_into(datatype, data, &mut out)?;
    Ok(out)
}

fn encode_into(datatype: &str, data: &Value, out: &mut Vec<u8>) -> Result<(), String> {
    if let Value::Array(items) = data {
        return items.iter().try_for_each(|v| encode_into(datatype, v, out));
    }
    let bad = || format!("`data` holds {data}, which is not {datatype}");
    let int = |lo: i128, hi: i128| -> Result<i128, String> {
        let v = data
            .as_i64()
            .map(i128::from)
            .or_else(|| data.as_u64().map(i128::from))
            .ok_or_else(bad)?;
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(bad())
        }
    };
    let float = || data.as_f64().ok_or_else(bad);
    match datatype {
        "BOOL" => out.push(u8::from(data.as_bool().ok_or_else(bad)?)),
        "UINT8" => out.push(int(0, 255)? as u8),
        "INT8" => out.push(int(-128, 127)? as i8 as u8),
        "UINT16" => out.extend((int(0, 65_535)? as u16).to_le_bytes()),
        "INT16" => out.extend((int(-32_768, 32_767)? as i16).to_le_bytes()),
        "UINT32" => out.extend((int(0, u32::MAX.into())? as u32).to_le_bytes()),
        "INT32" => out.extend((int(i32::MIN.into(), i32::MAX.into())? as i32).to_le_bytes()),
        "UINT64" => out.extend((int(0, u64::MAX.into())? as u64).to_le_bytes()),
        "INT64" => out.extend((int(i64::MIN.into(), i64::MAX.into())? as i64).to_le_bytes()),
        "FP16" => out.extend(half::f16::from_f64(float()?).to_le_bytes()),
        "BF16" => out.extend(half::bf16::from_f64(float()?).to_le_bytes()),
        "FP32" => out.extend((float()? as f32).to_le_bytes()),
        "FP64" => out.extend(float()?.to_le_bytes()),
        "BYTES" => {
            let text = data.as_str().ok_or_else(bad)?;
            let len = u32::try_from(text.len()).map_err(|_| "a BYTES element over 4 GiB")?;
            out.extend(len.to_le_bytes());
            out.extend(text.as_bytes());
        }
        other => return Err(format!("unknown datatype {other}")),
    }
    Ok(())
}

/// Refuse binary tensors with more elements in all than a JSON body of `max_request_size`
/// bytes could hold (each element takes at least two bytes there, `0,`): decoded, an element
/// costs tens of bytes whatever its size on the wire.
pub fn check_elements(elements: usize, max_request_size: usize) -> Result<(), String> {
    let most = max_request_size / 2;
    if elements > most {
        return Err(format!(
            "the binary tensors hold {elements} elements; at most {most} fit a request \
             (`max_request_size` {max_request_size} bytes, 2 per element as JSON)"
        ));
    }
    Ok(())
}

/// Check that `len` bytes are exactly what `shape` (if it is one) of a fixed-size `datatype`
/// holds; BYTES elements have their own lengths and pass. The refusal reads "N bytes, not
/// the M bytes its shape ... holds".
pub fn check_size(datatype: &str, shape: Option<&[i64]>, len: usize) -> Result<(), String> {
    let Some(each) = element_size(datatype) else {
        return Ok(());
    };
    let want = shape
        .and_then(element_count)
        .and_then(|n| n.checked_mul(each as u64));
    if want == Some(len as u64) {
        return Ok(());
    }
    Err(format!(
        "{len} bytes, not the {} bytes its shape {} of {datatype} holds",
        want.map_or("uncountable".into(), |b| b.to_string()),
        shape.map_or("(not a list of sizes)".into(), |s| format!("{s:?}")),
    ))
}

/// The elements the shape holds, if it can be counted.
pub fn element_count(shape: &[i64]) -> Option<u64> {
    shape.iter().try_fold(1u64, |n, &d| {
        u64::try_from(d).ok().and_then(|d| n.checked_mul(d))
    })
}

/// A REST request in the binary tensor extension (`header_len` bytes of JSON, then the binary
/// inputs' bytes in the order of the inputs that carry `parameters.binary_data_size`) as the
/// plain JSON request, with which outputs the client wants in binary.
pub fn request_from_binary(
    body: &[u8],
    header_len: usize,
    max_request_size: usize,
) -> Result<(Vec<u8>, BinaryOutputs), String> {
    if header_len > body.len() {
        return Err(format!(
            "Inference-Header-Content-Length is {header_len} but the body has {} bytes",
            body.len()
        ));
    }
    let (header, mut rest) = body.split_at(header_len);
    let mut request: Value = serde_json::from_slice(header)
        .map_err(|e| format!("the JSON header of the binary request is not valid JSON: {e}"))?;
    let inputs = request
        .get_mut("inputs")
        .and_then(Value::as_array_mut)
        .ok_or("an inference request needs `inputs`")?;
    let mut elements = 0usize;
    for (i, input) in inputs.iter_mut().enumerate() {
        let Some(size) = take_parameter(input, "binary_data_size") else {
            continue;
        };
        let size = size
            .as_u64()
            .and_then(|s| usize::try_from(s).ok())
            .ok_or_else(|| format!("`inputs[{i}].parameters.binary_data_size` must be a size"))?;
        if size > rest.len() {
            return Err(format!(
                "`inputs[{i}]` says it has {size} bytes of binary data but {} remain",
                rest.len()
            ));
        }
        let (bytes, tail) = rest.split_at(size);
        rest = tail;
        let datatype = input
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("`inputs[{i}].datatype` is missing"))?;
        let dims: Option<Vec<i64>> = input
            .get("shape")
            .and_then(Value::as_array)
            .and_then(|shape| shape.iter().map(Value::as_i64).collect());
        check_size(datatype, dims.as_deref(), size)
            .map_err(|e| format!("`inputs[{i}]` has {e} (binary data)"))?;
        let data = decode(datatype, bytes).map_err(|e| format!("`inputs[{i}]`: {e}"))?;
        elements += data.len();
        check_elements(elements, max_request_size)?;
        input["data"] = Value::Array(data);
    }
    if !rest.is_empty() {
        return Err(format!(
            "{} bytes of binary data follow the inputs that announced theirs",
            rest.len()
        ));
    }
    let binary_out = wants_binary_output(&mut request);
    let json = serde_json::to_vec(&request).map_err(|e| e.to_string())?;
    Ok((json, binary_out))
}

/// Which outputs of an answer go in binary: every output as `parameters.binary_data_output`
/// says (default no), and a named output as its `outputs[].parameters.binary_data` says (which
/// wins), as the binary tensor extension defines them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BinaryOutputs {
    all: bool,
    named: std::collections::HashMap<String, bool>,
}

impl BinaryOutputs {
    /// Whether any output may go in binary.
    pub fn any(&self) -> bool {
        self.all || self.named.values().any(|&b| b)
    }

    /// Whether the output `name` goes in binary.
    pub fn wants(&self, name: &str) -> bool {
        self.named.get(name).copied().unwrap_or(self.all)
    }
}

/// Which outputs a JSON request asks for in binary (`parameters.binary_data_output`,
/// `outputs[].parameters.binary_data`), with those parameters removed (they are the wire's,
/// not the model's).
pub fn wants_binary_output(request: &mut Value) -> BinaryOutputs {
    let all = take_parameter(request, "binary_data_output")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let mut named = std::collections::HashMap::new();
    if let Some(outputs) = request.get_mut("outputs").and_then(Value::as_array_mut) {
        for output in outputs {
            let choice = take_parameter(output, "binary_data").and_then(|v| v.as_bool());
            if let (Some(choice), Some(name)) = (choice, output.get("name").and_then(Value::as_str))
            {
                named.insert(name.to_owned(), choice);
            }
        }
    }
    BinaryOutputs { all, named }
}

/// Remove `parameters.<key>` from an object (and `parameters` if it is left empty).
fn take_parameter(object: &mut Value, key: &str) -> Option<Value> {
    let parameters = object.get_mut("parameters")?.as_object_mut()?;
    let value = parameters.remove(key);
    if parameters.is_empty() {
        if let Some(map) = object.as_object_mut() {
            map.remove("parameters");
        }
    }
    value
}

/// A JSON v2 answer with the `data` of each output that `binary` wants moved after the JSON as
/// bytes (the binary tensor extension): the body and the JSON header's length, or `None` when
/// no output went in binary (the answer then stays plain JSON).
pub fn answer_to_binary(
    answer: &[u8],
    binary: &BinaryOutputs,
) -> Result<Option<(Vec<u8>, usize)>, String> {
    let mut value: Value = serde_json::from_slice(answer)
        .map_err(|e| format!("the model's v2 answer is not JSON: {e}"))?;
    let mut tail = Vec::new();
    let mut moved = false;
    if let Some(outputs) = value.get_mut("outputs").and_then(Value::as_array_mut) {
        for (i, output) in outputs.iter_mut().enumerate() {
            let Some(map) = output.as_object_mut() else {
                continue;
            };
            let name = map.get("name").and_then(Value::as_str).unwrap_or_default();
            if !binary.wants(name) {
                continue;
            }
            moved = true;
            let (Some(data), Some(datatype)) = (
                map.remove("data"),
                map.get("datatype")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            ) else {
                continue;
            };
            let bytes = encode(&datatype, &data).map_err(|e| format!("`outputs[{i}]`: {e}"))?;
            let parameters = map
                .entry("parameters")
                .or_insert_with(|| Value::Object(Map::new()));
            if let Some(p) = parameters.as_object_mut() {
                p.insert("binary_data_size".into(), bytes.len().into());
            }
            tail.extend(bytes);
        }
    }
    if !moved {
        return Ok(None);
    }
    let mut body = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    let header_len = body.len();
    body.extend(tail);
    Ok(Some((body, header_len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_datatype_goes_to_bytes_and_back() {
        for (datatype, data) in [
            ("BOOL", json!([true, false])),
            ("UINT8", json!([0, 255])),
            ("INT8", json!([-128, 127])),
            ("UINT16", json!([65535])),
            ("INT16", json!([-32768])),
            ("UINT32", json!([4294967295u64])),
            ("INT32", json!([-2147483648i64, 5])),
            ("UINT64", json!([18446744073709551615u64])),
            ("INT64", json!([-9223372036854775808i64])),
            ("FP16", json!([1.5, -2.0])),
            ("BF16", json!([1.5, -2.0])),
            ("FP32", json!([0.25, -1e10])),
            ("FP64", json!([0.1, 1e300])),
            ("BYTES", json!(["", "héllo"])),
        ] {
            let bytes = encode(datatype, &data).expect(datatype);
            if let Some(size) = element_size(datatype) {
                assert_eq!(bytes.len(), size * data.as_array().map_or(0, Vec::len));
            }
            assert_eq!(
                Value::Array(decode(datatype, &bytes).expect(datatype)),
                data
            );
        }
        // Nested lists flatten row-major.
        assert_eq!(
            encode("INT8", &json!([[1, 2], [3, 4]])).expect("int8"),
            [1, 2, 3, 4]
        );
    }

    #[test]
    fn bad_bytes_and_values_are_refused_with_reasons() {
        for (datatype, bytes, says) in [
            ("FP32", &[0u8, 0, 128][..], "not a whole number"),
            ("BYTES", &[5, 0, 0, 0, b'a'][..], "says it holds 5 bytes"),
            ("BYTES", &[1, 0][..], "cut short"),
            ("BYTES", &[1, 0, 0, 0, 0xff][..], "not UTF-8"),
            ("FP32", &f32::NAN.to_le_bytes()[..], "JSON cannot carry"),
            ("FP8", &[0][..], "unknown datatype"),
        ] {
            let err = decode(datatype, bytes).expect_err(says);
            assert!(err.contains(says), "{says}: {err}");
        }
        for (datatype, data) in [
            ("UINT8", json!([256])),
            ("INT8", json!([1.5])),
            ("BOOL", json!([1])),
            ("BYTES", json!([1])),
        ] {
            assert!(encode(datatype, &data).is_err(), "{datatype} {data}");
        }
    }

    #[test]
    fn a_binary_request_becomes_json_and_an_answer_becomes_binary() {
        let header = json!({
            "inputs": [
                {"name": "x", "shape": [1, 2], "datatype": "FP32",
                 "parameters": {"binary_data_size": 8}},
                {"name": "t", "shape": [1], "datatype": "INT64", "data": [7]}
            ],
            "outputs": [{"name": "y", "parameters": {"binary_data": true}}]
        });
        let mut body = serde_json::to_vec(&header).expect("json");
        let len = body.len();
        body.extend(0.5f32.to_le_bytes());
        body.extend(2.0f32.to_le_bytes());
        let (json, binary) = request_from_binary(&body, len, 1 << 20).expect("decoded");
        assert!(binary.any() && binary.wants("y") && !binary.wants("z"));
        let v: Value = serde_json::from_slice(&json).expect("json");
        assert_eq!(v["inputs"][0]["data"], json!([0.5, 2.0]));
        assert!(v["inputs"][0].get("parameters").is_none());
        assert!(v["outputs"][0].get("parameters").is_none());
        // Sizes that disagree with the shape, or with what is there, are refused.
        for (cut, says) in [(4, "remain"), (0, "follow the inputs")] {
            let mut short = body.clone();
            if cut > 0 {
                short.truncate(short.len() - cut);
            } else {
                short.push(0);
            }
            let err = request_from_binary(&short, len, 1 << 20).expect_err(says);
            assert!(err.contains(says), "{err}");
        }
        let wrong = serde_json::to_vec(&json!({"inputs": [{"name": "x", "shape": [3],
            "datatype": "FP32", "parameters": {"binary_data_size": 8}}]}))
        .expect("json");
        let mut wrong_body = wrong.clone();
        wrong_body.extend([0u8; 8]);
        let err = request_from_binary(&wrong_body, wrong.len(), 1 << 20).expect_err("shape");
        assert!(err.contains("not the 12 bytes"), "{err}");
        assert!(request_from_binary(b"{}", 10, 1 << 20).is_err());
        // More elements than a JSON body of the same cap could hold.
        let err = request_from_binary(&body, len, 3).expect_err("too many");
        assert!(err.contains("at most 1 fit"), "{err}");

        let answer = json!({"model_name": "m", "outputs": [
            {"name": "y", "shape": [2], "datatype": "INT32", "data": [1, -1]}]});
        let (out, header_len) =
            answer_to_binary(&serde_json::to_vec(&answer).expect("json"), &binary)
                .expect("binary")
                .expect("an output in binary");
        let head: Value = serde_json::from_slice(&out[..header_len]).expect("json");
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 8);
        assert!(head["outputs"][0].get("data").is_none());
        assert_eq!(&out[header_len..], [1, 0, 0, 0, 255, 255, 255, 255]);
    }

    #[test]
    fn each_output_goes_in_binary_or_json_as_the_request_says() {
        // Every output in binary but `b`, which asks for JSON; `c` is not named.
        let mut request = json!({"inputs": [], "parameters": {"binary_data_output": true},
            "outputs": [{"name": "a"}, {"name": "b", "parameters": {"binary_data": false}}]});
        let binary = wants_binary_output(&mut request);
        assert!(request.get("parameters").is_none());
        assert!(request["outputs"][1].get("parameters").is_none());
        let answer = json!({"model_name": "m", "outputs": [
            {"name": "a", "shape": [1], "datatype": "INT8", "data": [3]},
            {"name": "b", "shape": [1], "datatype": "INT8", "data": [4]},
            {"name": "c", "shape": [1], "datatype": "INT8", "data": [5]}]});
        let answer = serde_json::to_vec(&answer).expect("json");
        let (out, header_len) = answer_to_binary(&answer, &binary)
            .expect("binary")
            .expect("some outputs in binary");
        let head: Value = serde_json::from_slice(&out[..header_len]).expect("json");
        assert_eq!(head["outputs"][0]["parameters"]["binary_data_size"], 1);
        assert_eq!(head["outputs"][1]["data"], json!([4]));
        assert_eq!(head["outputs"][2]["parameters"]["binary_data_size"], 1);
        assert_eq!(&out[header_len..], [3, 5]);
        // Only one output asked for in binary: the rest stay JSON.
        let mut request = json!({"inputs": [],
            "outputs": [{"name": "c", "parameters": {"binary_data": true}}]});
        let binary = wants_binary_output(&mut request);
        let (out, header_len) = answer_to_binary(&answer, &binary)
            .expect("binary")
            .expect("c in binary");
        let head: Value = serde_json::from_slice(&out[..header_len]).expect("json");
        assert_eq!(head["outputs"][0]["data"], json!([3]));
        assert_eq!(&out[header_len..], [5]);
        // None asked for: no binary form at all.
        let none = wants_binary_output(&mut json!({"inputs": []}));
        assert!(!none.any());
        assert!(answer_to_binary(&answer, &none).expect("ok").is_none());
    }
}
