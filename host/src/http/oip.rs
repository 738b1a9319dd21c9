//! KServe v1 and Open Inference Protocol v2 request bodies, checked by the host before any
//! plugin sees them, so that every plugin gets a well-formed request and every client the same
//! errors: v1 needs `instances`; v2 needs `inputs`, each with a name, a shape, a datatype the
//! protocol defines and data whose element count (and element type) matches the shape.

use serde_json::Value;

/// The tensor datatypes of the Open Inference Protocol.
const DATATYPES: [&str; 14] = [
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16",
    "FP32", "FP64", "BF16", "BYTES",
];

/// The keys of a v2 request and of one of its inputs.
const REQUEST_KEYS: [&str; 4] = ["id", "parameters", "inputs", "outputs"];
const INPUT_KEYS: [&str; 5] = ["name", "shape", "datatype", "parameters", "data"];

fn json(body: &[u8]) -> Result<Value, String> {
    serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))
}

/// A KServe v1 request: `{"instances": [...]}`.
pub fn check_v1(body: &[u8]) -> Result<(), String> {
    match json(body)? {
        Value::Object(map) => match map.get("instances") {
            Some(Value::Array(_)) => Ok(()),
            Some(other) => Err(format!(
                "`instances` must be a list. Given: {}",
                kind(other)
            )),
            None => Err("a KServe v1 request needs `instances`: {\"instances\": [...]}".into()),
        },
        other => Err(format!(
            "a KServe v1 request is a JSON object with `instances`. Given: {}",
            kind(&other)
        )),
    }
}

/// An Open Inference Protocol v2 request.
pub fn check_v2(body: &[u8]) -> Result<(), String> {
    let Value::Object(map) = json(body)? else {
        return Err("an inference request is a JSON object with `inputs`".into());
    };
    if let Some(key) = map.keys().find(|k| !REQUEST_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "unknown field `{key}` in the inference request (it takes {})",
            REQUEST_KEYS.join(", ")
        ));
    }
    let inputs = match map.get("inputs") {
        Some(Value::Array(inputs)) if !inputs.is_empty() => inputs,
        Some(Value::Array(_)) => return Err("`inputs` is empty".into()),
        Some(other) => return Err(format!("`inputs` must be a list. Given: {}", kind(other))),
        None => return Err("an inference request needs `inputs`".into()),
    };
    for (i, input) in inputs.iter().enumerate() {
        check_input(input).map_err(|m| format!("`inputs[{i}]`: {m}"))?;
    }
    Ok(())
}

fn check_input(input: &Value) -> Result<(), String> {
    let Value::Object(map) = input else {
        return Err(format!("must be an object. Given: {}", kind(input)));
    };
    if let Some(key) = map.keys().find(|k| !INPUT_KEYS.contains(&k.as_str())) {
        return Err(format!(
            "unknown field `{key}` (an input takes {})",
            INPUT_KEYS.join(", ")
        ));
    }
    match map.get("name") {
        Some(Value::String(name)) if !name.is_empty() => {}
        _ => return Err("`name` must be a non-empty string".into()),
    }
    let shape: Vec<u64> = match map.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| {
                d.as_u64()
                    .ok_or_else(|| format!("`shape` holds {d}, not a size"))
            })
            .collect::<Result<_, _>>()?,
        _ => return Err("`shape` must be a list of sizes".into()),
    };
    let datatype = match map.get("datatype") {
        Some(Value::String(t)) if DATATYPES.contains(&t.as_str()) => t.as_str(),
        Some(other) => {
            return Err(format!(
                "`datatype` must be one of {}. Given: {other}",
                DATATYPES.join(", ")
            ))
        }
        None => return Err("`datatype` is missing".into()),
    };
    let data = map.get("data").ok_or("`data` is missing")?;
    let want = shape
        .iter()
        .try_fold(1u64, |n, d| n.checked_mul(*d))
        .ok_or("`shape` has more elements than can be counted")?;
    let mut count = 0u64;
    count_elements(data, datatype, &mut count)?;
    if count != want {
        return Err(format!(
            "`shape` {shape:?} holds {want} elements but `data` has {count}"
        ));
    }
    Ok(())
}

