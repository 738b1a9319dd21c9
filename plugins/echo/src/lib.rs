//! The echo plugin: answers each request with its body and content type, unchanged.
//!
//! It links no libtorch, so it is the fastest way to check a deployment, and the smallest
//! example of a plugin. Built with the `reverse` feature, it answers with the body reversed:
//! the tests use that second build to show two builds of one plugin serving side by side.
//!
//! Through KServe's protocols it answers in each protocol's shape, as the reference for plugin
//! authors (the host has checked the body first): v1 `{"instances": [...]}` comes back as
//! `{"predictions": [...]}`, and v2 inputs come back as `outputs` with their name, shape,
//! datatype and data kept (the host adds `model_name` and `model_version`).

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
    /// The content type, the body, and whether it is the request's own (the `reverse` build
    /// reverses only those).
    type Input = (String, Vec<u8>, bool);
    type Output = (String, Vec<u8>);

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        // No settings: any `[handler]` key is a mistake worth hearing about.
        cresset_plugin_api::sdk::settings::only(&ctx.handler_config, &[])?;
        tracing::debug!("echo instance ready");
        Ok(Echo)
    }

    fn preprocess(&mut self, request: &Request) -> Result<Self::Input, PluginError> {
        match request.param("cresset-protocol") {
            Some("kserve-v1") => return kserve_v1(&request.body).map(|(c, b)| (c, b, false)),
            Some("kserve-v2") => return kserve_v2(&request.body).map(|(c, b)| (c, b, false)),
            _ => {}
        }
        let content_type = match request.content_type.as_str() {
            "" => "application/octet-stream".to_owned(),
            given => given.to_owned(),
        };
        Ok((content_type, request.body.to_vec(), true))
    }

    fn inference(
        &mut self,
        batch: Vec<Self::Input>,
        _ctx: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Self::Output>, PluginError> {
        Ok(batch
            .into_iter()
            .map(|(ct, mut body, raw)| {
                if raw && cfg!(feature = "reverse") {
                    body.reverse();
                }
                (ct, body)
            })
            .collect())
    }

    fn postprocess(&mut self, (content_type, body): Self::Output) -> Result<Response, PluginError> {
        Ok(Response::ok(content_type, body))
    }
}

const JSON: &str = "application/json";

fn parse(body: &[u8]) -> Result<serde_json::Value, PluginError> {
    serde_json::from_slice(body)
        .map_err(|e| PluginError::invalid_input(format!("the body is not JSON: {e}")))
}

/// KServe v1: the instances back as predictions.
fn kserve_v1(body: &[u8]) -> Result<(String, Vec<u8>), PluginError> {
    let request = parse(body)?;
    let answer = serde_json::json!({ "predictions": request["instances"] });
    Ok((JSON.into(), answer.to_string().into_bytes()))
}

/// Open Inference Protocol v2: each input back as an output of the same name, shape,
/// datatype and data, under the request's `id`.
fn kserve_v2(body: &[u8]) -> Result<(String, Vec<u8>), PluginError> {
    let request = parse(body)?;
    let outputs: Vec<serde_json::Value> = request["inputs"]
        .as_array()
        .map(|inputs| {
            inputs
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "name": i["name"],
                        "shape": i["shape"],
                        "datatype": i["datatype"],
                        "data": i["data"],
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let mut answer = serde_json::json!({ "outputs": outputs });
    if let Some(id) = request.get("id") {
        answer["id"] = id.clone();
    }
    Ok((JSON.into(), answer.to_string().into_bytes()))
}

cresset_plugin_api::export_handler!(Echo);
