//! A third-party plugin, written only against `cresset-plugin-api` (feature `sdk`).
//! It greets the name in each request: `{"name": "Ada"}` → `{"greeting": "Hello, Ada!"}`.
//! The greeting comes from `[handler] greeting = "..."` in `model-config.toml`.

use cresset_plugin_api::sdk::{settings, BatchContext, Handler, InitContext};
use cresset_plugin_api::{PluginError, Request, Response};
use serde::{Deserialize, Serialize};

/// `[handler]` as this plugin reads it. `deny_unknown_fields` and `settings::parse` refuse any
/// other key, naming it: a typo never passes silently.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    greeting: Option<String>,
}

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
        let settings: Settings = settings::parse(&ctx.handler_config)?;
        Ok(Greeter {
            greeting: settings.greeting.unwrap_or_else(|| "Hello".to_owned()),
        })
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