/// Count the elements of `data` (nested lists flattened), checking each against `datatype`.
fn count_elements(data: &Value, datatype: &str, count: &mut u64) -> Result<(), String> {
    match data {
        Value::Array(items) => items
            .iter()
            .try_for_each(|item| count_elements(item, datatype, count)),
        scalar => {
            let fits = match datatype {
                "BOOL" => scalar.is_boolean(),
                "BYTES" => scalar.is_string(),
                "FP16" | "FP32" | "FP64" | "BF16" => scalar.is_number(),
                t if t.starts_with("UINT") => scalar.is_u64(),
                _ => scalar.is_i64() || scalar.is_u64(),
            };
            if !fits {
                return Err(format!("`data` holds {scalar}, which is not {datatype}"));
            }
            *count += 1;
            Ok(())
        }
    }
}

use cresset_plugin_api::sdk::settings::json_type as kind;

/// Name the addressed model and the version that answered in a v2 answer (a JSON object).
pub fn name_model(body: &[u8], model: &str, version: &str) -> Option<Vec<u8>> {
    let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(body) else {
        return None;
    };
    map.insert("model_name".into(), model.into());
    map.insert("model_version".into(), version.into());
    serde_json::to_vec(&Value::Object(map)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_needs_instances() {
        assert!(check_v1(br#"{"instances": [[1, 2]]}"#).is_ok());
        for (body, says) in [
            (&br#"{"inputs": [[1]]}"#[..], "needs `instances`"),
            (br#"{"instances": 3}"#, "must be a list"),
            (br#"[1]"#, "JSON object"),
            (br#"{"instances": ["#, "not valid JSON"),
        ] {
            let err = check_v1(body).expect_err(says);
            assert!(err.contains(says), "{err}");
        }
    }

    #[test]
    fn v2_inputs_are_checked_against_their_shape_and_datatype() {
        let ok = br#"{"id": "r", "inputs": [{"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [[1, 2.5], [3, 4]]},
                                  {"name": "s", "shape": [1], "datatype": "BYTES", "data": ["hi"]},
                                  {"name": "b", "shape": [], "datatype": "BOOL", "data": true}]}"#;
        assert!(check_v2(ok).is_ok(), "{:?}", check_v2(ok));
        for (body, says) in [
            (&br#"{"id": "r"}"#[..], "needs `inputs`"),
            (br#"{"inputs": []}"#, "empty"),
            (br#"{"inputs": [{"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2]}]}"#, "holds 3 elements but `data` has 2"),
            (br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP8", "data": [1]}]}"#, "`datatype` must be one of"),
            (br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "INT32", "data": [1.5]}]}"#, "not INT32"),
            (br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "UINT8", "data": [-1]}]}"#, "not UINT8"),
            (br#"{"inputs": [{"name": "x", "shape": [-1], "datatype": "FP32", "data": [1]}]}"#, "not a size"),
            (br#"{"inputs": [{"name": "", "shape": [1], "datatype": "FP32", "data": [1]}]}"#, "`name`"),
            (br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32"}]}"#, "`data` is missing"),
            (br#"{"inputs": [{"name": "x", "shape": [1], "datatype": "FP32", "data": [1], "dims": 1}]}"#, "unknown field `dims`"),
            (br#"{"inputs": [{"name": "x", "shape": [4294967296, 4294967296, 4294967296], "datatype": "FP32", "data": [1]}]}"#, "more elements than can be counted"),
            (br#"{"inputs": [], "extra": 1}"#, "unknown field `extra`"),
            (br#"{"inputs": "#, "not valid JSON"),
        ] {
            let err = check_v2(body).expect_err(says);
            assert!(err.contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn v2_answers_name_the_model_and_version() {
        let named = name_model(br#"{"outputs": [], "model_name": "other"}"#, "iris", "1.0")
            .expect("an object");
        let v: Value = serde_json::from_slice(&named).expect("json");
        assert_eq!(
            (v["model_name"].as_str(), v["model_version"].as_str()),
            (Some("iris"), Some("1.0"))
        );
        assert!(name_model(b"not json", "m", "v").is_none());
    }
}
