//! The gpt handler as a library, on the small random Llama of `scripts/make_llm_fixtures.py`:
//! greedy text equal to transformers' tokens, streaming, stop strings, a batch sharing decode
//! steps, and bad requests.

use std::path::{Path, PathBuf};

use cresset_plugin_api::sdk::testing::{init_context, request, run_steps, step_instance};
use cresset_plugin_api::sdk::{InitContext, StepContext, StepHandler};
use cresset_plugin_api::{Capabilities, ErrorCode, KeyValue, PluginError, Request};
use cresset_plugin_gpt::{GptHandler, TokenizingHeld, INLINE_BODY_BYTES};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/generated/llm")
}

fn expected() -> Value {
    let text =
        std::fs::read_to_string(fixtures().join("expected.json")).expect("run `make models`");
    serde_json::from_str(&text).expect("JSON")
}

/// `handler` in f32 unless it says otherwise: the references are transformers' f32 outputs, and
/// `dtype = "auto"` would run in bf16 on a CPU with native bf16.
fn in_f32(mut handler: Value) -> Value {
    if handler.get("dtype").is_none() {
        handler["dtype"] = json!("float32");
    }
    handler
}

fn context(handler: Value, batch_size: u64) -> InitContext {
    let mut ctx = init_context(fixtures().join("llama-gqa-tied"), in_f32(handler));
    ctx.model_config = json!({ "batch_size": batch_size });
    ctx
}

fn handler(config: Value, batch_size: u64) -> GptHandler {
    step_instance::<GptHandler>(&context(config, batch_size))
        .unwrap_or_else(|e| panic!("{}", e.message))
}

/// Token ids as text, with the tokenizer of fixture `name`.
fn decoded(name: &str, ids: &[i64]) -> String {
    let tokenizer = cresset_torch::load_tokenizer(&fixtures().join(name)).expect("tokenizer");
    tokenizer
        .decode(&ids.iter().map(|&i| i as u32).collect::<Vec<_>>(), true)
        .expect("decode")
}

fn greedy_text(ids: &[i64]) -> String {
    decoded("llama-gqa-tied", ids)
}

fn ids(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("ids")
        .iter()
        .map(|x| x.as_i64().expect("id"))
        .collect()
}

fn body(result: &Result<cresset_plugin_api::Response, cresset_plugin_api::PluginError>) -> Value {
    match result {
        Ok(r) => serde_json::from_slice(&r.body).expect("JSON"),
        Err(e) => panic!("{:?}: {}", e.code, e.message),
    }
}

fn json_request(value: Value) -> Request {
    request("application/json", value.to_string())
}

/// A request through one of the host's OpenAI routes.
fn openai(protocol: &str, value: Value) -> Request {
    let mut r = json_request(value);
    r.params = vec![KeyValue::new("cresset-protocol", protocol)].into();
    r
}

/// Every request arrives at once; steps run until all are answered.
struct Out {
    chunks: Vec<Vec<cresset_plugin_api::Response>>,
    finals: Vec<Result<cresset_plugin_api::Response, cresset_plugin_api::PluginError>>,
}

fn run(h: &mut GptHandler, requests: &[Request]) -> Out {
    let arrivals: Vec<(usize, Request)> = requests.iter().map(|r| (0, r.clone())).collect();
    let out = run_steps(h, &arrivals, 10_000);
    Out {
        chunks: out.chunks,
        finals: out
            .finals
            .into_iter()
            .map(|f| f.expect("answered"))
            .collect(),
    }
}

