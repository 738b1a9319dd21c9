//! Request formats: TorchServe's (`{"data": prompt, "max_new_tokens", ...}` or a raw text body)
//! and OpenAI's completions and chat completions, into one [`GenRequest`]; and the answers in
//! each format.

use cresset_plugin_api::{PluginError, Request};
use serde_json::{json, Map, Value};

/// Which API a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    /// `/predictions`: `{"generated_text"}`, streamed as plain text pieces.
    TorchServe,
    /// `/v1/completions`.
    Completions,
    /// `/v1/chat/completions`.
    Chat,
}

/// What to generate, whatever the API.
#[derive(Debug, Clone, PartialEq)]
pub struct GenRequest {
    /// The API, for the answer's shape.
    pub api: Api,
    /// The prompt text (chat messages are rendered later, with the model's template).
    pub prompt: Prompt,
    /// Where the request holds its prompt, for messages that name it.
    pub prompt_field: PromptField,
    /// Most new tokens (`None`: the handler's default).
    pub max_new_tokens: Option<u64>,
    /// Sampling temperature (0: greedy).
    pub temperature: f64,
    /// Top-k (0: off).
    pub top_k: u64,
    /// Top-p (1: off).
    pub top_p: f64,
    /// Repetition penalty (1: off).
    pub repetition_penalty: f64,
    /// Seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream tokens as they come.
    pub stream: bool,
    /// OpenAI `stream_options.include_usage`.
    pub include_usage: bool,
    /// Whether the request chose its sampling (else the handler's defaults apply).
    pub sampling_given: bool,
}

/// A prompt: text, or chat messages.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Plain text.
    Text(String),
    /// `(role, content)` messages.
    Chat(Vec<(String, String)>),
}

/// Where a request holds its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptField {
    /// A field of the JSON body (`data`, `prompt`, `messages`, ...).
    Key(&'static str),
    /// The whole body (raw text, or a JSON string).
    Body,
}

impl std::fmt::Display for PromptField {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Key(key) => write!(f, "`{key}`"),
            Self::Body => f.write_str("the body"),
        }
    }
}

fn invalid(message: impl Into<String>) -> PluginError {
    PluginError::invalid_input(message)
}

fn number(
    map: &Map<String, Value>,
    key: &str,
    min: f64,
    max: f64,
) -> Result<Option<f64>, PluginError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_f64() {
            Some(x) if (min..=max).contains(&x) => Ok(Some(x)),
            _ => Err(invalid(format!(
                "`{key}` must be a number from {min} to {max}. Given: {v}"
            ))),
        },
    }
}

fn integer(map: &Map<String, Value>, key: &str, max: u64) -> Result<Option<u64>, PluginError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(x) if x <= max => Ok(Some(x)),
            _ => Err(invalid(format!(
                "`{key}` must be an integer from 0 to {max}. Given: {v}"
            ))),
        },
    }
}

fn boolean(map: &Map<String, Value>, key: &str) -> Result<Option<bool>, PluginError> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(v) => Err(invalid(format!(
            "`{key}` must be true or false. Given: {v}"
        ))),
    }
}

fn stops(map: &Map<String, Value>) -> Result<Vec<String>, PluginError> {
    let list = match map.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) if items.len() <= 4 => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| invalid("`stop` must be a string or a list of up to 4 strings"))?,
        Some(_) => {
            return Err(invalid(
                "`stop` must be a string or a list of up to 4 strings",
            ))
        }
    };
    if list.iter().any(String::is_empty) {
        return Err(invalid("`stop` strings must not be empty"));
    }
    Ok(list)
}

fn reject_unknown(map: &Map<String, Value>, known: &[&str]) -> Result<(), PluginError> {
    match map.keys().find(|k| !known.contains(&k.as_str())) {
        Some(k) => Err(invalid(format!(
            "Unrecognized request argument supplied: {k}"
        ))),
        None => Ok(()),
    }
}

const COMPLETION_FIELDS: &[&str] = &[
    "model",
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "echo",
    "logprobs",
    "suffix",
    "best_of",
    "logit_bias",
];
const CHAT_FIELDS: &[&str] = &[
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "user",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",
    "top_logprobs",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "store",
    "metadata",
];

