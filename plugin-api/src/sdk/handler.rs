//! The handler traits: [`Handler`] (TorchServe's shape, one value per instance),
//! [`ModelHandler`] (the same, with a [`SharedModel`] loaded once per model version) and
//! [`StepHandler`] (continuous batching, with a shared model too).
//!
//! Every [`Handler`] is a [`ModelHandler`] whose model is `()`, so the SDK runs both one way.

use std::sync::Arc;

use super::context::{BatchContext, InitContext, LoadContext, StepContext};
use crate::{Capabilities, ErrorCode, PluginError, Request, Response};

/// A TorchServe-shaped handler. One value of it lives in each worker instance.
///
/// The default [`Handler::handle`] runs `preprocess` on every request, `inference` once on the
/// requests that preprocessed, and `postprocess` on each output. A request whose
/// `preprocess` or `postprocess` fails gets its own error; its neighbours still succeed.
///
/// Each instance loads what it needs in `initialize`. To load weights once and share them among
/// a version's instances, implement [`ModelHandler`] instead.
pub trait Handler: Sized + Send + 'static {
    /// The plugin's name (reported by `describe`).
    const NAME: &'static str;
    /// One line for people.
    const SUMMARY: &'static str = "";
    /// Optional capabilities (set `STREAMING` if you call [`BatchContext::send_chunk`]).
    const CAPABILITIES: Capabilities = Capabilities::NONE;

    /// One request's model input.
    type Input: Send;
    /// One request's model output.
    type Output: Send;

    /// Load what the worker needs (weights, tokenizer, config). Called on the worker's thread.
    fn initialize(ctx: &InitContext) -> Result<Self, PluginError>;

    /// Turn one request into a model input.
    fn preprocess(&mut self, request: &Request) -> Result<Self::Input, PluginError>;

    /// Run the model on a batch. Must return one output per input, in order.
    fn inference(
        &mut self,
        batch: Vec<Self::Input>,
        ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Self::Output>, PluginError>;

    /// Turn one model output into a response.
    fn postprocess(&mut self, output: Self::Output) -> Result<Response, PluginError>;

    /// Handle a batch: one result per request, in order.
    fn handle(
        &mut self,
        requests: &[Request],
        ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        handle_batch(
            Self::NAME,
            self,
            requests,
            ctx,
            Self::preprocess,
            Self::inference,
            Self::postprocess,
        )
    }

    /// Continuous batching through this trait (kept for handlers written before
    /// [`StepHandler`], which new ones should implement instead): with
    /// [`Capabilities::CONTINUOUS_BATCHING`], the SDK calls this instead of
    /// [`Handler::handle`], with the contract of [`StepHandler::step`].
    fn step(
        &mut self,
        new: &[Request],
        first_index: usize,
        ctx: &mut StepContext<'_, '_>,
    ) -> Result<(), PluginError> {
        let _ = (new, first_index, ctx);
        Err(no_steps(Self::NAME))
    }

    /// Explain a batch. The default says the handler has no explanations.
    fn explain(
        &mut self,
        requests: &[Request],
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        no_explanations(Self::NAME, requests)
    }
}

/// A batch entry point of a handler: [`Handler::handle`] or [`Handler::explain`].
pub type Entry<H> =
    fn(&mut H, &[Request], &mut BatchContext<'_, '_>) -> Vec<Result<Response, PluginError>>;

fn no_steps(name: &str) -> PluginError {
    PluginError::unsupported(format!(
        "the `{name}` handler does not implement continuous batching"
    ))
}

fn no_explanations(name: &str, requests: &[Request]) -> Vec<Result<Response, PluginError>> {
    requests
        .iter()
        .map(|_| {
            Err(PluginError::unsupported(format!(
                "the `{name}` handler has no explanations"
            )))
        })
        .collect()
}