#[test]
fn greedy_text_streaming_and_stop_strings() {
    let expected = expected();
    let spec = &expected["llama-gqa-tied"];
    let want = greedy_text(&ids(&spec["greedy_ids"]));
    let mut h = handler(json!({}), 1);
    let prompt = spec["prompt"].as_str().expect("prompt");
    let out = run(
        &mut h,
        &[json_request(json!({"data": prompt, "max_new_tokens": 32}))],
    );
    assert_eq!(body(&out.finals[0])["generated_text"], want.as_str());

    // Streamed: the chunks are the same text, piece by piece.
    let out = run(
        &mut h,
        &[json_request(
            json!({"data": prompt, "max_new_tokens": 32, "stream": true}),
        )],
    );
    let streamed: String = out.chunks[0]
        .iter()
        .map(|c| String::from_utf8(c.body.to_vec()).expect("utf-8"))
        .collect();
    assert!(out.chunks[0].len() > 5, "one chunk per token or so");
    assert_eq!(streamed, want);
    assert!(out.finals[0].is_ok());

    // A stop string ends the text before it, and is never streamed.
    let cut = want
        .char_indices()
        .nth(want.chars().count() / 2)
        .map(|(i, _)| i)
        .expect("middle");
    let stop: String = want[cut..].chars().take(3).collect();
    let before = &want[..want.find(&stop).expect("stop occurs")];
    let out = run(
        &mut h,
        &[json_request(
            json!({"data": prompt, "max_new_tokens": 32, "stop": [stop.clone()], "stream": true}),
        )],
    );
    let streamed: String = out.chunks[0]
        .iter()
        .map(|c| String::from_utf8(c.body.to_vec()).expect("utf-8"))
        .collect();
    assert_eq!(streamed, before, "stop {stop:?}");
}

#[test]
fn a_batch_decodes_together_and_each_gets_its_solo_answer() {
    let expected = expected();
    let spec = &expected["llama-gqa-tied"];
    let mut h = handler(json!({}), 2);
    let long = json!({"data": spec["prompt"], "max_new_tokens": 32});
    let short = json!({"data": spec["batch"]["prompt"], "max_new_tokens": 32});
    let out = run(&mut h, &[json_request(short), json_request(long)]);
    assert_eq!(
        body(&out.finals[0])["generated_text"],
        greedy_text(&ids(&spec["batch"]["greedy_ids"])).as_str()
    );
    assert_eq!(
        body(&out.finals[1])["generated_text"],
        greedy_text(&ids(&spec["greedy_ids"])).as_str()
    );
}

#[test]
fn openai_shapes_come_back_with_usage_and_finish_reason() {
    let expected = expected();
    let spec = &expected["llama-gqa-tied"];
    let mut h = handler(json!({}), 1);
    let r = openai(
        "openai-completions",
        json!({"model": "m", "prompt": spec["prompt"], "max_tokens": 5, "temperature": 0}),
    );
    let out = body(&run(&mut h, &[r]).finals[0]);
    assert_eq!(out["object"], "text_completion");
    assert_eq!(out["choices"][0]["finish_reason"], "length");
    assert_eq!(out["usage"]["completion_tokens"], 5);
    assert_eq!(
        out["usage"]["prompt_tokens"],
        spec["prompt_ids"].as_array().map(Vec::len).unwrap_or(0)
    );
    assert_eq!(
        out["choices"][0]["text"],
        greedy_text(&ids(&spec["greedy_ids"])[..5]).as_str()
    );
}

#[test]
fn bad_requests_get_400_naming_the_field() {
    let mut h = handler(json!({"max_seq_len": 16}), 1);
    let long_prompt = "word ".repeat(40);
    for (value, needle) in [
        (
            json!({"data": "hi", "max_new_tokens": -1}),
            "`max_new_tokens`",
        ),
        (json!({"data": "hi", "temperature": -1.0}), "`temperature`"),
        (json!({"data": long_prompt}), "the context holds 16"),
        (json!({"data": "hi", "stop": [""]}), "`stop`"),
        (json!({"nothing": "hi"}), "`data`"),
    ] {
        let out = run(&mut h, &[json_request(value.clone())]);
        let err = out.finals[0]
            .as_ref()
            .err()
            .unwrap_or_else(|| panic!("{value} should fail"));
        assert_eq!(err.code, ErrorCode::INVALID_INPUT, "{value}");
        assert!(err.message.contains(needle), "{value}: {}", err.message);
    }
    let ok = run(
        &mut h,
        &[json_request(json!({"data": "hi", "max_new_tokens": 2}))],
    );
    assert!(ok.finals[0].is_ok(), "the handler still answers");
}

const CHATML: &str = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n";

