//! From a request to the token ids of its prompt: parse it ([`api::parse`]), render chat
//! messages with the model's template, tokenize, and check that the prompt fits the context.

use cresset_plugin_api::{PluginError, Request};
use cresset_torch::tokenizers::Tokenizer;
use serde_json::Value;

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
}

/// What turns prompts into tokens: the tokenizer, the chat template and the limits.
pub(crate) struct PromptEncoder {
    tokenizer: Tokenizer,
    chat: ChatTemplate,
    /// A BOS id to put before text prompts (see [`crate::Loaded::add_bos`]).
    add_bos: Option<i64>,
    limits: Limits,
}

impl PromptEncoder {
    /// An encoder with these parts.
    pub fn new(
        tokenizer: Tokenizer,
        chat: ChatTemplate,
        add_bos: Option<i64>,
        limits: Limits,
    ) -> Self {
        Self {
            tokenizer,
            chat,
            add_bos,
            limits,
        }
    }

    /// The tokenizer (the engine decodes generated tokens with it).
    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Parse `request`, tokenize its prompt and check it against the context.
    pub fn prepare(&self, request: &Request) -> Result<Prepared, PluginError> {
        let gen = api::parse(request)?;
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
