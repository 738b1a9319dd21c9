//! Request bodies: what a client may send, parsed into texts (or question/context pairs) and
//! per-request options, with errors that name the field.

use cresset_plugin_api::{PluginError, Request};
use cresset_torch::json_type;
use serde_json::{Map, Value};

/// The most texts one request may carry.
pub const MAX_TEXTS: usize = 64;

/// What one request asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Inputs {
    /// One or more texts; `many` when the client sent a list (the answer is then a list).
    Texts { texts: Vec<String>, many: bool },
    /// Question-answering pairs.
    Pairs {
        pairs: Vec<(String, String)>,
        many: bool,
    },
}

/// A parsed request: inputs plus the options object (the JSON body's other keys).
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The inputs.
    pub inputs: Inputs,
    /// Other top-level keys of a JSON object body (`max_new_tokens`, `target`, …).
    pub options: Map<String, Value>,
    /// Where the inputs were: `text`, `data`, `inputs`, or `body` (for error messages).
    pub field: String,
}

fn invalid(message: impl Into<String>) -> PluginError {
    PluginError::invalid_input(message)
}

fn text(field: &str, v: &Value) -> Result<String, PluginError> {
    match v {
        Value::String(s) if s.trim().is_empty() => Err(invalid(format!("`{field}` is empty"))),
        Value::String(s) => Ok(s.clone()),
        other => Err(invalid(format!(
            "`{field}` must be a string, not {}",
            json_type(other)
        ))),
    }
}

fn texts(field: &str, v: &Value) -> Result<(Vec<String>, bool), PluginError> {
    match v {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(invalid(format!("`{field}` is an empty list")));
            }
            if items.len() > MAX_TEXTS {
                return Err(invalid(format!(
                    "`{field}` has {} texts; the most per request is {MAX_TEXTS}",
                    items.len()
                )));
            }
            let list = items
                .iter()
                .enumerate()
                .map(|(i, item)| text(&format!("{field}[{i}]"), item))
                .collect::<Result<_, _>>()?;
            Ok((list, true))
        }
        other => Ok((vec![text(field, other)?], false)),
    }
}

fn pair(field: &str, v: &Value) -> Result<(String, String), PluginError> {
    let Value::Object(map) = v else {
        return Err(invalid(format!(
            "`{field}` must be an object with `question` and `context`, not {}",
            json_type(v)
        )));
    };
    let question = map
        .get("question")
        .ok_or_else(|| invalid(format!("`{field}` has no `question`")))?;
    let context = map
        .get("context")
        .ok_or_else(|| invalid(format!("`{field}` has no `context`")))?;
    Ok((
        text(&format!("{field}.question"), question)?,
        text(&format!("{field}.context"), context)?,
    ))
}

fn pairs_from(field: &str, v: &Value) -> Result<(Vec<(String, String)>, bool), PluginError> {
    match v {
        Value::Array(items) => {
            if items.is_empty() || items.len() > MAX_TEXTS {
                return Err(invalid(format!(
                    "`{field}` must hold 1 to {MAX_TEXTS} question/context objects"
                )));
            }
            let list = items
                .iter()
                .enumerate()
                .map(|(i, item)| pair(&format!("{field}[{i}]"), item))
                .collect::<Result<_, _>>()?;
            Ok((list, true))
        }
        other => Ok((vec![pair(field, other)?], false)),
    }
}

/// Parse a request. `qa` selects question/context pairs instead of texts.
///
/// Accepted bodies: raw UTF-8 text (any content type but JSON); JSON `"text"`, `["a", "b"]`,
/// `{"text": …}`, `{"data": …}` or `{"inputs": …}` (a string or a list of strings); for QA
/// `{"question": …, "context": …}`, a list of such objects, or either under `data`/`inputs`.
pub fn parse(request: &Request, qa: bool) -> Result<Parsed, PluginError> {
    let body: &[u8] = &request.body;
    let is_json = request.content_type.as_str().contains("json");
    if !is_json {
        let raw = std::str::from_utf8(body).map_err(|e| {
            invalid(format!(
                "the body is not valid UTF-8 text (byte {}); send UTF-8, or JSON with `text`",
                e.valid_up_to()
            ))
        })?;
        if qa {
            return Err(invalid(
                "question answering needs a JSON body with `question` and `context`",
            ));
        }
        return Ok(Parsed {
            inputs: Inputs::Texts {
                texts: vec![text("body", &Value::String(raw.to_owned()))?],
                many: false,
            },
            options: Map::new(),
            field: "body".into(),
        });
    }
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("the body is not valid JSON: {e}")))?;
    let (payload, field, options) = match value {
        Value::Object(mut map) => {
            let key = if qa {
                ["data", "inputs"]
                    .into_iter()
                    .find(|k| map.contains_key(*k))
            } else {
                ["text", "data", "inputs"]
                    .into_iter()
                    .find(|k| map.contains_key(*k))
            };
            match key {
                Some(key) => {
                    let payload = map.remove(key).unwrap_or(Value::Null);
                    (payload, key.to_owned(), map)
                }
                None if qa => {
                    let payload = Value::Object(
                        ["question", "context"]
                            .into_iter()
                            .filter_map(|k| map.remove(k).map(|v| (k.to_owned(), v)))
                            .collect(),
                    );
                    (payload, "body".to_owned(), map)
                }
                None => {
                    return Err(invalid(
                        "the JSON body needs `text` (a string or a list of strings); \
                         `data` or `inputs` also work",
                    ))
                }
            }
        }
        other => (other, "body".to_owned(), Map::new()),
    };
    let inputs = if qa {
        let (pairs, many) = pairs_from(&field, &payload)?;
        Inputs::Pairs { pairs, many }
    } else {
        let (list, many) = texts(&field, &payload)?;
        Inputs::Texts { texts: list, many }
    };
    Ok(Parsed {
        inputs,
        options,
        field,
    })
}