#[test]
fn a_prompt_too_long_in_bytes_is_refused_without_tokenizing() {
    let mut h = handler(json!({"chat_template": CHATML}), 1);
    // 256 positions, and no token of this byte-level BPE stands for more than 13 bytes
    // (`<|endoftext|>`): 255 tokens are at most 3315 bytes.
    let max = h
        .max_prompt_bytes()
        .expect("a byte-level BPE bounds its tokens");
    assert_eq!(max, 255 * 13);
    let huge = "a".repeat(6 << 20);
    let chat = json!({"model": "m", "messages": [{"role": "user", "content": huge}]});
    for (request, field) in [
        (json_request(json!({"data": huge})), "`data` is"),
        (request("text/plain", huge.clone()), "the body is"),
        (
            openai("openai-completions", json!({"model": "m", "prompt": huge})),
            "`prompt` is",
        ),
        (
            openai("openai-chat", chat),
            "`messages`, rendered with the chat template, is",
        ),
    ] {
        let out = run(&mut h, &[request]);
        let err = out.finals[0].as_ref().expect_err("refused");
        assert_eq!(err.code, ErrorCode::INVALID_INPUT);
        assert!(err.message.starts_with(field), "{}", err.message);
        assert!(
            err.message.contains("bytes long: at least")
                && err.message.contains("the context holds 256"),
            "{}",
            err.message
        );
    }
    assert_eq!(h.prompts_tokenized(), 0, "refused by their length in bytes");
    // One byte over the bound is refused as it stands; at the bound, the prompt is tokenized
    // and its tokens counted.
    let out = run(
        &mut h,
        &[json_request(json!({"data": "a".repeat(max + 1)}))],
    );
    let err = out.finals[0].as_ref().expect_err("refused");
    assert!(
        err.message.contains("at least 256 tokens"),
        "{}",
        err.message
    );
    assert_eq!(h.prompts_tokenized(), 0);
    let out = run(&mut h, &[json_request(json!({"data": "a".repeat(max)}))]);
    let err = out.finals[0].as_ref().expect_err("too many tokens");
    assert!(err.message.starts_with("the prompt is"), "{}", err.message);
    assert_eq!(h.prompts_tokenized(), 1);
}

/// The gpt handler with tokenizing held from one step until a later one, as if a prompt took
/// that many steps to tokenize.
struct SlowTokenizing {
    inner: GptHandler,
    held_during: std::ops::Range<usize>,
    step: usize,
    held: Option<TokenizingHeld>,
}

impl StepHandler for SlowTokenizing {
    const NAME: &'static str = "slow-tokenizing";
    const SUMMARY: &'static str = "the gpt handler, tokenizing held for some steps";
    const CAPABILITIES: Capabilities = GptHandler::CAPABILITIES;
    type Model = ();

    fn initialize(_: &std::sync::Arc<()>, _ctx: &InitContext) -> Result<Self, PluginError> {
        Err(PluginError::unsupported("made by the test"))
    }

    fn step(
        &mut self,
        new: &[Request],
        first_index: usize,
        ctx: &mut StepContext<'_, '_>,
    ) -> Result<(), PluginError> {
        if self.step == self.held_during.start {
            self.held = Some(self.inner.hold_tokenizing());
        }
        if self.step == self.held_during.end {
            self.held = None;
        }
        self.step += 1;
        self.inner.step(new, first_index, ctx)
    }
}