/// Parse a request body according to its API (the host's `cresset-protocol` parameter).
pub fn parse(request: &Request) -> Result<GenRequest, PluginError> {
    let protocol = request
        .params
        .iter()
        .find(|kv| kv.key.as_str() == "cresset-protocol")
        .map(|kv| kv.value.to_string())
        .unwrap_or_default();
    match protocol.as_str() {
        "openai-completions" => parse_openai(request, Api::Completions),
        "openai-chat" => parse_openai(request, Api::Chat),
        _ => parse_torchserve(request),
    }
}

fn parse_torchserve(request: &Request) -> Result<GenRequest, PluginError> {
    let body: &[u8] = &request.body;
    let json_body = request.content_type.as_str().contains("json");
    let mut map = Map::new();
    let mut field = PromptField::Body;
    let prompt = if json_body {
        let value: Value = serde_json::from_slice(body)
            .map_err(|e| invalid(format!("the body is not valid JSON: {e}")))?;
        match value {
            Value::String(s) => s,
            Value::Object(m) => {
                map = m;
                let key = ["data", "text", "prompt", "inputs"]
                    .into_iter()
                    .find(|k| map.contains_key(*k))
                    .ok_or_else(|| invalid("the JSON body needs `data` (the prompt)"))?;
                field = PromptField::Key(key);
                match map.get(key) {
                    Some(Value::String(s)) => s.clone(),
                    Some(other) => {
                        return Err(invalid(format!("`{key}` must be a string. Given: {other}")))
                    }
                    None => String::new(),
                }
            }
            other => {
                return Err(invalid(format!(
                    "the body must be a prompt or an object. Given: {other}"
                )))
            }
        }
    } else {
        std::str::from_utf8(body)
            .map_err(|e| {
                invalid(format!(
                    "the body is not valid UTF-8 text (byte {})",
                    e.valid_up_to()
                ))
            })?
            .to_owned()
    };
    if prompt.is_empty() {
        return Err(invalid("the prompt is empty"));
    }
    let do_sample = boolean(&map, "do_sample")?;
    let temperature = number(&map, "temperature", 0.0, 100.0)?;
    let top_k = integer(&map, "top_k", 1 << 20)?.unwrap_or(0);
    let top_p = number(&map, "top_p", 0.0, 1.0)?.unwrap_or(1.0);
    // Greedy unless sampling is asked for or implied by a sampling parameter.
    let implied = temperature.is_some() || top_k > 0 || top_p < 1.0;
    let temperature = match do_sample {
        Some(false) => 0.0,
        Some(true) => temperature.unwrap_or(1.0),
        None if implied => temperature.unwrap_or(1.0),
        None => 0.0,
    };
    Ok(GenRequest {
        api: Api::TorchServe,
        prompt: Prompt::Text(prompt),
        prompt_field: field,
        max_new_tokens: integer(&map, "max_new_tokens", 1 << 20)?,
        temperature,
        top_k,
        top_p,
        repetition_penalty: number(&map, "repetition_penalty", 0.01, 100.0)?.unwrap_or(1.0),
        seed: integer(&map, "seed", u64::MAX)?,
        stop: stops(&map)?,
        stream: boolean(&map, "stream")?.unwrap_or(false),
        include_usage: false,
        sampling_given: do_sample.is_some() || implied,
    })
}

