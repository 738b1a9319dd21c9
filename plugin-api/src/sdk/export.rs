//! The ABI side that the export macros wire up: the root module's `describe` and
//! `load_model`, the model (which holds the [`SharedModel`]) and its instances, with every entry
//! point under `catch_unwind` (panics must never cross the boundary).

use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

use abi_stable::prefix_type::PrefixTypeTrait;
use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::std_types::{RResult, RSlice, RString};
use serde_json::Value;

use super::context::{BatchContext, Host, InitContext, LoadContext, StepContext};
use super::handler::{ModelHandler, SharedModel, StepHandler};
use super::log_bridge::{install_log_bridge, with_host};
use crate::{
    Capabilities, HostHandle, InstanceAssignment, InstanceBox, ModelBox, ModelSpec,
    PluginDescription, PluginError, PluginInstance, PluginMod, PluginModRef, PluginModel, Request,
    Response, SinkRef, ABI_VERSION,
};

/// Run `f`, turning a panic into an `INTERNAL` error: panics must never cross the ABI.
pub fn guard<T>(what: &str, f: impl FnOnce() -> Result<T, PluginError>) -> RResult<T, PluginError> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result.into(),
        Err(payload) => {
            let detail = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_owned());
            RResult::RErr(PluginError::internal(format!(
                "the handler panicked in {what}: {detail}"
            )))
        }
    }
}

/// What the SDK exports, whatever the handler's shape: [`Batched`] adapts a
/// [`ModelHandler`] (every [`Handler`](super::Handler) is one), [`Stepped`] a [`StepHandler`].
#[doc(hidden)]
pub trait Exported: Sized + Send + 'static {
    const NAME: &'static str;
    const SUMMARY: &'static str;
    const CAPABILITIES: Capabilities;
    type Model: SharedModel;
    fn initialize(model: &Arc<Self::Model>, ctx: &InitContext) -> Result<Self, PluginError>;
    /// `execute`: the batch's requests, whose indices start at `first_index` (counted across
    /// calls, for continuous batching). Returns what was not answered through the sink.
    fn execute(
        &mut self,
        requests: &[Request],
        first_index: usize,
        sink: &mut SinkRef<'_>,
    ) -> Result<(), PluginError>;
    fn explain(
        &mut self,
        requests: &[Request],
        ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>>;
}

/// A [`ModelHandler`] as exported.
#[doc(hidden)]
pub struct Batched<H>(H);

impl<H: ModelHandler> Exported for Batched<H> {
    const NAME: &'static str = H::NAME;
    const SUMMARY: &'static str = H::SUMMARY;
    const CAPABILITIES: Capabilities = H::CAPABILITIES;
    type Model = H::Model;

    fn initialize(model: &Arc<Self::Model>, ctx: &InitContext) -> Result<Self, PluginError> {
        H::initialize(model, ctx).map(Batched)
    }

    fn execute(
        &mut self,
        requests: &[Request],
        first_index: usize,
        sink: &mut SinkRef<'_>,
    ) -> Result<(), PluginError> {
        if H::CAPABILITIES.contains(Capabilities::CONTINUOUS_BATCHING) {
            let mut ctx = StepContext { sink };
            return self.0.step(requests, first_index, &mut ctx);
        }
        let results = {
            let mut ctx = BatchContext::new(sink, requests.len());
            self.0.handle(requests, &mut ctx)
        };
        for (i, result) in results.into_iter().enumerate().take(requests.len()) {
            sink.send_final(i, result.into());
        }
        Ok(())
    }

    fn explain(
        &mut self,
        requests: &[Request],
        ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        self.0.explain(requests, ctx)
    }
}

/// A [`StepHandler`] as exported.
#[doc(hidden)]
pub struct Stepped<S>(S);

impl<S: StepHandler> Exported for Stepped<S> {
    const NAME: &'static str = S::NAME;
    const SUMMARY: &'static str = S::SUMMARY;
    const CAPABILITIES: Capabilities =
        Capabilities(S::CAPABILITIES.0 | Capabilities::CONTINUOUS_BATCHING.0);
    type Model = S::Model;

    fn initialize(model: &Arc<Self::Model>, ctx: &InitContext) -> Result<Self, PluginError> {
        S::initialize(model, ctx).map(Stepped)
    }

    fn execute(
        &mut self,
        requests: &[Request],
        first_index: usize,
        sink: &mut SinkRef<'_>,
    ) -> Result<(), PluginError> {
        let mut ctx = StepContext { sink };
        self.0.step(requests, first_index, &mut ctx)
    }

    fn explain(
        &mut self,
        requests: &[Request],
        ctx: &mut BatchContext<'_, '_>,
    ) -> Vec<Result<Response, PluginError>> {
        self.0.explain(requests, ctx)
    }
}

#[doc(hidden)]
pub fn describe<E: Exported>(plugin_version: &str) -> PluginDescription {
    PluginDescription {
        name: E::NAME.into(),
        plugin_version: plugin_version.into(),
        abi_version: ABI_VERSION.into(),
        capabilities: E::CAPABILITIES,
        summary: E::SUMMARY.into(),
    }
}