#[test]
fn a_stream_keeps_decoding_while_a_big_prompt_is_tokenized() {
    let expected = expected();
    let spec = &expected["llama-gqa-tied"];
    let stream = json!({"data": spec["prompt"], "max_new_tokens": 8, "stream": true});
    // 200 tokens of 12 bytes: within the byte bound, too big to be tokenized on the step loop.
    let big_prompt = "<|im_start|>".repeat(200);
    let big = json_request(json!({"data": big_prompt, "max_new_tokens": 4}));
    assert!(big.body.len() > INLINE_BODY_BYTES);
    // It arrives at step 2 and its tokenizing lasts until step 30.
    let mut h = SlowTokenizing {
        inner: handler(json!({}), 2),
        held_during: 2..30,
        step: 0,
        held: None,
    };
    let bound = h.inner.max_prompt_bytes().expect("bounded");
    assert!(big_prompt.len() <= bound);
    let out = run_steps(&mut h, &[(0, json_request(stream)), (2, big.clone())], 1000);
    // The stream decoded one token per step to its end meanwhile, with its solo text...
    let stream_done = out.final_step[0].expect("answered");
    assert!(
        stream_done < 30,
        "the stream ended at step {stream_done}, not while the big prompt was tokenized"
    );
    let streamed: String = out.chunks[0]
        .iter()
        .map(|c| String::from_utf8(c.body.to_vec()).expect("utf-8"))
        .collect();
    assert_eq!(streamed, greedy_text(&ids(&spec["greedy_ids"])[..8]));
    // ...and the big request joined once its tokens were ready, with its solo answer.
    let big_done = out.final_step[1].expect("answered");
    assert!(big_done >= 30, "answered at step {big_done}, while held");
    let solo = run(&mut handler(json!({}), 1), &[big]);
    let answer = out.finals[1].as_ref().expect("answered");
    assert_eq!(body(answer), body(&solo.finals[0]));
    assert_eq!(h.inner.prompts_tokenized(), 2);
    assert_eq!(h.inner.in_flight(), 0);
}

#[test]
fn a_request_joins_a_running_batch_and_leaves_when_done() {
    let expected = expected();
    let spec = &expected["llama-gqa-tied"];
    let long = json!({"data": spec["prompt"], "max_new_tokens": 32, "stream": true});
    let short = json!({"data": spec["batch"]["prompt"], "max_new_tokens": 32, "stream": true});
    // The second request arrives at step 5, while the first is decoding.
    let mut h = handler(json!({}), 4);
    let out = run_steps(
        &mut h,
        &[
            (0, json_request(long.clone())),
            (5, json_request(short.clone())),
        ],
        1000,
    );
    let (first_done, second_first) = (
        out.final_step[0].expect("done"),
        out.first_chunk_step[1].expect("started"),
    );
    assert!(
        second_first <= 6,
        "the newcomer got its first token at step {second_first}"
    );
    assert!(
        second_first + 20 < first_done,
        "long before the first ended (step {first_done})"
    );
    let text = |chunks: &[cresset_plugin_api::Response]| -> String {
        chunks
            .iter()
            .map(|c| String::from_utf8(c.body.to_vec()).expect("utf-8"))
            .collect()
    };
    assert_eq!(text(&out.chunks[0]), greedy_text(&ids(&spec["greedy_ids"])));
    assert_eq!(
        text(&out.chunks[1]),
        greedy_text(&ids(&spec["batch"]["greedy_ids"]))
    );
    assert_eq!(h.in_flight(), 0, "both left the batch");
    // With one slot the newcomer waits for it, and still gets its solo answer.
    let mut one = handler(json!({}), 1);
    let out = run_steps(
        &mut one,
        &[(0, json_request(long)), (5, json_request(short))],
        1000,
    );
    assert!(out.first_chunk_step[1].expect("started") >= out.final_step[0].expect("done"));
    assert_eq!(
        text(&out.chunks[1]),
        greedy_text(&ids(&spec["batch"]["greedy_ids"]))
    );
}

#[test]
fn long_prompts_prefill_in_chunks_without_changing_the_answer() {
    let expected = expected();
    let spec = &expected["llama-gqa-tied"];
    let mut h = handler(json!({"prefill_tokens_per_step": 5}), 1);
    let out = run(
        &mut h,
        &[json_request(
            json!({"data": spec["prompt"], "max_new_tokens": 32}),
        )],
    );
    assert_eq!(
        body(&out.finals[0])["generated_text"],
        greedy_text(&ids(&spec["greedy_ids"])).as_str()
    );
}

/// An archive folder holding the tied model, with `draft` as the draft checkpoint.
/// Copy the files of a fixture checkpoint into `to`.
fn copy_fixture(name: &str, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for entry in std::fs::read_dir(fixtures().join(name)).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_file() {
            std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
        }
    }
}

