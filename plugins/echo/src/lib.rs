//! The echo plugin: answers each request with its body and content type, unchanged.
//!
//! It links no libtorch, so it is the fastest way to check a deployment, and the smallest
//! example of a plugin. Built with the `reverse` feature, it answers with the body reversed:
//! the tests use that second build to show two builds of one plugin serving side by side.

use cresset_plugin_api::sdk::{BatchContext, Handler, InitContext};
use cresset_plugin_api::{PluginError, Request, Response};

/// Returns each request body unchanged, with its content type.
pub struct Echo;

impl Handler for Echo {
    const NAME: &'static str = "echo";
    const SUMMARY: &'static str = if cfg!(feature = "reverse") {
        "answers each request with its body reversed"
    } else {
        "answers each request with its body and content type, unchanged"
    };
    type Input = (String, Vec<u8>);
    type Output = (String, Vec<u8>);

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        // No settings: any `[handler]` key is a mistake worth hearing about.
        cresset_plugin_api::sdk::settings::only(&ctx.handler_config, &[])?;
        tracing::debug!("echo instance ready");
        Ok(Echo)
    }

    fn preprocess(&mut self, request: &Request) -> Result<Self::Input, PluginError> {
        let content_type = match request.content_type.as_str() {
            "" => "application/octet-stream".to_owned(),
            given => given.to_owned(),
        };
        Ok((content_type, request.body.to_vec()))
    }

    fn inference(
        &mut self,
        batch: Vec<Self::Input>,
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Self::Output>, PluginError> {
        if cfg!(feature = "reverse") {
            Ok(batch
                .into_iter()
                .map(|(ct, mut body)| {
                    body.reverse();
                    (ct, body)
                })
                .collect())
        } else {
            Ok(batch)
        }
    }

    fn postprocess(&mut self, (content_type, body): Self::Output) -> Result<Response, PluginError> {
        Ok(Response::ok(content_type, body))
    }
}

cresset_plugin_api::export_handler!(Echo);