/// The default `handle` of [`Handler`] and [`ModelHandler`]: `preprocess` each request,
/// `inference` once on those that preprocessed, `postprocess` each output. A request whose
/// `preprocess` or `postprocess` fails, or whose client went away, gets its own error.
#[allow(clippy::type_complexity)]
pub fn handle_batch<H, I, O>(
    name: &str,
    handler: &mut H,
    requests: &[Request],
    ctx: &mut BatchContext<'_, '_>,
    preprocess: fn(&mut H, &Request) -> Result<I, PluginError>,
    inference: fn(&mut H, Vec<I>, &mut BatchContext<'_, '_>) -> Result<Vec<O>, PluginError>,
    postprocess: fn(&mut H, O) -> Result<Response, PluginError>,
) -> Vec<Result<Response, PluginError>> {
    let mut results: Vec<Option<Result<Response, PluginError>>> =
        (0..requests.len()).map(|_| None).collect();
    let mut inputs = Vec::with_capacity(requests.len());
    let mut positions = Vec::with_capacity(requests.len());
    for (i, request) in requests.iter().enumerate() {
        if ctx.is_cancelled(i) {
            results[i] = Some(Err(PluginError::new(ErrorCode::CANCELLED, "cancelled")));
            continue;
        }
        match preprocess(handler, request) {
            Ok(input) => {
                inputs.push(input);
                positions.push(i);
            }
            Err(e) => results[i] = Some(Err(e)),
        }
    }
    if !inputs.is_empty() {
        let outer = std::mem::replace(&mut ctx.positions, positions.clone());
        let outputs = inference(handler, inputs, ctx);
        ctx.positions = outer;
        match outputs {
            Ok(outputs) if outputs.len() == positions.len() => {
                for (i, output) in positions.into_iter().zip(outputs) {
                    results[i] = Some(postprocess(handler, output));
                }
            }
            Ok(outputs) => {
                let e = PluginError::internal(format!(
                    "`{name}` inference returned {} outputs for {} inputs",
                    outputs.len(),
                    positions.len()
                ));
                for i in positions {
                    results[i] = Some(Err(e.clone()));
                }
            }
            Err(e) => {
                for i in positions {
                    results[i] = Some(Err(e.clone()));
                }
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(PluginError::internal("no result: this is a bug"))))
        .collect()
}

/// What every instance of a model version shares: loaded once, before its first instance
/// (read-only weights, tokenizers, parsed config), and dropped after its last. Instances get it
/// as an `Arc`; anything they change (caches, activations) belongs in the instance.
pub trait SharedModel: Sized + Send + Sync + 'static {
    /// Load it. Called once per model version, on a loader thread, with no device of its own:
    /// put weights where the instances will use them (the CPU, for CPU instances), or load them
    /// lazily per device.
    fn load(ctx: &LoadContext) -> Result<Self, PluginError>;
}

/// Nothing shared: each instance loads what it needs.
impl SharedModel for () {
    fn load(_: &LoadContext) -> Result<Self, PluginError> {
        Ok(())
    }
}

/// A TorchServe-shaped handler whose instances share one [`SharedModel`]: a second worker of a
/// version costs its activations, not another copy of the weights. Exported with
/// [`export_handler!`](crate::export_handler), as a [`Handler`] is.
///
/// ```
/// use std::sync::Arc;
/// use cresset_plugin_api::sdk::{BatchContext, InitContext, LoadContext, ModelHandler, SharedModel};
/// use cresset_plugin_api::{PluginError, Request, Response};
///
/// /// Read once per model version, shared by every worker.
/// pub struct Vocabulary(Vec<String>);
///
/// impl SharedModel for Vocabulary {
///     fn load(ctx: &LoadContext) -> Result<Self, PluginError> {
///         let text = std::fs::read_to_string(ctx.model_dir.join("vocab.txt")).unwrap_or_default();
///         Ok(Vocabulary(text.lines().map(str::to_owned).collect()))
///     }
/// }
///
/// pub struct Lookup {
///     vocab: Arc<Vocabulary>,
/// }
///
/// impl ModelHandler for Lookup {
///     const NAME: &'static str = "lookup";
///     type Model = Vocabulary;
///     type Input = usize;
///     type Output = String;
///
///     fn initialize(vocab: &Arc<Vocabulary>, _ctx: &InitContext) -> Result<Self, PluginError> {
///         Ok(Lookup { vocab: Arc::clone(vocab) })
///     }
///     fn preprocess(&mut self, request: &Request) -> Result<usize, PluginError> {
///         request.text().and_then(|t| t.trim().parse().ok())
///             .ok_or_else(|| PluginError::invalid_input("the body must be an index"))
///     }
///     fn inference(&mut self, batch: Vec<usize>, _: &mut BatchContext<'_, '_>) -> Result<Vec<String>, PluginError> {
///         Ok(batch.iter().map(|&i| self.vocab.0.get(i).cloned().unwrap_or_default()).collect())
///     }
///     fn postprocess(&mut self, word: String) -> Result<Response, PluginError> {
///         Ok(Response::ok("text/plain", word))
///     }
/// }
///
/// cresset_plugin_api::export_handler!(Lookup);
/// # fn main() {}
/// ```
pub trait ModelHandler: Sized + Send + 'static {
    /// The plugin's name (reported by `describe`).
    const NAME: &'static str;
    /// One line for people.
    const SUMMARY: &'static str = "";
    /// Optional capabilities.
    const CAPABILITIES: Capabilities = Capabilities::NONE;

    /// What the version's instances share.
    type Model: SharedModel;
    /// One request's model input.
    type Input: Send;
    /// One request's model output.
    type Output: Send;

    /// Make one instance over the shared model. Called on the worker's thread.
    fn initialize(model: &Arc<Self::Model>, ctx: &InitContext) -> Result<Self, PluginError>;

    /// Turn one request into a model input.
    fn preprocess(&mut self, request: &Request) -> Result<Self::Input, PluginError>;

    /// Run the model on a batch. Must return one output per input, in order.
    fn inference(
        &mut self,
        batch: Vec<Self::Input>,
        ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Self::Output>, PluginError>;

    /// Turn one model output into a response.
    fn postprocess(&mut self, output: Self::Output) -> Result<Response, PluginError>;

    /// Handle a batch: one result per request, in order (see [`handle_batch`]).
    fn handle(
        &mut self,
        requests: &[Request],
        ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        handle_batch(
            Self::NAME,
            self,
            requests,
            ctx,
            Self::preprocess,
            Self::inference,
            Self::postprocess,
        )
    }

    /// Continuous batching for handlers written before [`StepHandler`] (see [`Handler::step`]).
    #[doc(hidden)]
    fn step(
        &mut self,
        new: &[Request],
        first_index: usize,
        ctx: &mut StepContext<'_, '_>,
    ) -> Result<(), PluginError> {
        let _ = (new, first_index, ctx);
        Err(no_steps(Self::NAME))
    }

    /// Explain a batch. The default says the handler has no explanations.
    fn explain(
        &mut self,
        requests: &[Request],
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        no_explanations(Self::NAME, requests)
    }
}