fn with_draft(draft: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_fixture("llama-gqa-tied", dir.path());
    copy_fixture(draft, &dir.path().join("draft"));
    dir
}

fn speculative(draft_dir: &Path, batch: u64) -> GptHandler {
    speculative_with(draft_dir, "draft", batch)
}

/// The handler in `dir` speculating with the draft at `draft` (inside `dir`), 4 tokens a step.
fn speculative_with(dir: &Path, draft: &str, batch: u64) -> GptHandler {
    let mut ctx = init_context(dir, in_f32(json!({"draft_model": draft, "speculate_k": 4})));
    ctx.model_config = json!({ "batch_size": batch });
    step_instance::<GptHandler>(&ctx).unwrap_or_else(|e| panic!("{}", e.message))
}

/// Run the fixture's two prompts as one batch of 32 new tokens each, and check that each gives
/// transformers' greedy text.
fn both_prompts_give_greedy_text(h: &mut GptHandler, spec: &Value) {
    let out = run(
        h,
        &[
            json_request(json!({"data": spec["prompt"], "max_new_tokens": 32})),
            json_request(json!({"data": spec["batch"]["prompt"], "max_new_tokens": 32})),
        ],
    );
    assert_eq!(
        body(&out.finals[0])["generated_text"],
        greedy_text(&ids(&spec["greedy_ids"])).as_str()
    );
    assert_eq!(
        body(&out.finals[1])["generated_text"],
        greedy_text(&ids(&spec["batch"]["greedy_ids"])).as_str()
    );
}

#[test]
fn speculative_decoding_with_the_target_as_draft_accepts_everything() {
    let expected = expected();
    let spec = &expected["llama-gqa-tied"];
    let dir = with_draft("llama-gqa-tied");
    let mut h = speculative(dir.path(), 2);
    both_prompts_give_greedy_text(&mut h, spec);
    let (accepted, drafted) = h.speculation().expect("a draft is configured");
    assert!(drafted > 20, "speculation ran ({drafted} drafted)");
    assert_eq!(accepted, drafted, "the target accepts its own proposals");
}

#[test]
fn speculative_decoding_with_another_draft_keeps_greedy_output() {
    let expected = expected();
    let spec = &expected["llama-gqa-tied"];
    let dir = with_draft("llama-gqa-untied");
    let mut h = speculative(dir.path(), 2);
    let out = run(
        &mut h,
        &[
            json_request(json!({"data": spec["prompt"], "max_new_tokens": 32})),
            json_request(
                json!({"data": spec["batch"]["prompt"], "max_new_tokens": 32, "stream": true}),
            ),
        ],
    );
    assert_eq!(
        body(&out.finals[0])["generated_text"],
        greedy_text(&ids(&spec["greedy_ids"])).as_str()
    );
    let streamed: String = out.chunks[1]
        .iter()
        .map(|c| String::from_utf8(c.body.to_vec()).expect("utf-8"))
        .collect();
    assert_eq!(streamed, greedy_text(&ids(&spec["batch"]["greedy_ids"])));
    let (accepted, drafted) = h.speculation().expect("a draft is configured");
    assert!(
        accepted < drafted,
        "a different model is not always right ({accepted}/{drafted})"
    );
    // Sampling with a seed repeats.
    let sampled = |h: &mut GptHandler| {
        let out = run(
            h,
            &[json_request(
                json!({"data": spec["prompt"], "max_new_tokens": 16, "temperature": 0.8, "seed": 7}),
            )],
        );
        body(&out.finals[0])["generated_text"].clone()
    };
    assert_eq!(sampled(&mut h), sampled(&mut h));
}

