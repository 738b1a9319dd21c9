//! Helpers for unit-testing a [`Handler`](super::Handler), a [`ModelHandler`] or a
//! [`StepHandler`] as a plain library, without the host or `dlopen`.
//!
//! ```
//! # use cresset_plugin_api::sdk::{testing, Handler, BatchContext, InitContext};
//! # use cresset_plugin_api::{PluginError, Request, Response};
//! # struct Up;
//! # impl Handler for Up {
//! #     const NAME: &'static str = "up";
//! #     type Input = String; type Output = String;
//! #     fn initialize(_: &InitContext) -> Result<Self, PluginError> { Ok(Up) }
//! #     fn preprocess(&mut self, r: &Request) -> Result<String, PluginError> { Ok(r.text().unwrap_or("").to_owned()) }
//! #     fn inference(&mut self, b: Vec<String>, _: &mut BatchContext<'_, '_>) -> Result<Vec<String>, PluginError> { Ok(b.into_iter().map(|s| s.to_uppercase()).collect()) }
//! #     fn postprocess(&mut self, o: String) -> Result<Response, PluginError> { Ok(Response::ok("text/plain", o)) }
//! # }
//! let ctx = testing::init_context(std::env::temp_dir(), serde_json::json!({}));
//! let mut handler = Up::initialize(&ctx).unwrap();
//! let run = testing::run(&mut handler, &[testing::request("text/plain", "hi")]);
//! assert_eq!(run.finals[0].as_ref().unwrap().body.as_slice(), b"HI");
//! ```

use std::path::PathBuf;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RArc, RResult, RSlice, RStr};
use serde_json::Value;

use super::context::{BatchContext, Host, InitContext, LoadContext, StepContext};
use super::handler::{Entry, ModelHandler, SharedModel, StepHandler};
use crate::{
    DeviceType, HostHandle, HostServices, InstanceAssignment, KeyValue, LogLevel, MetricKind,
    PluginError, Request, Response, SinkRef,
};

#[derive(Clone)]
struct QuietHost;

