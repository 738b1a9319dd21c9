//! TorchServe's own gRPC management API (`org.pytorch.serve.grpc.management
//! .ManagementAPIsService`, from `proto/torchserve_management.proto`), on its own listener
//! (`grpc_management_address`; off unless set) with the management token, as TorchServe keeps
//! it on its own port (7071).
//!
//! Each call runs the REST management API's own code and answers as TorchServe's gRPC does: a
//! change's status text, or a description or list as JSON, as `msg`; an error as the gRPC code
//! for REST's status. Changes run in a task of their own, so a cancelled call does not leave one
//! half made. proto3 cannot tell a number left out from 0, so 0 (or less) means "not given",
//! as TorchServe reads its gRPC numbers (`limit`, `batch_size`, `max_batch_delay`,
//! `response_timeout`, `initial_workers`, `min_worker`, `max_worker`), and REST's default
//! applies; `timeout` 0 is the proto's default, taken as REST's -1 (workers finish what they
//! hold).

use std::sync::Arc;

use tonic::Status;

use super::proto::org::pytorch::serve::grpc::management::management_ap_is_service_server::{
    ManagementApIsService, ManagementApIsServiceServer,
};
use super::proto::org::pytorch::serve::grpc::management::*;
use super::status;
use crate::http::management::{self as ops, whole, Answer, RegisterParams, ScaleParams};
use crate::http::{ApiError, AppState};

/// The service, over the server's state.
pub struct Management {
    state: Arc<AppState>,
}

/// The service as tonic serves it. Its messages are a few fields each.
pub fn service(state: Arc<AppState>) -> ManagementApIsServiceServer<Management> {
    ManagementApIsServiceServer::new(Management { state }).max_decoding_message_size(64 << 10)
}

/// REST's answer as `msg`: a change's status as its text (`{"status": "..."}`'s), as
/// TorchServe's gRPC answers it, and a description or list as JSON.
fn answer(result: Result<Answer, ApiError>) -> Result<tonic::Response<ManagementResponse>, Status> {
    let answer = result.map_err(|e| status(&e))?;
    let msg = match answer.body.as_object().map(|o| (o.len(), o.get("status"))) {
        Some((1, Some(serde_json::Value::String(text)))) => text.clone(),
        _ => serde_json::to_string_pretty(&answer.body).unwrap_or_default(),
    };
    Ok(tonic::Response::new(ManagementResponse { msg }))
}

/// A model name the call needs.
fn named(name: &str) -> Result<&str, Status> {
    if name.is_empty() {
        Err(Status::invalid_argument("`model_name` is required"))
    } else {
        Ok(name)
    }
}

/// `model_version` as REST's optional path segment.
fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

/// A proto3 number where 0 (or less) means "not given", as TorchServe reads them.
fn given<T: TryFrom<i32>>(name: &str, n: i32) -> Result<Option<T>, Status> {
    match n {
        ..=0 => Ok(None),
        n => T::try_from(n)
            .map(Some)
            .map_err(|_| Status::invalid_argument(format!("`{name}` is too large. Given: {n}"))),
    }
}

fn count(name: &str, n: i32) -> Result<u32, Status> {
    u32::try_from(n)
        .map_err(|_| Status::invalid_argument(format!("`{name}` must not be negative. Given: {n}")))
}

#[tonic::async_trait]
impl ManagementApIsService for Management {
    async fn describe_model(
        &self,
        request: tonic::Request<DescribeModelRequest>,
    ) -> Result<tonic::Response<ManagementResponse>, Status> {
        let asked = request.into_inner();
        if asked.customized {
            return Err(Status::unimplemented(
                "`customized`: a handler's own metadata (TorchServe's describe_handle) is not \
                 served",
            ));
        }
        answer(ops::describe_model(
            &self.state,
            named(&asked.model_name)?,
            version(&asked.model_version),
        ))
    }

    async fn list_models(
        &self,
        request: tonic::Request<ListModelsRequest>,
    ) -> Result<tonic::Response<ManagementResponse>, Status> {
        let asked = request.into_inner();
        let limit = given::<usize>("limit", asked.limit)?;
        let token = count("next_page_token", asked.next_page_token)?.to_string();
        answer(ops::list_models(&self.state, limit, Some(&token)))
    }

    async fn register_model(
        &self,
        request: tonic::Request<RegisterModelRequest>,
    ) -> Result<tonic::Response<ManagementResponse>, Status> {
        let asked = request.into_inner();
        for (name, given) in [("handler", &asked.handler), ("runtime", &asked.runtime)] {
            if !given.is_empty() {
                return Err(Status::invalid_argument(format!(
                    "`{name}`: the archive names its handler and runtime; leave `{name}` empty"
                )));
            }
        }
        if asked.s3_sse_kms {
            return Err(Status::invalid_argument(
                "`s3_sse_kms`: archives come from the model store or an allowed http(s) URL",
            ));
        }
        if asked.startup_timeout != 0 {
            return Err(Status::invalid_argument(
                "`startup_timeout`: a model's load is bounded by its config, not per \
                 registration; leave it 0",
            ));
        }
        if asked.url.trim().is_empty() {
            return Err(Status::invalid_argument(
                "`url` is required: an archive in the model store or an allowed http(s) URL",
            ));
        }
        let params = RegisterParams {
            url: Some(asked.url),
            model_name: (!asked.model_name.is_empty()).then_some(asked.model_name),
            batch_size: given("batch_size", asked.batch_size)?,
            max_batch_delay: given("max_batch_delay", asked.max_batch_delay)?,
            initial_workers: given("initial_workers", asked.initial_workers)?,
            synchronous: Some(asked.synchronous),
            response_timeout: given("response_timeout", asked.response_timeout)?,
        };
        answer(whole(ops::register_url(self.state.clone(), params)).await)
    }

    async fn scale_worker(
        &self,
        request: tonic::Request<ScaleWorkerRequest>,
    ) -> Result<tonic::Response<ManagementResponse>, Status> {
        let asked = request.into_inner();
        let params = ScaleParams {
            min_worker: given("min_worker", asked.min_worker)?,
            max_worker: given("max_worker", asked.max_worker)?,
            synchronous: Some(asked.synchronous),
            timeout: (asked.timeout != 0).then_some(i64::from(asked.timeout)),
            number_gpu: Some(count("number_gpu", asked.number_gpu)?),
        };
        let state = self.state.clone();
        let model = named(&asked.model_name)?.to_owned();
        let at = version(&asked.model_version).map(str::to_owned);
        answer(
            whole(async move { ops::scale_workers(state, &model, at.as_deref(), params).await })
                .await,
        )
    }

    async fn set_default(
        &self,
        request: tonic::Request<SetDefaultRequest>,
    ) -> Result<tonic::Response<ManagementResponse>, Status> {
        let asked = request.into_inner();
        answer(ops::set_default_version(
            &self.state,
            named(&asked.model_name)?,
            &asked.model_version,
        ))
    }

    async fn unregister_model(
        &self,
        request: tonic::Request<UnregisterModelRequest>,
    ) -> Result<tonic::Response<ManagementResponse>, Status> {
        let asked = request.into_inner();
        let state = self.state.clone();
        let model = named(&asked.model_name)?.to_owned();
        let at = version(&asked.model_version).map(str::to_owned);
        answer(
            whole(async move { ops::unregister_model(&state, &model, at.as_deref()).await }).await,
        )
    }
}