#[test]
fn speculative_decoding_with_the_same_model_in_int4_as_draft_keeps_greedy_output() {
    let expected = expected();
    let spec = &expected["llama-gqa-tied"];
    let dir = tempfile::tempdir().expect("tempdir");
    copy_fixture("llama-gqa-tied", dir.path());
    let gguf = fixtures().join("llama-gqa-tied.Q4_1.gguf");
    std::fs::create_dir(dir.path().join("draft")).expect("mkdir");
    std::fs::copy(&gguf, dir.path().join("draft/draft.gguf")).expect("copy the draft");
    // `quantize = "auto"`: the safetensors target stays dense, the GGUF draft keeps its Q4_1
    // blocks as int4.
    let mut h = speculative_with(dir.path(), "draft/draft.gguf", 2);
    assert!(!h.model().is_quantized());
    assert!(
        h.draft_model().is_some_and(|d| d.is_quantized()),
        "the draft holds int4 weights"
    );
    // Whatever the draft proposes, the target's greedy tokens come out.
    both_prompts_give_greedy_text(&mut h, spec);
    let (accepted, drafted) = h.speculation().expect("a draft is configured");
    assert!(drafted > 20, "speculation ran ({drafted} drafted)");
    // The fixture's random weights give nearly flat logits, so int4 rounding flips many of its
    // argmaxes (27 of 144 proposals accepted); on SmolLM2 int4 agrees with f32 at 98% of
    // positions (plugins/torch/tests/quantized.rs).
    assert!(accepted > 0, "no proposal accepted ({accepted}/{drafted})");
}

#[test]
fn tensor_parallel_serving_gives_the_same_text() {
    let expected = expected();
    let spec = &expected["llama-gqa-untied"];
    let mut ctx = init_context(
        fixtures().join("llama-gqa-untied"),
        in_f32(json!({"tp_shards": 3})),
    );
    ctx.model_config = json!({"batch_size": 2, "parallel_type": "tp"});
    let mut h = step_instance::<GptHandler>(&ctx).unwrap_or_else(|e| panic!("{}", e.message));
    assert_eq!(h.model().shards(), 3);
    let out = run(
        &mut h,
        &[json_request(
            json!({"data": spec["prompt"], "max_new_tokens": 32}),
        )],
    );
    let want = decoded("llama-gqa-untied", &ids(&spec["greedy_ids"]));
    assert_eq!(body(&out.finals[0])["generated_text"], want.as_str());
}

/// A copy of a fixture checkpoint in a folder of its own (the handler may write offload files).
fn copy_of(name: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tempdir");
    copy_fixture(name, dir.path());
    dir
}

#[test]
fn a_device_map_with_disk_offload_serves_the_same_text() {
    let expected = expected();
    let spec = &expected["llama-gqa-untied"];
    let dir = copy_of("llama-gqa-untied");
    let want = decoded("llama-gqa-untied", &ids(&spec["greedy_ids"]));
    let config =
        json!({"max_memory": {"cpu": "450KiB"}, "offload_folder": "offload", "max_length": 64});
    let mut ctx = init_context(dir.path(), in_f32(config));
    ctx.model_config = json!({"batch_size": 1});
    let mut h = step_instance::<GptHandler>(&ctx).unwrap_or_else(|e| panic!("{}", e.message));
    let offloaded = h.model().offloaded_layers();
    assert!(!offloaded.is_empty(), "the budget sends layers to disk");
    assert!(
        offloaded.len() < h.model().config.layers as usize,
        "and keeps some in memory"
    );
    assert!(dir.path().join("offload").is_dir());
    let out = run(
        &mut h,
        &[json_request(
            json!({"data": spec["prompt"], "max_new_tokens": 32}),
        )],
    );
    assert_eq!(body(&out.finals[0])["generated_text"], want.as_str());
    // An explicit map is validated: a module the model lacks is a clear error at load.
    let bad = json!({"device_map": {"model.layers.99": "cpu", "model": "cpu", "lm_head": "cpu"}});
    let err = step_instance::<GptHandler>(&init_context(dir.path(), bad))
        .err()
        .expect("refused");
    assert!(err.message.contains("model.layers.99"), "{}", err.message);
    // Too small without an offload folder: the shortfall is named.
    let tight = json!({"max_memory": {"cpu": "100KiB"}});
    let err = step_instance::<GptHandler>(&init_context(dir.path(), tight))
        .err()
        .expect("refused");
    assert!(err.message.contains("does not fit"), "{}", err.message);
}

