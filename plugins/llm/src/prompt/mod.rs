//! From a request to the token ids of its prompt: parse it ([`api::parse`]), render chat
//! messages with the model's template, refuse a prompt too long in bytes to fit the context
//! (before tokenizing it: see [`byte_bound`]), tokenize, and check that the tokens fit.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use cresset_plugin_api::{PluginError, Request};
use cresset_torch::tokenizers::Tokenizer;
use serde_json::Value;

mod byte_bound;

use crate::api::{self, GenRequest, Prompt};

/// A request ready to generate: its parsed form, its prompt's tokens and its token budget.
pub(crate) struct Prepared {
    /// The parsed request.
    pub request: GenRequest,
    /// The prompt's token ids.
    pub ids: Vec<i64>,
    /// Most new tokens: asked for (or the default), cut to what the context holds.
    pub max_new: usize,
}

/// A checkpoint's chat template and the special-token texts it may use.
pub(crate) struct ChatTemplate {
    /// The Jinja template, if the checkpoint (or `handler.chat_template`) has one.
    pub template: Option<String>,
    /// The BOS token text.
    pub bos_token: String,
    /// The EOS token text.
    pub eos_token: String,
}

/// How long prompts and generations may be, in tokens.
pub(crate) struct Limits {
    /// Positions per KV-cache slot: a prompt must leave room for one new token.
    pub capacity: usize,
    /// Most new tokens when a request does not say.
    pub max_new_tokens: usize,
    /// The model's vocabulary: ids at or above it are refused.
    pub vocab_size: i64,
    /// Sampling for requests that choose none.
    pub sampling: crate::config::SamplingDefaults,
}

/// What turns prompts into tokens: the tokenizer, the chat template and the limits.
pub(crate) struct PromptEncoder {
    tokenizer: Tokenizer,
    chat: ChatTemplate,
    /// A BOS id to put before text prompts (see [`crate::Loaded::add_bos`]).
    add_bos: Option<i64>,
    limits: Limits,
    /// The most prompt bytes one token stands for (`None`: the tokenizer has no such bound).
    bytes_per_token: Option<usize>,
    /// Prompts tokenized so far.
    tokenized: AtomicU64,
    /// Tokenizing waits while this is held (for tests).
    hold: Arc<Hold>,
}

/// How long tokenizing waits at most for a hold to be released.
const HOLD_LIMIT: Duration = Duration::from_secs(30);

/// Whether tokenizing is held.
#[derive(Default)]
struct Hold {
    held: Mutex<bool>,
    released: Condvar,
}

impl Hold {
    fn set(&self, held: bool) {
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = held;
        self.released.notify_all();
    }

