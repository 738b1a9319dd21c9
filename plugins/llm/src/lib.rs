//! Text generation shared by the `gpt` handler (TorchServe's GPT-fast handler, in Rust on
//! libtorch) and the `accelerate` handler (which maps the reference Accelerate handler's
//! settings onto it). The plugins are thin: each exports [`GptHandler`] (or a wrapper) with
//! `export_handler!`.
//!
//! It serves a HuggingFace checkpoint (`config.json` + safetensors + `tokenizer.json`) of a
//! Llama, GPT-2 or BLOOM, or a Llama GGUF file (dequantized at load; its own vocabulary becomes
//! the tokenizer unless a `tokenizer.json` is given). Requests come in TorchServe's format
//! (`{"data": prompt, "max_new_tokens", "temperature", "top_k", ...}` → `{"generated_text"}`)
//! or, through the host's OpenAI-compatible routes, as completions and chat completions.
//! Tokens stream as they are generated: plain text chunks on `/predictions` (with
//! `"stream": true`), OpenAI chunks that the host sends as server-sent events.
//!
//! Sequences of a batch run together: each has a slot of a KV cache allocated once at start-up
//! (`batch_size` slots of `max_seq_len` positions), its prompt is prefilled into the slot, and
//! then one forward pass per step decodes every running sequence. A sequence leaves the batch
//! when it ends (end of sequence, a `stop` string, `max_new_tokens`) or its client goes away.
//!
//! `[handler]` keys: `model_file` (a `.gguf` in the archive; default: the only one, else the
//! safetensors checkpoint), `model_path` (default `.`), `dtype` (`float32`), `max_seq_len`
//! (default min(context, 2048); Accelerate's `max_length` is read when it is absent),
//! `max_new_tokens` (default 256), `chat_template` (overrides the checkpoint's),
//! `prefill_tokens_per_step`, `draft_model` and `speculate_k` (speculative decoding),
//! `tp_shards` (CPU tensor parallelism), and Accelerate's `device_map`, `max_memory`,
//! `offload_folder`, `low_cpu_mem_usage`, `offload_state_dict` (see [`load_options`]).

mod api;
mod text;

use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cresset_plugin_api::sdk::{settings, BatchContext, Handler, Host, InitContext, StepContext};
use cresset_plugin_api::{Capabilities, PluginError, Request, Response};
use cresset_torch::decoder::{Decoder, DecoderConfig, LayerTarget, LoadOptions, SlotCache};
use cresset_torch::gguf::Gguf;
use cresset_torch::layers::{parse_dtype, HfConfig};
use cresset_torch::sampling::{sample, Rng, SamplingParams};
use cresset_torch::tch::{Device, Kind};
use cresset_torch::tokenizers::Tokenizer;
use cresset_torch::InferenceMode;
use serde_json::Value;

pub use api::{parse, Api, Finish, GenRequest, Prompt};
pub use text::TextStream;

/// A loaded model, its tokenizer and what generation needs from the checkpoint.
pub struct Loaded {
    /// The model.
    pub model: Decoder,
    /// The tokenizer.
    pub tokenizer: Tokenizer,
    /// The chat template (Jinja), if the checkpoint has one.
    pub chat_template: Option<String>,
    /// Token ids that end a sequence.
    pub eos_ids: Vec<i64>,
    /// The BOS token text, for templates.
    pub bos_token: String,
    /// The EOS token text, for templates.
    pub eos_token: String,
    /// A BOS id to put before text prompts (GGUF's `tokenizer.ggml.add_bos_token`); a
    /// `tokenizer.json` adds its own through its post-processor.
    pub add_bos: Option<i64>,
}

/// Decides how a model loads (dtype, devices, layer placement) once its configuration is
/// known and before any weight is read.
pub type Placer<'a> = dyn Fn(&DecoderConfig) -> Result<LoadOptions, PluginError> + 'a;