fn parse_openai(request: &Request, api: Api) -> Result<GenRequest, PluginError> {
    let value: Value = serde_json::from_slice(&request.body)
        .map_err(|e| invalid(format!("the body is not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(invalid("the body must be a JSON object"));
    };
    reject_unknown(
        &map,
        if api == Api::Chat {
            CHAT_FIELDS
        } else {
            COMPLETION_FIELDS
        },
    )?;
    if integer(&map, "n", 1 << 10)?.is_some_and(|n| n != 1) {
        return Err(invalid(
            "`n` must be 1: one choice per request is supported",
        ));
    }
    for unsupported in [
        "logprobs",
        "top_logprobs",
        "echo",
        "suffix",
        "tools",
        "logit_bias",
    ] {
        if map
            .get(unsupported)
            .is_some_and(|v| !v.is_null() && v != &Value::Bool(false))
        {
            return Err(invalid(format!("`{unsupported}` is not supported")));
        }
    }
    let prompt =
        if api == Api::Chat {
            let messages = map
                .get("messages")
                .and_then(Value::as_array)
                .filter(|m| !m.is_empty())
                .ok_or_else(|| invalid("`messages` must be a non-empty list"))?;
            let parsed = messages
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let role = m.get("role").and_then(Value::as_str);
                    let content = match m.get("content") {
                        Some(Value::String(s)) => Some(s.clone()),
                        // The list form: text parts only.
                        Some(Value::Array(parts)) => parts
                            .iter()
                            .map(|p| p.get("text").and_then(Value::as_str))
                            .collect::<Option<Vec<_>>>()
                            .map(|t| t.concat()),
                        _ => None,
                    };
                    match (role, content) {
                        (Some(r), Some(c)) => Ok((r.to_owned(), c)),
                        _ => Err(invalid(format!(
                            "`messages[{i}]` needs a `role` and a text `content`"
                        ))),
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            Prompt::Chat(parsed)
        } else {
            match map.get("prompt") {
                Some(Value::String(s)) if !s.is_empty() => Prompt::Text(s.clone()),
                Some(Value::Array(items))
                    if items.len() == 1 && items[0].as_str().is_some_and(|s| !s.is_empty()) =>
                {
                    Prompt::Text(items[0].as_str().unwrap_or_default().to_owned())
                }
                Some(Value::Array(_)) => return Err(invalid(
                    "`prompt` must be one non-empty string (batches of prompts are not supported)",
                )),
                _ => return Err(invalid("`prompt` must be a non-empty string")),
            }
        };
    let max_tokens = match integer(&map, "max_completion_tokens", 1 << 20)? {
        Some(n) => Some(n),
        None => integer(&map, "max_tokens", 1 << 20)?,
    };
    // OpenAI's default for completions is 16 tokens; chat has no fixed default.
    let max_new_tokens = max_tokens.or((api == Api::Completions).then_some(16));
    number(&map, "frequency_penalty", -2.0, 2.0)?;
    number(&map, "presence_penalty", -2.0, 2.0)?;
    let include_usage = map
        .get("stream_options")
        .and_then(|o| o.get("include_usage"))
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(GenRequest {
        api,
        prompt,
        prompt_field: PromptField::Key(if api == Api::Chat {
            "messages"
        } else {
            "prompt"
        }),
        max_new_tokens,
        temperature: number(&map, "temperature", 0.0, 2.0)?.unwrap_or(1.0),
        top_k: 0,
        top_p: number(&map, "top_p", 0.0, 1.0)?.unwrap_or(1.0),
        repetition_penalty: 1.0,
        seed: integer(&map, "seed", u64::MAX)?,
        stop: stops(&map)?,
        stream: boolean(&map, "stream")?.unwrap_or(false),
        include_usage,
        // OpenAI's defaults are the API's own.
        sampling_given: true,
    })
}

/// Why generation ended (the shared generation loop's).
pub use cresset_torch::generation::Finish;

/// Identity of one answer: OpenAI's `id`, `created` and `model`.
pub struct Meta<'a> {
    /// `cmpl-…` / `chatcmpl-…` suffix (the request id).
    pub id: &'a str,
    /// Unix seconds.
    pub created: u64,
    /// The model name.
    pub model: &'a str,
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

/// One streamed piece, in the API's shape (`None`: nothing to send).
pub fn chunk(api: Api, meta: &Meta, piece: &str, first: bool) -> Option<Value> {
    match api {
        Api::TorchServe => None,
        Api::Completions => Some(json!({
            "id": format!("cmpl-{}", meta.id), "object": "text_completion", "created": meta.created,
            "model": meta.model,
            "choices": [{"text": piece, "index": 0, "logprobs": null, "finish_reason": null}],
        })),
        Api::Chat => {
            let delta = if first {
                json!({"role": "assistant", "content": piece})
            } else {
                json!({"content": piece})
            };
            Some(json!({
                "id": format!("chatcmpl-{}", meta.id), "object": "chat.completion.chunk",
                "created": meta.created, "model": meta.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": null}],
            }))
        }
    }
}

/// The last streamed event (finish reason, usage if asked).
pub fn stream_end(
    api: Api,
    meta: &Meta,
    finish: Finish,
    prompt: usize,
    completion: usize,
    include_usage: bool,
) -> Option<Value> {
    let mut value = match api {
        Api::TorchServe => return None,
        Api::Completions => json!({
            "id": format!("cmpl-{}", meta.id), "object": "text_completion", "created": meta.created,
            "model": meta.model,
            "choices": [{"text": "", "index": 0, "logprobs": null, "finish_reason": finish.name()}],
        }),
        Api::Chat => json!({
            "id": format!("chatcmpl-{}", meta.id), "object": "chat.completion.chunk",
            "created": meta.created, "model": meta.model,
            "choices": [{"index": 0, "delta": {}, "logprobs": null, "finish_reason": finish.name()}],
        }),
    };
    if include_usage {
        value["usage"] = usage(prompt, completion);
    }
    Some(value)
}

/// The whole answer (no streaming).
pub fn whole(
    api: Api,
    meta: &Meta,
    text: &str,
    finish: Finish,
    prompt: usize,
    completion: usize,
) -> Value {
    match api {
        Api::TorchServe => json!({"generated_text": text}),
        Api::Completions => json!({
            "id": format!("cmpl-{}", meta.id), "object": "text_completion", "created": meta.created,
            "model": meta.model,
            "choices": [{"text": text, "index": 0, "logprobs": null, "finish_reason": finish.name()}],
            "usage": usage(prompt, completion),
        }),
        Api::Chat => json!({
            "id": format!("chatcmpl-{}", meta.id), "object": "chat.completion", "created": meta.created,
            "model": meta.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": finish.name()}],
            "usage": usage(prompt, completion),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cresset_plugin_api::sdk::testing::request;
    use cresset_plugin_api::KeyValue;

    fn openai(protocol: &str, body: Value) -> Result<GenRequest, String> {
        let mut r = request("application/json", body.to_string());
        r.params = vec![KeyValue::new("cresset-protocol", protocol)].into();
        parse(&r).map_err(|e| e.message.to_string())
    }

    #[test]
    fn torchserve_requests_parse_with_greedy_by_default() {
        let r = parse(&request(
            "application/json",
            r#"{"data": "Hi", "max_new_tokens": 5}"#,
        ))
        .expect("ok");
        assert_eq!(r.prompt, Prompt::Text("Hi".into()));
        assert_eq!((r.max_new_tokens, r.temperature), (Some(5), 0.0));
        let r = parse(&request("text/plain", "Hello")).expect("raw text");
        assert_eq!(r.api, Api::TorchServe);
        for (body, needle) in [
            (
                r#"{"data": "Hi", "max_new_tokens": -1}"#,
                "`max_new_tokens`",
            ),
            (r#"{"data": "Hi", "temperature": -0.5}"#, "`temperature`"),
            (r#"{"data": 3}"#, "`data` must be a string"),
            (r#"{"data": ""}"#, "empty"),
        ] {
            let err = parse(&request("application/json", body)).expect_err(body);
            assert!(err.message.contains(needle), "{body}: {}", err.message);
        }
    }

    #[test]
    fn openai_requests_parse_and_unknown_fields_are_rejected_as_openai_does() {
        let r = openai("openai-chat", json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}], "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})).expect("chat");
        assert_eq!(r.prompt, Prompt::Chat(vec![("user".into(), "Hi".into())]));
        assert!(r.stream && r.include_usage);
        let r = openai("openai-completions", json!({"model": "m", "prompt": "Hi"}))
            .expect("completion");
        assert_eq!((r.max_new_tokens, r.temperature), (Some(16), 1.0));
        let err = openai(
            "openai-chat",
            json!({"model": "m", "messages": [], "bogus": 1}),
        )
        .expect_err("unknown");
        assert!(
            err.contains("Unrecognized request argument supplied: bogus"),
            "{err}"
        );
        let err = openai(
            "openai-chat",
            json!({"model": "m", "messages": [{"role": "user"}]}),
        )
        .expect_err("no content");
        assert!(err.contains("`messages[0]`"), "{err}");
        let err = openai(
            "openai-completions",
            json!({"model": "m", "prompt": "x", "max_tokens": -3}),
        )
        .expect_err("negative");
        assert!(err.contains("`max_tokens`"), "{err}");
        let err = openai(
            "openai-completions",
            json!({"model": "m", "prompt": "x", "n": 2}),
        )
        .expect_err("n");
        assert!(err.contains("`n`"), "{err}");
    }
}
