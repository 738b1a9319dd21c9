//! The GPT handler plugin (TorchServe's GPT-fast handler, in Rust on libtorch): the generation
//! engine of `cresset-llm`, exported as the `gpt` handler. See that crate for its settings and
//! request formats.

pub use cresset_llm::*;

cresset_plugin_api::export_step_handler!(GptHandler);
