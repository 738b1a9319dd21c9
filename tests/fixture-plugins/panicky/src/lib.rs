//! Test fixture: a plugin that panics on request.
//!
//! Body `panic` panics in `inference`; `[handler] panic_in = "initialize"` panics while a
//! worker initialises. Any other body is answered with `ok`.

use cresset_plugin_api::sdk::{BatchContext, Handler, InitContext};
use cresset_plugin_api::{PluginError, Request, Response};

pub struct Panicky;

impl Handler for Panicky {
    const NAME: &'static str = "panicky";
    type Input = Vec<u8>;
    type Output = Vec<u8>;

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        if ctx.handler_config.get("panic_in").and_then(|v| v.as_str()) == Some("initialize") {
            panic!("panicky fixture: asked to panic in initialize");
        }
        Ok(Panicky)
    }

    fn preprocess(&mut self, request: &Request) -> Result<Vec<u8>, PluginError> {
        Ok(request.body.to_vec())
    }

    fn inference(
        &mut self,
        batch: Vec<Vec<u8>>,
        _: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Vec<u8>>, PluginError> {
        if batch.iter().any(|b| b == b"panic") {
            panic!("panicky fixture: asked to panic in inference");
        }
        Ok(batch.into_iter().map(|_| b"ok".to_vec()).collect())
    }

    fn postprocess(&mut self, output: Vec<u8>) -> Result<Response, PluginError> {
        Ok(Response::ok("text/plain", output))
    }
}

cresset_plugin_api::export_handler!(Panicky);
