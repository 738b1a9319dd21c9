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
//! Prompts are tokenized on the instance's tokenizer thread, off that step loop, so that a long
//! prompt never stalls the running streams; a prompt too long in bytes to fit the context is
//! refused before it is tokenized at all.
//!
//! `[handler]` keys: `model_file` (a `.gguf` in the archive; default: the only one, else the
//! safetensors checkpoint), `model_path` (default `.`), `dtype` (`float32`), `max_seq_len`
//! (default min(context, 2048); Accelerate's `max_length` is read when it is absent),
//! `max_new_tokens` (default 256), `chat_template` (overrides the checkpoint's),
//! `prefill_tokens_per_step`, `draft_model` and `speculate_k` (speculative decoding),
//! `tp_shards` (CPU tensor parallelism), and Accelerate's `device_map`, `max_memory`,
//! `offload_folder`, `low_cpu_mem_usage`, `offload_state_dict` (see [`load_options`]).
//!
//! Where things are: `config` reads the settings; `load` and `device_map` load a checkpoint
//! where the settings put it; `prompt` turns a request into prompt tokens, and `admission` does
//! that off the step loop (on the instance's tokenizer thread); `engine` runs the sequences on
//! `cresset-torch`'s generation loop (prefill, decode, speculation) and answers them; `handler` ties them into the SDK's `Handler`; `api`
//! and `text` are the request formats and incremental detokenization.

mod admission;
mod api;
mod config;
mod device_map;
mod engine;
mod handler;
mod load;
mod prompt;
mod text;

pub use admission::INLINE_BODY_BYTES;
pub use api::{parse, Api, Finish, GenRequest, Prompt, PromptField};
pub use config::{HandlerKeys, QuantizeKey};
pub use device_map::load_options;
pub use handler::GptHandler;
pub use load::{load, Loaded, Placer};
pub use prompt::{render_chat, TokenizingHeld};
pub use text::TextStream;