/// Load a checkpoint folder: a `.gguf` (`model_file`, or the only one; Llama) or a HuggingFace
/// safetensors checkpoint (Llama, GPT-2 or BLOOM), loaded as `place` decides.
pub fn load(
    dir: &Path,
    model_file: Option<&str>,
    place: &Placer<'_>,
) -> Result<Loaded, PluginError> {
    let gguf_path = settings::named_or_only_file(dir, "model_file", model_file, "gguf")?;
    let tokenizer_json = dir.join("tokenizer.json");
    let tokenizer_config: Option<Value> =
        std::fs::read_to_string(dir.join("tokenizer_config.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
    let token_text = |key: &str| -> Option<String> {
        let v = tokenizer_config.as_ref()?.get(key)?;
        v.as_str()
            .or_else(|| v.get("content").and_then(Value::as_str))
            .map(str::to_owned)
    };
    let mut gguf_bos: Option<i64> = None;
    let mut add_bos_id: Option<i64> = None;
    let (model, tokenizer, template, mut eos_ids) = match gguf_path {
        Some(path) => {
            let gguf = Gguf::open(&path).map_err(PluginError::from)?;
            let config = DecoderConfig::from_gguf(&gguf).map_err(PluginError::from)?;
            let model =
                Decoder::load_gguf_with(&gguf, &place(&config)?).map_err(PluginError::from)?;
            let tokenizer = if tokenizer_json.is_file() {
                cresset_torch::load_tokenizer(dir).map_err(PluginError::from)?
            } else {
                gguf.tokenizer().map_err(PluginError::from)?
            };
            let template = gguf
                .get("tokenizer.chat_template")
                .and_then(|v| v.as_str())
                .map(str::to_owned);
            // The end of a turn (Llama 3's `<|eot_id|>`) ends generation too.
            let eos: Vec<i64> = ["eos_token_id", "eot_token_id", "eom_token_id"]
                .iter()
                .filter_map(|k| {
                    gguf.get(&format!("tokenizer.ggml.{k}"))
                        .and_then(|v| v.as_u64())
                })
                .map(|v| v as i64)
                .collect();
            gguf_bos = gguf
                .get("tokenizer.ggml.bos_token_id")
                .and_then(|v| v.as_u64())
                .map(|v| v as i64);
            let add_bos = gguf
                .get("tokenizer.ggml.add_bos_token")
                .is_some_and(|v| *v == cresset_torch::gguf::Value::Bool(true));
            add_bos_id = gguf_bos.filter(|_| add_bos);
            (model, tokenizer, template, eos)
        }
        None => {
            let hf = HfConfig::read(dir).map_err(PluginError::from)?;
            let config = DecoderConfig::from_hf(&hf).map_err(PluginError::from)?;
            let model =
                Decoder::load_with(dir, &hf, &place(&config)?).map_err(PluginError::from)?;
            let tokenizer = cresset_torch::load_tokenizer(dir).map_err(PluginError::from)?;
            let template = token_text("chat_template");
            let eos =
                cresset_torch::gpt2::generation_eos_ids(dir, &hf).map_err(PluginError::from)?;
            (model, tokenizer, template, eos)
        }
    };
    let id_text = |id: i64| tokenizer.id_to_token(id as u32).unwrap_or_default();
    let eos_token = token_text("eos_token")
        .or_else(|| eos_ids.first().map(|&i| id_text(i)))
        .unwrap_or_default();
    let bos_token = token_text("bos_token")
        .or_else(|| gguf_bos.map(id_text))
        .unwrap_or_default();
    if let Some(id) = tokenizer.token_to_id(&eos_token) {
        if !eos_ids.contains(&i64::from(id)) {
            eos_ids.push(i64::from(id));
        }
    }
    Ok(Loaded {
        model,
        tokenizer,
        chat_template: template,
        eos_ids,
        bos_token,
        eos_token,
        add_bos: add_bos_id,
    })
}

/// Render chat messages with a Jinja chat template (HuggingFace's variables: `messages`,
/// `add_generation_prompt`, `bos_token`, `eos_token`).
pub fn render_chat(
    template: &str,
    messages: &[(String, String)],
    bos_token: &str,
    eos_token: &str,
) -> Result<String, PluginError> {
    let mut env = minijinja::Environment::new();
    // HuggingFace templates call Python string and dict methods (`.strip()`, `.items()`).
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env.add_template("chat", template).map_err(|e| {
        PluginError::invalid_input(format!("the chat template does not parse: {e}"))
    })?;
    let messages: Vec<Value> = messages
        .iter()
        .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
        .collect();
    env.get_template("chat")
        .and_then(|t| {
            t.render(minijinja::context! {
                messages => messages,
                add_generation_prompt => true,
                bos_token => bos_token,
                eos_token => eos_token,
            })
        })
        .map_err(|e| {
            PluginError::invalid_input(format!("`messages`: the chat template failed: {e}"))
        })
}

/// The keys that ask for a device map.
const DEVICE_MAP_KEYS: [&str; 3] = ["device_map", "max_memory", "offload_folder"];

/// How to load, from the handler settings: everything on the instance's device, or, with
/// Accelerate's keys (`device_map`, `max_memory`, `offload_folder`), each decoder layer where
/// `cresset-plan` puts it (GPUs, CPU, disk) under the budgets, with headroom for the KV cache
/// at `max_length`. The embeddings, final norm and head stay on the instance's device.
/// `low_cpu_mem_usage` (default: on with a device map, as in transformers) or
/// `offload_state_dict` read the weights layer by layer, placing or offloading each layer
/// before the next is read.
pub fn load_options(
    ctx: &InitContext,
    cfg: &DecoderConfig,
    kind: Kind,
    device: Device,
) -> Result<LoadOptions, PluginError> {
    use cresset_plan::{Budgets, Headroom, Placement};
    let config = &ctx.handler_config;
    let mapped = DEVICE_MAP_KEYS.iter().any(|k| config.get(*k).is_some());
    let mut opts = LoadOptions::new(kind, device);
    opts.low_cpu_mem_usage = settings::boolean(config, "low_cpu_mem_usage", mapped)?
        || settings::boolean(config, "offload_state_dict", false)?;
    if !mapped {
        return Ok(opts);
    }
    let plan_err = |e: cresset_plan::PlanError| PluginError::invalid_input(e.to_string());
    let folder = settings::string(config, "offload_folder")?
        .map(|rel| settings::path_inside(&ctx.model_dir, "offload_folder", rel))
        .transpose()?;
    let budgets = Budgets::from_max_memory(
        config.get("max_memory").unwrap_or(&Value::Null),
        u64::MAX / 4,
        folder.is_some(),
    )
    .map_err(plan_err)?;
    let modules = cfg.modules(kind.elt_size_in_bytes());
    let max_length = settings::integer(config, "max_length", 2048, 1 << 22)? as u64;
    let headroom = Headroom::for_sizes(
        (cfg.kv_heads * cfg.head_dim) as u64,
        cfg.hidden as u64,
        cfg.intermediate as u64,
        max_length,
        kind.elt_size_in_bytes() as u64,
    );
    let plan =
        cresset_plan::plan_from_setting(config.get("device_map"), &modules, &budgets, headroom)
            .map_err(plan_err)?;
    // A plan that names a GPU this process cannot use is refused here, by name, rather than
    // failing inside libtorch.
    let gpus = cresset_torch::tch::Cuda::device_count().max(0) as u32;
    if let Some((module, Placement::Gpu(i))) = plan
        .placements
        .iter()
        .find(|(_, p)| matches!(p, Placement::Gpu(i) if *i >= gpus))
    {
        return Err(PluginError::invalid_input(format!(
            "`device_map`/`max_memory` put {module} on GPU {i}, but this machine has {gpus} usable GPU(s)"
        )));
    }
    opts.layers = vec![LayerTarget::Device(device); cfg.layers as usize];
    let on = |p: Placement| match p {
        Placement::Gpu(i) => Device::Cuda(i as usize),
        _ => Device::Cpu,
    };
    // The modules before the first layer (embeddings) go together, as do those after the last
    // (the final norm and an untied head): each group where its largest module is planned.
    let first_layer = modules.iter().position(|m| m.layer.is_some()).unwrap_or(0);
    let largest = |group: &[cresset_plan::Module]| {
        group
            .iter()
            .filter(|m| m.bytes > 0)
            .max_by_key(|m| m.bytes)
            .and_then(|m| plan.placement(&m.name))
    };
    let last_layer = modules.iter().rposition(|m| m.layer.is_some()).unwrap_or(0);
    if let Some(p) = largest(&modules[..first_layer]) {
        opts.embeddings = Some(on(p));
    }
    if let Some(p) = largest(&modules[last_layer + 1..]) {
        opts.head = Some(on(p));
    }
    for module in &modules {
        let placement = plan.placement(&module.name).unwrap_or(Placement::Cpu);
        match module.layer {
            Some(l) => {
                opts.layers[l] = match placement {
                    Placement::Disk => LayerTarget::Disk,
                    p => LayerTarget::Device(on(p)),
                }
            }
            None if placement == Placement::Disk && module.bytes > 0 => {
                return Err(PluginError::invalid_input(format!(
                    "`device_map`: {} is mapped to disk; only decoder layers can be offloaded",
                    module.name
                )))
            }
            None => {}
        }
    }
    // One subfolder per instance: each writes and maps its own files, so that an instance
    // never rewrites a file another has mapped.
    opts.offload_folder = folder.map(|f| f.join(format!("instance-{}", ctx.assignment.index)));
    tracing::info!(model = %ctx.model_name, "device map:\n{}", plan.render(&budgets));
    Ok(opts)
}

/// One sequence: waiting for a slot, prefilling, or decoding.
struct Sequence {
    /// The request's index (numbered across calls).
    index: usize,
    /// The request id, for OpenAI's `id`.
    id: String,
    created: u64,
    request: GenRequest,
    prompt: Vec<i64>,
    /// Prompt tokens already in the cache.
    prefilled: usize,
    slot: usize,
    max_new: usize,
    history: Vec<i64>,
    generated: usize,
    rng: Rng,
    text: TextStream,
    finish: Option<Finish>,
    started: Instant,
    first_token_at: Option<Instant>,
    chunks_sent: usize,
}

impl Sequence {
    fn decoding(&self) -> bool {
        self.finish.is_none() && self.prefilled == self.prompt.len()
    }

    fn params(&self) -> SamplingParams {
        let r = &self.request;
        SamplingParams {
            temperature: r.temperature as f32,
            top_k: r.top_k as usize,
            top_p: r.top_p as f32,
            repetition_penalty: r.repetition_penalty as f32,
        }
    }
}

/// A draft model for speculative decoding: the same vocabulary, its own cache slots.
struct Draft {
    model: Decoder,
    cache: SlotCache,
    k: usize,
    drafted: u64,
    accepted: u64,
}

/// The GPT handler.
pub struct GptHandler {
    loaded: Loaded,
    cache: SlotCache,
    max_new_tokens: usize,
    /// Prompt tokens prefilled per step, across sequences (chunked prefill).
    prefill_budget: usize,
    running: Vec<Sequence>,
    waiting: std::collections::VecDeque<Sequence>,
    draft: Option<Draft>,
    free_slots: Vec<usize>,
    host: Host,
    model_name: String,
    /// This worker's index, as a metric label.
    instance: String,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl GptHandler {
    /// The model.
    pub fn model(&self) -> &Decoder {
        &self.loaded.model
    }

    fn prompt_ids(&self, request: &GenRequest) -> Result<Vec<i64>, PluginError> {
        // A text prompt gets the special tokens its tokenizer adds (BOS, for most); a rendered
        // chat has them from its template already.
        let (text, specials) = match &request.prompt {
            Prompt::Text(t) => (t.clone(), true),
            Prompt::Chat(messages) => {
                let template = self.loaded.chat_template.as_deref().ok_or_else(|| {
                    PluginError::invalid_input(
                        "this model has no chat template; use /v1/completions or set `handler.chat_template`",
                    )
                })?;
                let loaded = &self.loaded;
                (
                    render_chat(template, messages, &loaded.bos_token, &loaded.eos_token)?,
                    false,
                )
            }
        };
        let encoding =
            self.loaded.tokenizer.encode(text, specials).map_err(|e| {
                PluginError::invalid_input(format!("cannot tokenize the prompt: {e}"))
            })?;
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
        if let Some(bos) = self.loaded.add_bos.filter(|_| specials) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        if ids.is_empty() {
            return Err(PluginError::invalid_input("the prompt has no tokens"));
        }
        let vocab = self.loaded.model.config.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(PluginError::invalid_input(format!(
                "the prompt has token {bad}, outside the model's vocabulary of {vocab}"
            )));
        }
        Ok(ids)
    }

    fn admit(&self, index: usize, request: &Request) -> Result<Sequence, PluginError> {
        let gen = api::parse(request)?;
        let ids = self.prompt_ids(&gen)?;
        let capacity = self.cache.capacity as usize;
        if ids.len() >= capacity {
            return Err(PluginError::invalid_input(format!(
                "the prompt is {} tokens long; the context holds {capacity}",
                ids.len()
            )));
        }
        let max_new = gen
            .max_new_tokens
            .map(|n| n as usize)
            .unwrap_or(self.max_new_tokens);
        // As OpenAI servers do, a budget that does not fit is cut to what the context holds.
        let max_new = max_new.min(capacity - ids.len());
        Ok(Sequence {
            index,
            id: request.id.to_string(),
            created: now_secs(),
            rng: gen.seed.map(Rng::seeded).unwrap_or_else(Rng::from_entropy),
            text: TextStream::new(gen.stop.clone()),
            finish: (max_new == 0).then_some(Finish::Length),
            request: gen,
            history: ids.clone(),
            prompt: ids,
            prefilled: 0,
            slot: usize::MAX,
            max_new,
            generated: 0,
            started: Instant::now(),
            first_token_at: None,
            chunks_sent: 0,
        })
    }

    /// Pick and record the next token of `seq` from its logits; stream what can be released.
    fn advance(&self, seq: &mut Sequence, mut logits: Vec<f32>, ctx: &mut StepContext<'_, '_>) {
        let params = seq.params();
        let token = sample(&mut logits, &params, &seq.history, &mut seq.rng);
        self.emit(seq, token, ctx);
    }

    /// Record the next token of `seq`; stream what can be released; note why it ends, if it does.
    fn emit(&self, seq: &mut Sequence, token: i64, ctx: &mut StepContext<'_, '_>) {
        seq.history.push(token);
        seq.generated += 1;
        if seq.first_token_at.is_none() {
            seq.first_token_at = Some(Instant::now());
        }
        let eos = self.loaded.eos_ids.contains(&token);
        let mut piece = if eos {
            String::new()
        } else {
            seq.text.push(&self.loaded.tokenizer, token as u32)
        };
        if eos || seq.text.stopped() {
            seq.finish = Some(Finish::Stop);
        } else if seq.generated >= seq.max_new {
            seq.finish = Some(Finish::Length);
        }
        if seq.finish.is_some() {
            // Release what was held back in case it began a stop string.
            piece.push_str(&seq.text.finish(&self.loaded.tokenizer));
        }
        if seq.request.stream && !piece.is_empty() {
            let meta = api::Meta {
                id: &seq.id,
                created: seq.created,
                model: &self.model_name,
            };
            let chunk = match api::chunk(seq.request.api, &meta, &piece, seq.chunks_sent == 0) {
                Some(v) => Response::json(&v),
                None => Ok(Response::ok(
                    "text/plain; charset=utf-8",
                    piece.into_bytes(),
                )),
            };
            if let Ok(chunk) = chunk {
                seq.chunks_sent += 1;
                if !ctx.send_chunk(seq.index, chunk) {
                    seq.finish = Some(Finish::Stop);
                }
            }
        }
    }

    fn answer(&self, seq: &Sequence) -> Result<Response, PluginError> {
        let meta = api::Meta {
            id: &seq.id,
            created: seq.created,
            model: &self.model_name,
        };
        let finish = seq.finish.unwrap_or(Finish::Length);
        let (prompt, completion) = (seq.prompt.len(), seq.generated);
        if seq.request.stream {
            return match api::stream_end(
                seq.request.api,
                &meta,
                finish,
                prompt,
                completion,
                seq.request.include_usage,
            ) {
                Some(v) => Response::json(&v),
                None => Ok(Response::ok("text/plain; charset=utf-8", Vec::new())),
            };
        }
        Response::json(&api::whole(
            seq.request.api,
            &meta,
            seq.text.text(),
            finish,
            prompt,
            completion,
        ))
    }

    fn observe(&self, seq: &Sequence) {
        let h = &self.host;
        h.counter(
            "cresset_generated_tokens_total",
            "Tokens generated",
            &[],
            seq.generated as f64,
        );
        if let Some(first) = seq.first_token_at {
            h.observe(
                "cresset_time_to_first_token_seconds",
                "From a sequence's arrival at the instance to its first token",
                &[],
                (first - seq.started).as_secs_f64(),
            );
            if seq.generated > 1 {
                h.observe(
                    "cresset_time_per_output_token_seconds",
                    "Mean time per generated token after the first",
                    &[],
                    first.elapsed().as_secs_f64() / (seq.generated - 1) as f64,
                );
            }
        }
    }

    fn gauges(&self) {
        let h = &self.host;
        let instance = [("instance", self.instance.as_str())];
        let (running, waiting) = (self.running.len() as f64, self.waiting.len() as f64);
        h.gauge(
            "cresset_running_sequences",
            "Sequences holding a KV-cache slot",
            &instance,
            running,
        );
        h.gauge(
            "cresset_waiting_sequences",
            "Sequences waiting for a KV-cache slot",
            &instance,
            waiting,
        );
        h.gauge(
            "cresset_kv_slots_used_ratio",
            "Share of the KV-cache slots in use",
            &instance,
            running / self.cache.slots().max(1) as f64,
        );
    }

    /// Speculative decoding for `rows` (indices into `running`): the draft proposes up to k
    /// tokens per row, one forward pass of the target checks them all, and each row keeps the
    /// longest accepted prefix plus one token of the target's (speculative sampling's rule, so
    /// greedy output is the target's own and sampled output has the target's distribution).
    fn speculate(
        &mut self,
        rows: &[usize],
        ctx: &mut StepContext<'_, '_>,
    ) -> Result<(), PluginError> {
        use cresset_torch::sampling::{accept_or_replace, distribution, draw};
        let Some(draft) = self.draft.as_mut() else {
            return Ok(());
        };
        let slots: Vec<usize> = rows.iter().map(|&k| self.running[k].slot).collect();
        // Both caches hold each sequence but its last token, which is fed now; the target takes
        // k + 1 positions this step.
        let room = slots
            .iter()
            .map(|&s| (self.cache.capacity - self.cache.lens[s] - 1).max(0) as usize)
            .min()
            .unwrap_or(0);
        let k = draft.k.min(room);
        let lasts: Vec<i64> = rows
            .iter()
            .map(|&r| self.running[r].history.last().copied().unwrap_or(0))
            .collect();
        let mut fed: Vec<Vec<i64>> = lasts.iter().map(|&t| vec![t]).collect();
        let mut drafts: Vec<Vec<i64>> = vec![Vec::new(); rows.len()];
        let mut draft_dists: Vec<Vec<Vec<f64>>> = vec![Vec::new(); rows.len()];
        for _ in 0..k {
            let logits = draft
                .model
                .forward(&slots, &fed, &mut draft.cache, true)
                .and_then(|l| {
                    Ok(Vec::<Vec<f32>>::try_from(
                        l.to_kind(Kind::Float).squeeze_dim(1),
                    )?)
                })
                .map_err(PluginError::from)?;
            for (i, mut row) in logits.into_iter().enumerate() {
                let seq = &mut self.running[rows[i]];
                let mut history = seq.history.clone();
                history.extend(&drafts[i]);
                let q = distribution(&mut row, &seq.params(), &history);
                let order: Vec<usize> = (0..q.len()).collect();
                let d = draw(&order, &q, &mut seq.rng);
                drafts[i].push(d);
                draft_dists[i].push(q);
                fed[i] = vec![d];
            }
        }
        // The target checks the fed token and every draft in one pass.
        let tokens: Vec<Vec<i64>> = lasts
            .iter()
            .zip(&drafts)
            .map(|(&t, d)| std::iter::once(t).chain(d.iter().copied()).collect())
            .collect();
        let before: Vec<i64> = slots.iter().map(|&s| self.cache.lens[s]).collect();
        let logits = self
            .loaded
            .model
            .forward(&slots, &tokens, &mut self.cache, false)
            .and_then(|l| Ok(Vec::<Vec<Vec<f32>>>::try_from(l.to_kind(Kind::Float))?))
            .map_err(PluginError::from)?;
        let mut catch_up: Vec<(usize, i64)> = Vec::new();
        let (mut drafted, mut accepted_total) = (0u64, 0u64);
        for (i, mut positions) in logits.into_iter().enumerate() {
            let r = rows[i];
            let mut seq = std::mem::replace(&mut self.running[r], placeholder());
            let mut accepted = 0;
            let mut replacement: Option<i64> = None;
            for j in 0..k {
                let mut history = seq.history.clone();
                history.extend(&drafts[i][..j]);
                let p = distribution(&mut positions[j], &seq.params(), &history);
                match accept_or_replace(drafts[i][j] as usize, &p, &draft_dists[i][j], &mut seq.rng)
                {
                    Ok(()) => accepted += 1,
                    Err(t) => {
                        replacement = Some(t);
                        break;
                    }
                }
            }
            let next = match replacement {
                Some(t) => t,
                None => {
                    // Every draft accepted: the target's own next token comes free.
                    let mut history = seq.history.clone();
                    history.extend(&drafts[i]);
                    let params = seq.params();
                    sample(&mut positions[k], &params, &history, &mut seq.rng)
                }
            };
            drafted += k as u64;
            accepted_total += accepted as u64;
            // Keep the fed token and the accepted drafts; the new token is fed next step.
            let slot = slots[i];
            self.cache.lens[slot] = before[i] + 1 + accepted as i64;
            if accepted == k && k > 0 {
                // The draft never saw its own last proposal: it is fed before the next round.
                catch_up.push((slot, drafts[i][k - 1]));
            }
            for &t in drafts[i][..accepted].iter().chain(std::iter::once(&next)) {
                if seq.finish.is_some() {
                    break;
                }
                self.emit(&mut seq, t, ctx);
            }
            self.running[r] = seq;
        }
        let Some(draft) = self.draft.as_mut() else {
            return Ok(());
        };
        for (i, &slot) in slots.iter().enumerate() {
            let kept = self.cache.lens[slot];
            draft.cache.lens[slot] = kept.min(before[i] + k as i64);
        }
        if !catch_up.is_empty() {
            let slots: Vec<usize> = catch_up.iter().map(|c| c.0).collect();
            let tokens: Vec<Vec<i64>> = catch_up.iter().map(|c| vec![c.1]).collect();
            let _logits = draft
                .model
                .forward(&slots, &tokens, &mut draft.cache, true)
                .map_err(PluginError::from)?;
        }
        draft.drafted += drafted;
        draft.accepted += accepted_total;
        if draft.drafted > 0 {
            self.host.gauge(
                "cresset_speculative_acceptance_ratio",
                "Drafted tokens the target accepted, since start",
                &[],
                draft.accepted as f64 / draft.drafted as f64,
            );
        }
        Ok(())
    }

    /// The draft's acceptance so far: (accepted, drafted), if a draft model is configured.
    pub fn speculation(&self) -> Option<(u64, u64)> {
        self.draft.as_ref().map(|d| (d.accepted, d.drafted))
    }

    /// Sequences waiting or running (for tests).
    pub fn in_flight(&self) -> usize {
        self.running.len() + self.waiting.len()
    }

    /// One scheduling step: admit, prefill within the token budget, decode every running
    /// sequence in one forward pass, retire the finished.
    fn schedule(&mut self, ctx: &mut StepContext<'_, '_>) -> Result<(), PluginError> {
        // Clients that went away free their slot (or their place in line) now.
        for seq in self.running.iter_mut().chain(self.waiting.iter_mut()) {
            if seq.finish.is_none() && ctx.is_cancelled(seq.index) {
                seq.finish = Some(Finish::Stop);
            }
        }
        // Into free slots, lowest first, in arrival order.
        while !self.free_slots.is_empty() && !self.waiting.is_empty() {
            let Some(mut seq) = self.waiting.pop_front() else {
                break;
            };
            if seq.finish.is_some() {
                self.running.push(seq);
                continue;
            }
            seq.slot = self.free_slots.remove(0);
            self.cache.lens[seq.slot] = 0;
            if let Some(draft) = self.draft.as_mut() {
                draft.cache.lens[seq.slot] = 0;
            }
            self.running.push(seq);
        }
        // Prefill, at most `prefill_budget` prompt tokens this step (a long prompt takes several
        // steps, so that it does not stall the others' decoding).
        let mut budget = self.prefill_budget;
        for k in 0..self.running.len() {
            let seq = &self.running[k];
            if seq.finish.is_some() || seq.prefilled == seq.prompt.len() || budget == 0 {
                continue;
            }
            let take = (seq.prompt.len() - seq.prefilled).min(budget);
            budget -= take;
            let chunk = seq.prompt[seq.prefilled..seq.prefilled + take].to_vec();
            let (slot, done) = (seq.slot, seq.prefilled + take == seq.prompt.len());
            let logits = self
                .loaded
                .model
                .forward(&[slot], &[chunk], &mut self.cache, true)
                .and_then(|l| Ok(Vec::<f32>::try_from(l.to_kind(Kind::Float).view([-1]))?))
                .map_err(PluginError::from)?;
            if let Some(draft) = self.draft.as_mut() {
                let chunk = self.running[k].prompt[self.running[k].prefilled..][..take].to_vec();
                let _logits = draft
                    .model
                    .forward(&[slot], &[chunk], &mut draft.cache, true)
                    .map_err(PluginError::from)?;
            }
            self.running[k].prefilled += take;
            if done {
                // Its first token comes from the prefill's last position.
                let mut seq = std::mem::replace(&mut self.running[k], placeholder());
                self.advance(&mut seq, logits, ctx);
                self.running[k] = seq;
            }
        }
        // Decode every sequence that has a token to feed, in one pass (by slot order, so that
        // slots 0..n read their cache as a view).
        let mut rows: Vec<usize> = (0..self.running.len())
            .filter(|&k| self.running[k].decoding() && self.running[k].generated > 0)
            .collect();
        rows.sort_by_key(|&k| self.running[k].slot);
        if !rows.is_empty() && self.draft.is_some() {
            self.speculate(&rows, ctx)?;
        } else if !rows.is_empty() {
            let slots: Vec<usize> = rows.iter().map(|&k| self.running[k].slot).collect();
            let tokens: Vec<Vec<i64>> = rows
                .iter()
                .map(|&k| vec![self.running[k].history.last().copied().unwrap_or(0)])
                .collect();
            let all = self
                .loaded
                .model
                .forward(&slots, &tokens, &mut self.cache, true)
                .and_then(|l| {
                    Ok(Vec::<Vec<f32>>::try_from(
                        l.to_kind(Kind::Float).squeeze_dim(1),
                    )?)
                })
                .map_err(PluginError::from)?;
            let mut taken: Vec<Sequence> = Vec::new();
            for &k in &rows {
                taken.push(std::mem::replace(&mut self.running[k], placeholder()));
            }
            for (seq, logits) in taken.iter_mut().zip(all) {
                self.advance(seq, logits, ctx);
            }
            for (&k, seq) in rows.iter().zip(taken) {
                self.running[k] = seq;
            }
        }
        // Retire the finished; their slots go back.
        let mut k = 0;
        while k < self.running.len() {
            if self.running[k].finish.is_some() {
                let seq = self.running.swap_remove(k);
                self.observe(&seq);
                if seq.slot != usize::MAX {
                    let at = self.free_slots.partition_point(|&s| s < seq.slot);
                    self.free_slots.insert(at, seq.slot);
                }
                let answer = if ctx.is_cancelled(seq.index) {
                    Err(PluginError::new(
                        cresset_plugin_api::ErrorCode::CANCELLED,
                        "cancelled",
                    ))
                } else {
                    self.answer(&seq)
                };
                ctx.send_final(seq.index, answer);
            } else {
                k += 1;
            }
        }
        self.gauges();
        Ok(())
    }
}

/// An empty sequence, to move real ones out of the running list briefly.
fn placeholder() -> Sequence {
    Sequence {
        index: usize::MAX,
        id: String::new(),
        created: 0,
        request: GenRequest {
            api: Api::TorchServe,
            prompt: Prompt::Text(String::new()),
            max_new_tokens: None,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: None,
            stop: Vec::new(),
            stream: false,
            include_usage: false,
        },
        prompt: Vec::new(),
        prefilled: 0,
        slot: usize::MAX,
        max_new: 0,
        history: Vec::new(),
        generated: 0,
        rng: Rng::seeded(0),
        text: TextStream::new(Vec::new()),
        finish: Some(Finish::Stop),
        started: Instant::now(),
        first_token_at: None,
        chunks_sent: 0,
    }
}

impl Handler for GptHandler {
    const NAME: &'static str = "gpt";
    const SUMMARY: &'static str =
        "Text generation (Llama from safetensors or GGUF, GPT-2, BLOOM), streaming, continuous batching, speculative decoding, tensor parallelism, OpenAI-compatible";
    const CAPABILITIES: Capabilities =
        Capabilities(Capabilities::STREAMING.0 | Capabilities::CONTINUOUS_BATCHING.0);
    type Input = ();
    type Output = ();

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        let config = &ctx.handler_config;
        let dir = settings::folder_inside(&ctx.model_dir, config, "model_path")?;
        let kind = parse_dtype(settings::string(config, "dtype")?.unwrap_or("float32"))
            .map_err(PluginError::from)?;
        let device = cresset_torch::instance_device(ctx);
        let place = |cfg: &DecoderConfig| load_options(ctx, cfg, kind, device);
        let mut loaded = load(&dir, settings::string(config, "model_file")?, &place)?;
        // Tensor parallelism (`parallel_type = "tp"`): one shard per assigned GPU, or
        // `handler.tp_shards` shards on the CPU.
        if ctx
            .model_config
            .get("parallel_type")
            .and_then(Value::as_str)
            == Some("tp")
        {
            let devices: Vec<Device> = match device {
                Device::Cuda(_) => ctx
                    .assignment
                    .device_ids
                    .iter()
                    .filter_map(|&id| usize::try_from(id).ok().map(Device::Cuda))
                    .collect(),
                _ => vec![Device::Cpu; settings::integer(config, "tp_shards", 2, 64)?],
            };
            loaded.model = loaded.model.shard(&devices)?;
            tracing::info!(model = %ctx.model_name, shards = devices.len(), "tensor parallel");
        }
        if let Some(t) = settings::string(config, "chat_template")? {
            loaded.chat_template = Some(t.to_owned());
        }
        let draft_loaded = match settings::string(config, "draft_model")? {
            None => None,
            Some(rel) => {
                let path = settings::path_inside(&ctx.model_dir, "draft_model", rel)?;
                let (dir, file) = if path.is_file() {
                    let name = path.file_name().and_then(|n| n.to_str()).map(str::to_owned);
                    (
                        path.parent().map(Path::to_path_buf).unwrap_or_default(),
                        name,
                    )
                } else {
                    (path, None)
                };
                let everything_here = |_: &DecoderConfig| Ok(LoadOptions::new(kind, device));
                let draft = load(&dir, file.as_deref(), &everything_here)?;
                if draft.model.config.vocab_size != loaded.model.config.vocab_size {
                    return Err(PluginError::invalid_input(format!(
                        "`handler.draft_model` has a vocabulary of {} tokens; the model has {}: a draft must share the vocabulary",
                        draft.model.config.vocab_size, loaded.model.config.vocab_size
                    )));
                }
                Some(draft)
            }
        };
        // The context per slot: what both the model and its draft can hold.
        let context = draft_loaded
            .as_ref()
            .map(|d| d.model.config.max_positions)
            .unwrap_or(i64::MAX)
            .min(loaded.model.config.max_positions) as usize;
        // Accelerate's `max_length` (prompt and generated tokens) is this handler's
        // `max_seq_len`; an explicit `max_seq_len` wins.
        let length_key = match (config.get("max_seq_len"), config.get("max_length")) {
            (None, Some(_)) => "max_length",
            _ => "max_seq_len",
        };
        let max_seq_len = settings::integer(config, length_key, context.min(2048), context)?;
        let slots = ctx
            .model_config
            .get("batch_size")
            .and_then(Value::as_u64)
            .unwrap_or(1)
            .clamp(1, 256) as usize;
        let cache = loaded.model.new_cache(slots, max_seq_len as i64);
        let draft = match draft_loaded {
            None => None,
            Some(draft) => Some(Draft {
                cache: draft.model.new_cache(slots, max_seq_len as i64),
                model: draft.model,
                k: settings::integer(config, "speculate_k", 4, 16)?,
                drafted: 0,
                accepted: 0,
            }),
        };
        tracing::info!(model = %ctx.model_name, slots, max_seq_len, ?device, "gpt model loaded");
        Ok(Self {
            loaded,
            cache,
            max_new_tokens: settings::integer(config, "max_new_tokens", 256, 1 << 20)?,
            prefill_budget: settings::integer(config, "prefill_tokens_per_step", 512, 1 << 20)?,
            running: Vec::new(),
            waiting: std::collections::VecDeque::new(),
            draft,
            free_slots: (0..slots).collect(),
            host: ctx.host.clone(),
            model_name: ctx.model_name.clone(),
            instance: ctx.assignment.index.to_string(),
        })
    }

    fn preprocess(&mut self, _request: &Request) -> Result<(), PluginError> {
        Ok(())
    }

    fn inference(
        &mut self,
        batch: Vec<()>,
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<()>, PluginError> {
        Ok(batch)
    }

    fn postprocess(&mut self, _output: ()) -> Result<Response, PluginError> {
        Err(PluginError::internal("the gpt handler answers in `step`"))
    }

    fn step(
        &mut self,
        new: &[Request],
        first_index: usize,
        ctx: &mut StepContext<'_, '_>,
    ) -> Result<(), PluginError> {
        let _mode = InferenceMode::enter();
        for (k, request) in new.iter().enumerate() {
            match self.admit(first_index + k, request) {
                Ok(seq) => self.waiting.push_back(seq),
                Err(e) => ctx.send_final(first_index + k, Err(e)),
            }
        }
        let result = self.schedule(ctx);
        if result.is_err() {
            // The cache may be half-written: every sequence ends with the error.
            for seq in self.running.drain(..).chain(self.waiting.drain(..)) {
                if seq.slot != usize::MAX {
                    self.free_slots.push(seq.slot);
                }
            }
            self.free_slots.sort_unstable();
        }
        result
    }
}
