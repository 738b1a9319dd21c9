//! [`GptHandler`]: the SDK's [`StepHandler`] over the engine. `initialize` reads the settings,
//! loads the model (and its draft), sizes the KV cache and starts the tokenizer thread; `step`
//! hands the new requests to admission, gives the engine those whose tokens are ready (and
//! answers those refused), and runs one scheduling step.

use std::sync::Arc;

use cresset_plugin_api::sdk::{InitContext, StepContext, StepHandler};
use cresset_plugin_api::{Capabilities, PluginError, Request};
use cresset_torch::decoder::{Decoder, DecoderConfig, LoadOptions};
use cresset_torch::tch::Device;
use cresset_torch::InferenceMode;

use crate::admission::Admissions;
use crate::config::{AttentionBackend, Settings};
use crate::device_map::load_options;
use crate::engine::{Draft, Engine, Identity};
use crate::load::{load, Loaded, NamedTokenizer};
use crate::prompt::{ChatTemplate, Limits, PromptEncoder, TokenizingHeld};

/// The GPT handler.
pub struct GptHandler {
    prompts: Arc<PromptEncoder>,
    admissions: Admissions,
    engine: Engine,
    /// libtorch threads the host assigned this worker.
    threads: u32,
}

impl GptHandler {
    /// The model.
    pub fn model(&self) -> &Decoder {
        self.engine.model()
    }

    /// The draft's acceptance so far: (accepted, drafted), if a draft model is configured.
    pub fn speculation(&self) -> Option<(u64, u64)> {
        self.engine.speculation()
    }

    /// The draft model, if one is configured.
    pub fn draft_model(&self) -> Option<&Decoder> {
        self.engine.draft_model()
    }

    /// Requests being tokenized, waiting or running (for tests).
    pub fn in_flight(&self) -> usize {
        self.admissions.in_flight() + self.engine.in_flight()
    }

    /// The longest prompt, in bytes, that may fit the context; a longer one is refused without
    /// being tokenized (`None`: this tokenizer puts no bound on the bytes of a token).
    pub fn max_prompt_bytes(&self) -> Option<usize> {
        self.prompts.max_prompt_bytes()
    }

    /// Prompts tokenized so far (for tests).
    pub fn prompts_tokenized(&self) -> u64 {
        self.prompts.tokenized()
    }

    /// Hold tokenizing, wherever it runs, until the returned guard is dropped (at most 30 s):
    /// for tests that watch the step loop while a prompt is being tokenized.
    pub fn hold_tokenizing(&self) -> TokenizingHeld {
        self.prompts.hold_tokenizing()
    }
}

impl StepHandler for GptHandler {
    const NAME: &'static str = "gpt";
    const SUMMARY: &'static str =
        "Text generation (Llama from safetensors or GGUF, GPT-2, BLOOM), streaming, continuous batching, speculative decoding, tensor parallelism, OpenAI-compatible";
    const CAPABILITIES: Capabilities = Capabilities::STREAMING;
    type Model = ();