/// An optional non-negative integer option, bounded.
pub fn opt_uint(
    options: &Map<String, Value>,
    key: &str,
    max: u64,
) -> Result<Option<u64>, PluginError> {
    match options.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n <= max => Ok(Some(n)),
            _ => Err(invalid(format!(
                "`{key}` must be an integer from 0 to {max}. Given: {v}"
            ))),
        },
    }
}

/// An optional number option in `[min, max]`.
pub fn opt_f64(
    options: &Map<String, Value>,
    key: &str,
    min: f64,
    max: f64,
) -> Result<Option<f64>, PluginError> {
    match options.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
            _ => Err(invalid(format!(
                "`{key}` must be a number from {min} to {max}. Given: {v}"
            ))),
        },
    }
}

/// An optional boolean option.
pub fn opt_bool(options: &Map<String, Value>, key: &str) -> Result<Option<bool>, PluginError> {
    match options.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(format!(
            "`{key}` must be true or false. Given: {v}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cresset_plugin_api::sdk::testing::request;

    fn texts_of(ct: &str, body: &str) -> Result<(Vec<String>, bool), String> {
        match parse(&request(ct, body.as_bytes().to_vec()), false) {
            Ok(Parsed {
                inputs: Inputs::Texts { texts, many },
                ..
            }) => Ok((texts, many)),
            Ok(other) => Err(format!("{:?}", other.inputs)),
            Err(e) => Err(e.message.to_string()),
        }
    }

    #[test]
    fn every_text_form_parses() {
        let one = Ok((vec!["hi there".to_owned()], false));
        assert_eq!(texts_of("text/plain", "hi there"), one);
        assert_eq!(texts_of("application/json", r#""hi there""#), one);
        assert_eq!(texts_of("application/json", r#"{"text": "hi there"}"#), one);
        assert_eq!(texts_of("application/json", r#"{"data": "hi there"}"#), one);
        assert_eq!(
            texts_of("application/json", r#"{"inputs": "hi there"}"#),
            one
        );
        assert_eq!(
            texts_of("application/json", r#"{"text": ["a", "b"]}"#),
            Ok((vec!["a".to_owned(), "b".to_owned()], true))
        );
        assert_eq!(
            texts_of("application/json", r#"["a"]"#),
            Ok((vec!["a".to_owned()], true))
        );
    }

    #[test]
    fn bad_bodies_name_the_problem() {
        for (ct, body, needle) in [
            ("text/plain", "  ", "`body` is empty"),
            ("application/json", r#"{"text": ""}"#, "`text` is empty"),
            (
                "application/json",
                r#"{"text": 5}"#,
                "`text` must be a string, not a number",
            ),
            (
                "application/json",
                r#"{"text": ["a", 5]}"#,
                "`text[1]` must be a string",
            ),
            (
                "application/json",
                r#"{"text": []}"#,
                "`text` is an empty list",
            ),
            ("application/json", r#"{"txt": "a"}"#, "needs `text`"),
            ("application/json", "{", "not valid JSON"),
        ] {
            let err = texts_of(ct, body).expect_err(body);
            assert!(err.contains(needle), "{body}: {err}");
        }
        let bad_utf8 = request("text/plain", vec![b'a', 0xff, 0xfe]);
        let err = parse(&bad_utf8, false).expect_err("invalid utf-8");
        assert!(err.message.contains("not valid UTF-8"), "{}", err.message);
    }

    #[test]
    fn question_answering_bodies() {
        let parsed = parse(
            &request(
                "application/json",
                br#"{"question": "q?", "context": "c."}"#.to_vec(),
            ),
            true,
        )
        .expect("pair");
        assert_eq!(
            parsed.inputs,
            Inputs::Pairs {
                pairs: vec![("q?".into(), "c.".into())],
                many: false
            }
        );
        for (body, needle) in [
            (r#"{"question": "q?"}"#, "has no `context`"),
            (
                r#"{"question": "q?", "context": ""}"#,
                "`body.context` is empty",
            ),
            (
                r#"{"data": [{"question": "q", "context": 3}]}"#,
                "`data[0].context` must be a string",
            ),
        ] {
            let err = parse(&request("application/json", body.as_bytes().to_vec()), true)
                .expect_err(body);
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
    }
}