#[doc(hidden)]
pub extern "C" fn load_model<E: Exported>(
    spec: &ModelSpec,
    host: HostHandle,
) -> RResult<ModelBox, PluginError> {
    guard("load_model", || {
        install_log_bridge(&host);
        let ctx = LoadContext {
            model_name: spec.name.to_string(),
            model_version: spec.version.to_string(),
            model_dir: PathBuf::from(spec.model_dir.as_str()),
            handler_config: parse_json("handler_config_json", &spec.handler_config_json)?,
            model_config: parse_json("model_config_json", &spec.model_config_json)?,
            host: Host {
                handle: host.clone(),
            },
        };
        let shared = with_host(&host, || E::Model::load(&ctx))?;
        let model = SdkModel::<E> {
            ctx,
            shared: Some(Arc::new(shared)),
            handler: PhantomData,
        };
        Ok(ModelBox::from_value(model, TD_Opaque))
    })
}

#[doc(hidden)]
pub fn root_module(
    describe: extern "C" fn() -> PluginDescription,
    load_model: extern "C" fn(&ModelSpec, HostHandle) -> RResult<ModelBox, PluginError>,
) -> PluginModRef {
    PluginMod {
        describe,
        load_model,
    }
    .leak_into_prefix()
}

fn parse_json(field: &str, text: &str) -> Result<Value, PluginError> {
    if text.trim().is_empty() {
        return Ok(Value::Object(Default::default()));
    }
    serde_json::from_str(text)
        .map_err(|e| PluginError::internal(format!("the host sent a bad `{field}`: {e}")))
}

struct SdkModel<E: Exported> {
    ctx: LoadContext,
    /// `None` only while being dropped.
    shared: Option<Arc<E::Model>>,
    handler: PhantomData<fn() -> E>,
}

impl<E: Exported> PluginModel for SdkModel<E> {
    fn new_instance(&self, assignment: &InstanceAssignment) -> RResult<InstanceBox, PluginError> {
        guard("initialize", || {
            let shared = self
                .shared
                .as_ref()
                .ok_or_else(|| PluginError::internal("the model was dropped"))?;
            let ctx = self.ctx.instance(assignment.clone());
            let handle = self.ctx.host.handle.clone();
            let handler = with_host(&handle, || E::initialize(shared, &ctx))?;
            Ok(InstanceBox::from_value(
                SdkInstance {
                    handler: Some(handler),
                    host: handle,
                    next_index: 0,
                },
                TD_Opaque,
            ))
        })
    }

    fn metadata_json(&self) -> RString {
        RString::from("{}")
    }
}

impl<E: Exported> Drop for SdkModel<E> {
    fn drop(&mut self) {
        let shared = self.shared.take();
        // The shared model's destructor must not unwind into the host either.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            with_host(&self.ctx.host.handle, move || drop(shared))
        }));
    }
}

struct SdkInstance<E> {
    handler: Option<E>,
    host: HostHandle,
    /// Requests given to `execute` so far: the index of the next one (continuous batching).
    next_index: usize,
}

impl<E: Exported> PluginInstance for SdkInstance<E> {
    fn execute(
        &mut self,
        requests: RSlice<'_, Request>,
        mut sink: SinkRef<'_>,
    ) -> RResult<(), PluginError> {
        let Some(handler) = self.handler.as_mut() else {
            return RResult::RErr(PluginError::internal("the instance was dropped"));
        };
        let first_index = self.next_index;
        self.next_index += requests.len();
        let host = &self.host;
        let what = if E::CAPABILITIES.contains(Capabilities::CONTINUOUS_BATCHING) {
            "step"
        } else {
            "handle"
        };
        guard(what, || {
            with_host(host, || {
                handler.execute(requests.as_slice(), first_index, &mut sink)
            })
        })
    }

    fn explain(
        &mut self,
        requests: RSlice<'_, Request>,
        mut sink: SinkRef<'_>,
    ) -> RResult<(), PluginError> {
        let Some(handler) = self.handler.as_mut() else {
            return RResult::RErr(PluginError::internal("the instance was dropped"));
        };
        let host = &self.host;
        guard("explain", || {
            let results = {
                let mut ctx = BatchContext::new(&mut sink, requests.len());
                with_host(host, || handler.explain(requests.as_slice(), &mut ctx))
            };
            for (i, result) in results.into_iter().enumerate().take(requests.len()) {
                sink.send_final(i, result.into());
            }
            Ok(())
        })
    }
}

impl<E> Drop for SdkInstance<E> {
    fn drop(&mut self) {
        let handler = self.handler.take();
        // A panicking destructor must not unwind into the host either.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            with_host(&self.host, move || drop(handler))
        }));
    }
}

/// Export a [`Handler`](crate::sdk::Handler) or a [`ModelHandler`](crate::sdk::ModelHandler) as
/// this library's plugin root module.
///
/// Use once per `cdylib` crate: `cresset_plugin_api::export_handler!(MyHandler);`
#[macro_export]
macro_rules! export_handler {
    ($handler:ty) => {
        $crate::__export_root!($crate::sdk::Batched<$handler>);
    };
}