#[test]
fn quantize_and_dtype_choose_how_the_weights_are_held_and_bad_values_are_refused() {
    use cresset_torch::tch::Kind;
    let load = |dir: &Path, config: Value| {
        let tp = config.get("tp_shards").is_some();
        let mut ctx = init_context(dir, config);
        ctx.model_config = match tp {
            true => json!({"batch_size": 1, "parallel_type": "tp"}),
            false => json!({"batch_size": 1}),
        };
        step_instance::<GptHandler>(&ctx)
    };
    let say = |h: &mut GptHandler| {
        let out = run(
            h,
            &[json_request(json!({"data": "hello", "max_new_tokens": 4}))],
        );
        body(&out.finals[0])["generated_text"].clone()
    };
    // A GGUF (with the checkpoint's tokenizer): by default its quantized blocks are kept, with
    // f32 activations around them; `quantize = "none"` dequantizes.
    let gguf = tempfile::tempdir().expect("tempdir");
    for f in ["llama-gqa-tied.Q4_1.gguf", "llama-gqa-tied/tokenizer.json"] {
        let from = fixtures().join(f);
        std::fs::copy(&from, gguf.path().join(from.file_name().expect("name"))).expect("copy");
    }
    let mut h = load(gguf.path(), json!({})).unwrap_or_else(|e| panic!("{}", e.message));
    assert!(h.model().is_quantized());
    assert_eq!(h.model().kind(), Kind::Float);
    assert!(say(&mut h).is_string());
    let h = load(gguf.path(), json!({"quantize": "none", "dtype": "float32"}))
        .unwrap_or_else(|e| panic!("{}", e.message));
    assert!(!h.model().is_quantized());
    // safetensors quantized at load, in int8 and int4.
    let tied = fixtures().join("llama-gqa-tied");
    for q in [
        json!({"quantize": "int8"}),
        json!({"quantize": "int4", "group_size": 32}),
    ] {
        let mut h = load(&tied, q.clone()).unwrap_or_else(|e| panic!("{q}: {}", e.message));
        assert!(h.model().is_quantized(), "{q}");
        assert!(say(&mut h).is_string(), "{q}");
    }
    // `dtype = "auto"` on a dense model: bf16 where the CPU has it natively, else f32.
    let h = load(&tied, json!({"dtype": "auto"})).unwrap_or_else(|e| panic!("{}", e.message));
    let want = if cresset_torch::layers::cpu_has_native_bf16() {
        Kind::BFloat16
    } else {
        Kind::Float
    };
    assert_eq!(h.model().kind(), want);
    // Bad values name the key; a quantized model cannot be split for tensor parallelism.
    for (config, key) in [
        (json!({"quantize": "int3"}), "`handler.quantize`"),
        (
            json!({"quantize": "int4", "group_size": 48}),
            "`handler.group_size`",
        ),
        (json!({"dtype": "float8"}), "`dtype`"),
        (json!({"max_seq_length": 64}), "did you mean `max_seq_len`?"),
        // A value of the wrong type is refused, naming its key, where it was ignored before.
        (
            json!({"max_new_tokens": "many"}),
            "`handler.max_new_tokens`: invalid type: string \"many\", expected a whole number",
        ),
        (
            json!({"speculative": "yes"}),
            "`handler.speculative`: invalid type",
        ),
        (
            json!({"temperature": 500.0}),
            "`handler.temperature` must be a number from 0 to 100",
        ),
        (json!({"quantize": "int8", "tp_shards": 2}), "quantized"),
    ] {
        let err = load(&tied, config.clone()).err().expect("refused");
        assert!(err.message.contains(key), "{config}: {}", err.message);
    }
}