    /// Wait while held, at most [`HOLD_LIMIT`].
    fn wait(&self) {
        let deadline = Instant::now() + HOLD_LIMIT;
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while *held {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            held = match self.released.wait_timeout(held, left) {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
    }
}

/// Tokenizing waits (at most 30 s) until this is dropped: for tests that watch the step loop
/// while a prompt is being tokenized.
pub struct TokenizingHeld(Arc<Hold>);

impl Drop for TokenizingHeld {
    fn drop(&mut self) {
        self.0.set(false);
    }
}

impl PromptEncoder {
    /// An encoder with these parts.
    pub fn new(
        tokenizer: Tokenizer,
        chat: ChatTemplate,
        add_bos: Option<i64>,
        limits: Limits,
    ) -> Self {
        let bytes_per_token = match byte_bound::bytes_per_token(&tokenizer) {
            Ok(bytes) => Some(bytes),
            Err(why) => {
                tracing::info!(
                    "prompts are not bounded in bytes ({why}): only their tokens are counted"
                );
                None
            }
        };
        Self {
            tokenizer,
            chat,
            add_bos,
            limits,
            bytes_per_token,
            tokenized: AtomicU64::new(0),
            hold: Arc::default(),
        }
    }

    /// Hold tokenizing until the returned guard is dropped.
    pub fn hold_tokenizing(&self) -> TokenizingHeld {
        self.hold.set(true);
        TokenizingHeld(Arc::clone(&self.hold))
    }

    /// The longest prompt, in bytes, that may fit the context: (context - 1) tokens of the
    /// longest token (`None`: the tokenizer has no such bound).
    pub fn max_prompt_bytes(&self) -> Option<usize> {
        self.bytes_per_token
            .map(|per_token| per_token.saturating_mul(self.limits.capacity.saturating_sub(1)))
    }

    /// Prompts tokenized so far.
    pub fn tokenized(&self) -> u64 {
        self.tokenized.load(Ordering::Relaxed)
    }

    /// The tokenizer (the engine decodes generated tokens with it).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Parse `request`, tokenize its prompt and check it against the context.
    pub fn prepare(&self, request: &Request) -> Result<Prepared, PluginError> {
        let mut gen = api::parse(request)?;
        if !gen.sampling_given {
            if let Some(t) = self.limits.sampling.temperature {
                gen.temperature = t;
            }
            if let Some(k) = self.limits.sampling.top_k {
                gen.top_k = k;
                // A `top_k` alone samples, as a request's own would.
                if self.limits.sampling.temperature.is_none() {
                    gen.temperature = 1.0;
                }
            }
        }
        let ids = self.prompt_ids(&gen)?;
        let capacity = self.limits.capacity;
        if ids.len() >= capacity {
            return Err(PluginError::invalid_input(format!(
                "the prompt is {} tokens long; the context holds {capacity}",
                ids.len()
            )));
        }
        let max_new = gen
            .max_new_tokens
            .map(|n| n as usize)
            .unwrap_or(self.limits.max_new_tokens);
        // As OpenAI servers do, a budget that does not fit is cut to what the context holds.
        let max_new = max_new.min(capacity - ids.len());
        Ok(Prepared {
            request: gen,
            ids,
            max_new,
        })
    }

    fn prompt_ids(&self, request: &GenRequest) -> Result<Vec<i64>, PluginError> {
        // A text prompt gets the special tokens its tokenizer adds (BOS, for most); a rendered
        // chat has them from its template already.
        let (text, specials) = match &request.prompt {
            Prompt::Text(t) => (t.clone(), true),
            Prompt::Chat(messages) => {
                let template = self.chat.template.as_deref().ok_or_else(|| {
                    PluginError::invalid_input(
                        "this model has no chat template; use /v1/completions or set `handler.chat_template`",
                    )
                })?;
                (
                    render_chat(
                        template,
                        messages,
                        &self.chat.bos_token,
                        &self.chat.eos_token,
                    )?,
                    false,
                )
            }
        };
        let field = match &request.prompt {
            Prompt::Text(_) => request.prompt_field.to_string(),
            Prompt::Chat(_) => {
                format!("{}, rendered with the chat template,", request.prompt_field)
            }
        };
        self.check_bytes(&field, text.len())?;
        self.hold.wait();
        self.tokenized.fetch_add(1, Ordering::Relaxed);
        let encoding = self
            .tokenizer
            .encode(text, specials)
            .map_err(|e| PluginError::invalid_input(format!("cannot tokenize the prompt: {e}")))?;
        let mut ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
        if let Some(bos) = self.add_bos.filter(|_| specials) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        if ids.is_empty() {
            return Err(PluginError::invalid_input("the prompt has no tokens"));
        }
        let vocab = self.limits.vocab_size;
        if let Some(bad) = ids.iter().find(|&&t| t >= vocab) {
            return Err(PluginError::invalid_input(format!(
                "the prompt has token {bad}, outside the model's vocabulary of {vocab}"
            )));
        }
        Ok(ids)
    }

    /// Refuse a prompt of `bytes` bytes that has more tokens than the context holds for sure,
    /// without tokenizing it.
    fn check_bytes(&self, field: &str, bytes: usize) -> Result<(), PluginError> {
        let Some(per_token) = self.bytes_per_token else {
            return Ok(());
        };
        let at_least = bytes.div_ceil(per_token);
        let capacity = self.limits.capacity;
        if at_least >= capacity {
            return Err(PluginError::invalid_input(format!(
                "{field} is {bytes} bytes long: at least {at_least} tokens, as no token stands for more than {per_token} bytes; the context holds {capacity}"
            )));
        }
        Ok(())
    }
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