/// Export a [`StepHandler`](crate::sdk::StepHandler) (continuous batching) as this library's
/// plugin root module.
///
/// Use once per `cdylib` crate: `cresset_plugin_api::export_step_handler!(MyHandler);`
#[macro_export]
macro_rules! export_step_handler {
    ($handler:ty) => {
        $crate::__export_root!($crate::sdk::Stepped<$handler>);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_root {
    ($exported:ty) => {
        const _: () = {
            extern "C" fn cresset_describe() -> $crate::PluginDescription {
                // `describe` builds plain data and cannot panic in practice; still, never unwind.
                match ::std::panic::catch_unwind(|| {
                    $crate::sdk::describe::<$exported>(env!("CARGO_PKG_VERSION"))
                }) {
                    Ok(d) => d,
                    Err(_) => ::std::process::abort(),
                }
            }

            fn cresset_root_module() -> $crate::PluginModRef {
                $crate::sdk::root_module(cresset_describe, $crate::sdk::load_model::<$exported>)
            }

            extern "C" fn cresset_erased_root_module(
            ) -> $crate::abi_stable::library::RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(cresset_root_module)
            }

            // The symbol abi_stable's loader looks up (`abi_stable::library::ROOT_MODULE_LOADER_NAME`;
            // a unit test in cresset-plugin-api checks the literal).
            #[export_name = "_1as_0lib_1header_0root_bmodule_bloader"]
            static CRESSET_PLUGIN_ROOT: $crate::abi_stable::library::LibHeader = unsafe {
                $crate::abi_stable::library::LibHeader::from_constructor::<$crate::PluginModRef>(
                    cresset_erased_root_module,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            };
        };
    };
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::sdk::context::BatchContext;
    use crate::DeviceType;

    static LOADS: AtomicUsize = AtomicUsize::new(0);
    static DROPS: AtomicUsize = AtomicUsize::new(0);
    static SEEN: Mutex<Vec<usize>> = Mutex::new(Vec::new());

    struct Weights;

    impl SharedModel for Weights {
        fn load(_: &LoadContext) -> Result<Self, PluginError> {
            LOADS.fetch_add(1, Ordering::SeqCst);
            Ok(Weights)
        }
    }

    impl Drop for Weights {
        fn drop(&mut self) {
            DROPS.fetch_add(1, Ordering::SeqCst);
        }
    }

    struct Worker {
        _weights: Arc<Weights>,
    }

    impl ModelHandler for Worker {
        const NAME: &'static str = "worker";
        type Model = Weights;
        type Input = ();
        type Output = ();
        fn initialize(model: &Arc<Weights>, _: &InitContext) -> Result<Self, PluginError> {
            SEEN.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Arc::as_ptr(model) as usize);
            Ok(Worker {
                _weights: Arc::clone(model),
            })
        }
        fn preprocess(&mut self, _: &Request) -> Result<(), PluginError> {
            Ok(())
        }
        fn inference(
            &mut self,
            batch: Vec<()>,
            _: &mut BatchContext<'_, '_>,
        ) -> Result<Vec<()>, PluginError> {
            Ok(batch)
        }
        fn postprocess(&mut self, _: ()) -> Result<Response, PluginError> {
            Ok(Response::ok("text/plain", "ok"))
        }
    }

    #[test]
    fn the_shared_model_is_loaded_once_shared_by_instances_and_dropped_after_the_last() {
        let spec = ModelSpec {
            name: "m".into(),
            version: "1".into(),
            model_dir: "/nonexistent".into(),
            handler_config_json: "{}".into(),
            model_config_json: "{}".into(),
        };
        let host = crate::sdk::testing::host().handle;
        let model = match load_model::<Batched<Worker>>(&spec, host) {
            RResult::ROk(m) => m,
            RResult::RErr(e) => panic!("{e}"),
        };
        let assignment = |index| InstanceAssignment {
            index,
            device_type: DeviceType::CPU,
            device_ids: Default::default(),
            intra_op_threads: 1,
        };
        let instances: Vec<InstanceBox> = (0..2)
            .map(|i| match model.new_instance(&assignment(i)) {
                RResult::ROk(instance) => instance,
                RResult::RErr(e) => panic!("{e}"),
            })
            .collect();
        assert_eq!(
            LOADS.load(Ordering::SeqCst),
            1,
            "loaded once for two instances"
        );
        let seen = SEEN.lock().unwrap_or_else(|p| p.into_inner()).clone();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0], seen[1], "both instances got the same model");
        drop(model);
        assert_eq!(DROPS.load(Ordering::SeqCst), 0, "instances still hold it");
        drop(instances);
        assert_eq!(
            DROPS.load(Ordering::SeqCst),
            1,
            "dropped after the last instance"
        );
    }

    #[test]
    fn the_export_macro_uses_abi_stables_symbol_name() {
        assert_eq!(
            crate::ROOT_MODULE_SYMBOL,
            "_1as_0lib_1header_0root_bmodule_bloader"
        );
    }
}
