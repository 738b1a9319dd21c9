//! A third-party plugin, written only against `cresset-plugin-api` (feature `sdk`).
//! It greets the name in each request: `{"name": "Ada"}` → `{"greeting": "Hello, Ada!"}`.
//! The greeting comes from `[handler] greeting = "..."` in `model-config.toml`.

use cresset_plugin_api::sdk::{BatchContext, Handler, InitContext};
use cresset_plugin_api::{PluginError, Request, Response};
use serde::{Deserialize, Serialize};

#[derive(Deserialize)]
struct GreetRequest {
    name: String,
}

#[derive(Serialize)]
pub struct Greeting {
    greeting: String,
}

pub struct Greeter {
    greeting: String,
}

impl Handler for Greeter {
    const NAME: &'static str = "greeter";
    const SUMMARY: &'static str = "greets the `name` of each JSON request";
    type Input = String;
    type Output = Greeting;

    fn initialize(ctx: &InitContext) -> Result<Self, PluginError> {
        // Every key this handler reads: a typo in `[handler]` is refused, naming it.
        cresset_plugin_api::sdk::settings::only(&ctx.handler_config, &["greeting"])?;
        let greeting = match ctx.handler_config.get("greeting") {
            None => "Hello".to_owned(),
            Some(v) => v.as_str().map(str::to_owned).ok_or_else(|| {
                PluginError::invalid_input(format!(
                    "`handler.greeting` must be a string. Given: {v}"
                ))
            })?,
        };
        Ok(Greeter { greeting })
    }

    fn preprocess(&mut self, request: &Request) -> Result<String, PluginError> {
        let req: GreetRequest = request.json()?;
        if req.name.trim().is_empty() {
            return Err(PluginError::invalid_input("`name` must not be empty"));
        }
        Ok(req.name)
    }

    fn inference(
        &mut self,
        names: Vec<String>,
        _: &mut BatchContext<'_, '_>,
    ) -> Result<Vec<Greeting>, PluginError> {
        let greet = |name| Greeting {
            greeting: format!("{}, {name}!", self.greeting),
        };
        Ok(names.into_iter().map(greet).collect())
    }

    fn postprocess(&mut self, output: Greeting) -> Result<Response, PluginError> {
        Response::json(&output)
    }
}

cresset_plugin_api::export_handler!(Greeter);
