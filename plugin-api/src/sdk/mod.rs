//! Helpers for plugin authors (feature `sdk`): handler traits, the export macros, JSON and
//! settings helpers, test helpers, and a bridge that sends the plugin's `tracing` events to the
//! host's log.
//!
//! Three shapes of handler, each exported with one macro:
//!
//! * [`Handler`]: TorchServe's shape (`initialize`, `preprocess`, `inference`, `postprocess`),
//!   one value per worker instance: [`export_handler!`](crate::export_handler).
//! * [`ModelHandler`]: the same, with a [`SharedModel`] loaded once per model version and shared
//!   by its instances (read-only weights and tokenizers: a second worker costs its activations
//!   only): also [`export_handler!`](crate::export_handler).
//! * [`StepHandler`]: continuous batching (a decoder's scheduler), with a shared model too:
//!   [`export_step_handler!`](crate::export_step_handler).
//!
//! Where things are: `handler` (the traits), `context` (what they are given), [`settings`],
//! `export` (the ABI side the macros wire up), `log_bridge`, [`testing`].
//!
//! # A complete plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "cresset-plugin-shout"
//! version = "0.1.0"
//! edition = "2021"
//!
//! [lib]
//! crate-type = ["cdylib"]
//!
//! [dependencies]
//! cresset-plugin-api = { version = "1", features = ["sdk"] }
//! ```
//!
//! `src/lib.rs`:
//!
//! ```
//! use cresset_plugin_api::sdk::{BatchContext, Handler, InitContext};
//! use cresset_plugin_api::{PluginError, Request, Response};
//!
//! /// Answers every request with its text body in upper case.
//! pub struct Shout {
//!     suffix: String,
//! }
//!
//! impl Handler for Shout {
//!     const NAME: &'static str = "shout";
//!     type Input = String;
//!     type Output = String;
//!
//!     // Called once per worker: load weights, read config.
//!     fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
//!         let suffix = ctx.handler_config["suffix"].as_str().unwrap_or("!").to_owned();
//!         Ok(Shout { suffix })
//!     }
//!
//!     // One request in, one model input out. An error fails this request alone (400).
//!     fn preprocess(&mut self, request: &Request) -> Result<String, PluginError> {
//!         request
//!             .text()
//!             .map(str::to_owned)
//!             .ok_or_else(|| PluginError::invalid_input("the body must be UTF-8 text"))
//!     }
//!
//!     // The whole batch at once.
//!     fn inference(&mut self, batch: Vec<String>, _ctx: &mut BatchContext<'_, '_>) -> Result<Vec<String>, PluginError> {
//!         Ok(batch.into_iter().map(|s| s.to_uppercase() + &self.suffix).collect())
//!     }
//!
//!     fn postprocess(&mut self, output: String) -> Result<Response, PluginError> {
//!         Ok(Response::ok("text/plain", output))
//!     }
//! }
//!
//! cresset_plugin_api::export_handler!(Shout);
//! # fn main() {}
//! ```
//!
//! Build it with `cargo build --release`, archive the `.so` with
//! `cresset archive --handler target/release/libcresset_plugin_shout.so ...`, and register it.

mod context;
mod export;
mod handler;
mod log_bridge;
pub mod settings;
pub mod testing;

pub use context::{BatchContext, Host, InitContext, LoadContext, StepContext};
pub use export::guard;
#[doc(hidden)]
pub use export::{describe, load_model, root_module, Batched, Exported, Stepped};
pub use handler::{handle_batch, Entry, Handler, ModelHandler, SharedModel, StepHandler};

use crate::{PluginError, Request, Response};

impl Response {
    /// A 200 `application/json` response holding `value`.
    pub fn json(value: &impl serde::Serialize) -> Result<Self, PluginError> {
        serde_json::to_vec(value)
            .map(|body| Self::ok("application/json", body))
            .map_err(|e| PluginError::internal(format!("cannot serialize the response: {e}")))
    }
}

impl Request {
    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, PluginError> {
        serde_json::from_slice(&self.body)
            .map_err(|e| PluginError::invalid_input(format!("the body is not valid JSON: {e}")))
    }
}