/// Every [`Handler`] is a [`ModelHandler`] that shares nothing.
impl<H: Handler> ModelHandler for H {
    const NAME: &'static str = H::NAME;
    const SUMMARY: &'static str = H::SUMMARY;
    const CAPABILITIES: Capabilities = H::CAPABILITIES;
    type Model = ();
    type Input = H::Input;
    type Output = H::Output;

    fn initialize(_: &Arc<()>, ctx: &InitContext) -> Result<Self, PluginError> {
        <H as Handler>::initialize(ctx)
    }
    fn preprocess(&mut self, request: &Request) -> Result<Self::Input, PluginError> {
        <H as Handler>::preprocess(self, request)
    }
    fn inference(
        &mut self,
        batch: Vec<Self::Input>,
        ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Self::Output>, PluginError> {
        <H as Handler>::inference(self, batch, ctx)
    }
    fn postprocess(&mut self, output: Self::Output) -> Result<Response, PluginError> {
        <H as Handler>::postprocess(self, output)
    }
    fn handle(
        &mut self,
        requests: &[Request],
        ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        <H as Handler>::handle(self, requests, ctx)
    }
    fn step(
        &mut self,
        new: &[Request],
        first_index: usize,
        ctx: &mut StepContext<'_, '_>,
    ) -> Result<(), PluginError> {
        <H as Handler>::step(self, new, first_index, ctx)
    }
    fn explain(
        &mut self,
        requests: &[Request],
        ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        <H as Handler>::explain(self, requests, ctx)
    }
}

/// A continuous-batching handler (a decoder's scheduler): requests stay open across calls, and
/// the host calls [`StepHandler::step`] again, with newly arrived requests or none, while any
/// request is open. Its instances share one [`SharedModel`]. Exported with
/// [`export_step_handler!`](crate::export_step_handler), which adds the
/// `CONTINUOUS_BATCHING` capability.
pub trait StepHandler: Sized + Send + 'static {
    /// The plugin's name (reported by `describe`).
    const NAME: &'static str;
    /// One line for people.
    const SUMMARY: &'static str = "";
    /// Capabilities besides `CONTINUOUS_BATCHING` (which is always set), e.g. `STREAMING`.
    const CAPABILITIES: Capabilities = Capabilities::NONE;

    /// What the version's instances share.
    type Model: SharedModel;

    /// Make one instance over the shared model. Called on the worker's thread.
    fn initialize(model: &Arc<Self::Model>, ctx: &InitContext) -> Result<Self, PluginError>;

    /// Admit the `new` requests (their indices are `first_index..`, counted across calls), run
    /// one scheduling step (for a decoder: one forward pass for every running sequence), and
    /// answer through `ctx` by index. A request may stay open across calls. An `Err` answers
    /// every open request with that error.
    fn step(
        &mut self,
        new: &[Request],
        first_index: usize,
        ctx: &mut StepContext<'_, '_>,
    ) -> Result<(), PluginError>;

    /// Explain a batch. The default says the handler has no explanations.
    fn explain(
        &mut self,
        requests: &[Request],
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        no_explanations(Self::NAME, requests)
    }
}