#[test]
fn gpt_fasts_setting_names_are_understood() {
    let expected = expected();
    let spec = &expected["llama-gqa-tied"];
    let dir = with_draft("llama-gqa-tied");
    let start = |handler: Value| {
        let mut ctx = init_context(dir.path(), in_f32(handler));
        ctx.model_config = json!({ "batch_size": 1 });
        step_instance::<GptHandler>(&ctx)
    };
    let greedy = greedy_text(&ids(&spec["greedy_ids"]));
    let ask = |h: &mut GptHandler, request: Value| {
        let out = run(h, &[json_request(request)]);
        body(&out.finals[0])["generated_text"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    let ask_prompt =
        |h: &mut GptHandler| ask(h, json!({"data": spec["prompt"], "max_new_tokens": 32}));
    // `speculative` with `draft_model_path` (and `compile`, accepted without effect).
    let mut h = start(json!({"speculative": true, "draft_model_path": "draft", "speculate_k": 4, "compile": true}))
        .unwrap_or_else(|e| panic!("{}", e.message));
    assert_eq!(ask_prompt(&mut h), greedy);
    let (accepted, drafted) = h.speculation().expect("a draft");
    assert!(drafted > 0 && accepted == drafted, "{accepted}/{drafted}");
    // `speculative = false` leaves the draft out; `true` without a draft is refused.
    let h = start(json!({"speculative": false, "draft_model_path": "draft"}))
        .unwrap_or_else(|e| panic!("{}", e.message));
    assert!(h.speculation().is_none());
    let err = start(json!({"speculative": true})).err().expect("refused");
    assert!(err.message.contains("draft_model_path"), "{}", err.message);
    // `model_path` may name the checkpoint's file and `tokenizer_path` a tokenizer apart from
    // it (GPT-fast's SentencePiece model, or a tokenizer.json); GPT-fast's model.pth is
    // refused, and so is a tokenizer that is missing or not one.
    let mut h =
        start(json!({"model_path": "model.safetensors", "tokenizer_path": "tokenizer.json"}))
            .unwrap_or_else(|e| panic!("{}", e.message));
    assert_eq!(ask_prompt(&mut h), greedy);
    std::fs::write(dir.path().join("model.pth"), b"PK").expect("write");
    for (handler, says) in [
        (json!({"model_path": "model.pth"}), "GPT-fast's model.pth"),
        (
            json!({"tokenizer_path": "tokenizer.model"}),
            "`tokenizer.model` (`handler.tokenizer_path`) is not a file",
        ),
        (
            json!({"tokenizer_path": "model.pth"}),
            "not a valid SentencePiece model",
        ),
        (
            json!({"tokenizer_path": "../tokenizer.model"}),
            "inside the archive",
        ),
    ] {
        let err = start(handler.clone()).err().expect("refused");
        assert!(err.message.contains(says), "{handler}: {}", err.message);
    }
    // Handler-level `temperature` and `top_k` are the defaults of requests that choose no
    // sampling; a request's own choice wins.
    let mut h = start(json!({"temperature": 0.8, "top_k": 200}))
        .unwrap_or_else(|e| panic!("{}", e.message));
    let sampled = ask(
        &mut h,
        json!({"data": spec["prompt"], "max_new_tokens": 32, "seed": 7}),
    );
    assert_ne!(sampled, greedy, "the defaults sample");
    assert_eq!(
        ask(
            &mut h,
            json!({"data": spec["prompt"], "max_new_tokens": 32, "seed": 7})
        ),
        sampled,
        "a seed repeats"
    );
    assert_eq!(
        ask(
            &mut h,
            json!({"data": spec["prompt"], "max_new_tokens": 32, "do_sample": false})
        ),
        greedy
    );
}

#[test]
fn response_format_torchserve_answers_plain_text() {
    let expected = expected();
    let spec = &expected["llama-gqa-tied"];
    let mut ctx = context(json!({"response_format": "torchserve"}), 1);
    ctx.model_config = json!({ "batch_size": 1 });
    let mut h = step_instance::<GptHandler>(&ctx).unwrap_or_else(|e| panic!("{}", e.message));
    let out = run(
        &mut h,
        &[json_request(
            json!({"data": spec["prompt"], "max_new_tokens": 32}),
        )],
    );
    let response = out.finals[0].as_ref().expect("answer");
    assert_eq!(response.content_type.as_str(), "text/plain; charset=utf-8");
    assert_eq!(
        String::from_utf8_lossy(&response.body),
        greedy_text(&ids(&spec["greedy_ids"]))
    );
}