    fn initialize(_: &Arc<()>, ctx: &InitContext) -> Result<Self, PluginError> {
        let settings = Settings::read(ctx)?;
        let (kind, device) = (settings.kind, settings.device);
        let split = settings.shards.is_some();
        let place = |cfg: &DecoderConfig| {
            let mut opts = load_options(ctx, &settings.keys, cfg, kind, device)?;
            settings.quantize.apply(&mut opts, split);
            Ok(opts)
        };
        // Read once: the model and its draft share it.
        let named = settings
            .tokenizer
            .as_deref()
            .map(NamedTokenizer::read)
            .transpose()?;
        let tokenizer = named.as_ref();
        let mut loaded = load(
            &settings.dir,
            settings.model_file.as_deref(),
            tokenizer,
            &place,
        )?;
        if let Some(devices) = &settings.shards {
            loaded.model = loaded.model.shard(devices)?;
            tracing::info!(model = %ctx.model_name, shards = devices.len(), "tensor parallel");
        }
        if let Some(t) = &settings.chat_template {
            loaded.chat_template = Some(t.clone());
        }
        let draft_loaded = match &settings.draft {
            None => None,
            Some(d) => {
                let everything_here = |_: &DecoderConfig| {
                    let mut opts = LoadOptions::new(kind, device);
                    settings.quantize.apply(&mut opts, false);
                    Ok(opts)
                };
                let draft = load(&d.dir, d.file.as_deref(), tokenizer, &everything_here)?;
                if draft.model.config.vocab_size != loaded.model.config.vocab_size {
                    return Err(PluginError::invalid_input(format!(
                        "`handler.draft_model` has a vocabulary of {} tokens; the model has {}: a draft must share the vocabulary",
                        draft.model.config.vocab_size, loaded.model.config.vocab_size
                    )));
                }
                Some((draft.model, d.k))
            }
        };
        // The context per slot: what both the model and its draft can hold.
        let context = draft_loaded
            .as_ref()
            .map(|(model, _)| model.config.max_positions)
            .unwrap_or(i64::MAX)
            .min(loaded.model.config.max_positions) as usize;
        let max_seq_len = settings.max_seq_len(context)?;
        let slots = settings.slots;
        let cache = loaded.model.new_cache(slots, max_seq_len as i64);
        let draft = draft_loaded.map(|(model, k)| Draft::new(model, slots, max_seq_len as i64, k));
        let Loaded {
            model,
            tokenizer,
            chat_template,
            eos_ids,
            bos_token,
            eos_token,
            add_bos,
        } = loaded;
        let limits = Limits {
            capacity: cache.capacity as usize,
            max_new_tokens: settings.max_new_tokens,
            vocab_size: model.config.vocab_size,
            sampling: settings.sampling,
        };
        let chat = ChatTemplate {
            template: chat_template,
            bos_token,
            eos_token,
        };
        let prompts = Arc::new(PromptEncoder::new(tokenizer, chat, add_bos, limits));
        let max_prompt_bytes = prompts.max_prompt_bytes();
        tracing::info!(
            model = %ctx.model_name, slots, max_seq_len, ?max_prompt_bytes, ?device, ?kind,
            quantized = model.is_quantized(),
            weights_mib = model.resident_bytes() >> 20,
            "gpt model loaded"
        );
        let admissions = Admissions::start(
            Arc::clone(&prompts),
            slots,
            format!("prompts-{}", ctx.assignment.index),
        )?;
        let identity = Identity {
            host: ctx.host.clone(),
            model_name: ctx.model_name.clone(),
            instance: ctx.assignment.index.to_string(),
            plain_text: settings.plain_text,
        };
        let mut engine = Engine::new(
            model,
            eos_ids,
            Arc::clone(&prompts),
            cache,
            settings.prefill_budget,
            draft,
            identity,
        );
        if matches!(device, Device::Cuda(_)) {
            gpu_settings(&mut engine, &settings, &ctx.model_name)?;
        }
        Ok(Self {
            prompts,
            admissions,
            engine,
            threads: ctx.assignment.intra_op_threads,
        })
    }

    fn step(
        &mut self,
        new: &[Request],
        first_index: usize,
        ctx: &mut StepContext<'_, '_>,
    ) -> Result<(), PluginError> {
        let _batch = cresset_torch::threads::Batch::enter(self.threads);
        let _mode = InferenceMode::enter();
        for (k, request) in new.iter().enumerate() {
            self.admissions.submit(first_index + k, request);
        }
        // With nothing else to do, the step may wait a little for the tokenizer thread.
        let idle = self.engine.is_idle();
        for admission in self.admissions.collect(|i| ctx.is_cancelled(i), idle) {
            match admission.outcome {
                Ok(prepared) => {
                    self.engine
                        .enqueue(admission.index, admission.id, admission.arrived, prepared)
                }
                Err(e) => ctx.send_final(admission.index, Err(e)),
            }
        }
        let result = self.engine.schedule(ctx);
        if result.is_err() {
            self.engine.abort();
            self.admissions.abandon();
        }
        result
    }
}

/// A GPU model's attention kernels (`attention_backend`) and its decode path: steps in
/// repeating shapes replayed as CUDA graphs captured now (`cuda_graphs`), where the model is
/// wholly on one GPU without a draft; eager steps otherwise.
fn gpu_settings(
    engine: &mut Engine,
    settings: &Settings,
    model_name: &str,
) -> Result<(), PluginError> {
    use cresset_torch::cuda_graph::{set_sdp_backends, SdpBackends};
    let backends = match settings.attention {
        AttentionBackend::Auto => None,
        AttentionBackend::Efficient => Some(SdpBackends {
            flash: false,
            efficient: true,
            math: true,
            cudnn: false,
        }),
        AttentionBackend::Math => Some(SdpBackends {
            flash: false,
            efficient: false,
            math: true,
            cudnn: false,
        }),
    };
    if let Some(backends) = backends {
        set_sdp_backends(backends)
            .map_err(|why| PluginError::internal(format!("`handler.attention_backend`: {why}")))?;
    }
    let graphs = settings.cuda_graphs && engine.use_cuda_graphs().map_err(PluginError::from)?;
    tracing::info!(
        model = %model_name,
        cuda_graphs = graphs,
        "decode steps {}",
        match (settings.cuda_graphs, graphs) {
            (_, true) => "replay CUDA graphs",
            (true, false) => "run eagerly: the model cannot be captured (see the log above)",
            (false, false) => "run eagerly (`cuda_graphs = false`)",
        }
    );
    Ok(())
}