impl HostServices for QuietHost {
    fn log_enabled(&self, _: LogLevel) -> bool {
        false
    }
    fn log(&self, _: LogLevel, _: RStr<'_>, _: RStr<'_>, _: RSlice<'_, KeyValue>) {}
    fn metric(&self, _: MetricKind, _: RStr<'_>, _: RStr<'_>, _: RSlice<'_, KeyValue>, _: f64) {}
}

/// Host services that drop logs and metrics.
pub fn host() -> Host {
    Host {
        handle: HostHandle::from_ptr(RArc::new(QuietHost), TD_Opaque),
    }
}

/// A [`LoadContext`] for model files in `model_dir` (what a [`SharedModel`]
/// loads from).
pub fn load_context(model_dir: impl Into<PathBuf>, handler_config: Value) -> LoadContext {
    LoadContext {
        model_name: "test".into(),
        model_version: "1.0".into(),
        model_dir: model_dir.into(),
        handler_config,
        model_config: Value::Object(Default::default()),
        host: host(),
    }
}

/// An [`InitContext`] for model files in `model_dir`, on the CPU with one thread.
pub fn init_context(model_dir: impl Into<PathBuf>, handler_config: Value) -> InitContext {
    load_context(model_dir, handler_config).instance(InstanceAssignment {
        index: 0,
        device_type: DeviceType::CPU,
        device_ids: Default::default(),
        intra_op_threads: 1,
    })
}

/// Load the shared model as the host does (from `ctx`'s model version) and make one instance of
/// a [`ModelHandler`] (every [`Handler`](super::Handler) is one) on it.
pub fn instance<H: ModelHandler>(ctx: &InitContext) -> Result<H, PluginError> {
    let model = H::Model::load(&ctx.model_context())?;
    H::initialize(&std::sync::Arc::new(model), ctx)
}

/// Load the shared model as the host does and make one instance of a [`StepHandler`] on it.
pub fn step_instance<S: StepHandler>(ctx: &InitContext) -> Result<S, PluginError> {
    let model = S::Model::load(&ctx.model_context())?;
    S::initialize(&std::sync::Arc::new(model), ctx)
}

/// A request with this content type and body.
pub fn request(content_type: &str, body: impl Into<Vec<u8>>) -> Request {
    Request {
        id: "test".into(),
        content_type: content_type.into(),
        body: body.into().into(),
        headers: Default::default(),
        params: Default::default(),
    }
}

/// What one batch produced: the chunks streamed to each request, and its final result.
pub struct Run {
    /// Intermediate chunks, per request.
    pub chunks: Vec<Vec<Response>>,
    /// Final results, per request.
    pub finals: Vec<Result<Response, PluginError>>,
}

struct Collect {
    chunks: Vec<Vec<Response>>,
}

impl crate::ResponseSink for Collect {
    fn send_chunk(&mut self, index: usize, chunk: Response) -> bool {
        match self.chunks.get_mut(index) {
            Some(list) => {
                list.push(chunk);
                true
            }
            None => false,
        }
    }
    fn send_final(&mut self, _: usize, _: RResult<Response, PluginError>) {}
    fn is_cancelled(&self, _: usize) -> bool {
        false
    }
}

/// What a run of [`StepHandler::step`] calls produced, per request (in arrival order).
pub struct StepRun {
    /// Intermediate chunks.
    pub chunks: Vec<Vec<Response>>,
    /// Final results (`None`: never answered).
    pub finals: Vec<Option<Result<Response, PluginError>>>,
    /// The step (call number) of each request's first chunk.
    pub first_chunk_step: Vec<Option<usize>>,
    /// The step of each request's final response.
    pub final_step: Vec<Option<usize>>,
}

struct Record {
    run: StepRun,
    step: usize,
}

impl crate::ResponseSink for Record {
    fn send_chunk(&mut self, index: usize, chunk: Response) -> bool {
        let step = self.step;
        match self.run.chunks.get_mut(index) {
            Some(list) => {
                list.push(chunk);
                self.run.first_chunk_step[index].get_or_insert(step);
                true
            }
            None => false,
        }
    }
    fn send_final(&mut self, index: usize, result: RResult<Response, PluginError>) {
        if let Some(slot @ None) = self.run.finals.get_mut(index) {
            *slot = Some(result.into());
            self.run.final_step[index] = Some(self.step);
        }
    }
    fn is_cancelled(&self, _: usize) -> bool {
        false
    }
}

/// One request through a continuous-batching handler, from an idle start until it is
/// answered: its final result (an internal error if `max_steps` calls did not answer it).
pub fn step_one<H: StepHandler>(
    handler: &mut H,
    request: Request,
    max_steps: usize,
) -> Result<Response, PluginError> {
    run_steps(handler, &[(0, request)], max_steps)
        .finals
        .into_iter()
        .next()
        .flatten()
        .unwrap_or_else(|| {
            Err(PluginError::internal(format!(
                "not answered in {max_steps} steps"
            )))
        })
}

/// Drive a continuous-batching handler as the host does: `arrivals` are `(step, request)`
/// pairs (sorted by step); each call passes the requests arriving at that step, and calls
/// continue while any request is unanswered (at most `max_steps`).
pub fn run_steps<H: StepHandler>(
    handler: &mut H,
    arrivals: &[(usize, Request)],
    max_steps: usize,
) -> StepRun {
    let n = arrivals.len();
    let mut record = Record {
        run: StepRun {
            chunks: vec![Vec::new(); n],
            finals: (0..n).map(|_| None).collect(),
            first_chunk_step: vec![None; n],
            final_step: vec![None; n],
        },
        step: 0,
    };
    let mut given = 0;
    while record.step < max_steps {
        let new: Vec<Request> = arrivals[given..]
            .iter()
            .take_while(|(at, _)| *at <= record.step)
            .map(|(_, r)| r.clone())
            .collect();
        let first = given;
        given += new.len();
        if given == n && record.run.finals.iter().all(Option::is_some) {
            break;
        }
        let result = {
            let mut sink = SinkRef::from_ptr(&mut record, TD_Opaque);
            let mut ctx = StepContext { sink: &mut sink };
            handler.step(&new, first, &mut ctx)
        };
        if let Err(e) = result {
            for slot in record.run.finals.iter_mut().take(given) {
                slot.get_or_insert_with(|| Err(e.clone()));
            }
        }
        record.step += 1;
    }
    record.run
}

/// Run one batch through `handler.handle`, as a worker would.
pub fn run<H: ModelHandler>(handler: &mut H, requests: &[Request]) -> Run {
    run_with(handler, requests, H::handle)
}

/// Run one batch through another entry point, such as
/// [`Handler::explain`](super::Handler::explain).
pub fn run_with<H>(handler: &mut H, requests: &[Request], entry: Entry<H>) -> Run {
    let mut collect = Collect {
        chunks: requests.iter().map(|_| Vec::new()).collect(),
    };
    let finals = {
        let mut sink = SinkRef::from_ptr(&mut collect, TD_Opaque);
        let mut ctx = BatchContext::new(&mut sink, requests.len());
        entry(handler, requests, &mut ctx)
    };
    Run {
        chunks: collect.chunks,
        finals,
    }
}
