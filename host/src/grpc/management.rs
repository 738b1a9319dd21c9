//! TorchServe's own gRPC management API (`org.pytorch.serve.grpc.management
//! .ManagementAPIsService`, from `proto/torchserve_management.proto`), on its own listener
//! (`grpc_management_address`; off unless set) with the management token, as TorchServe keeps
//! it on its own port (7071).
//!
//! Each call runs the REST management API's own code and answers its JSON body as `msg`, or its
//! error as the gRPC code for REST's status. proto3 cannot tell a number left out from 0, so 0
//! means "not given" where REST has a default (`limit`, `batch_size`, `max_batch_delay`,
//! `response_timeout`, `max_worker`; `timeout` 0 is TorchServe's default, waiting as -1 does)
//! and itself where it is a count (`initial_workers`, `min_worker`).

use std::sync::Arc;

use tonic::Status;

use super::proto::org::pytorch::serve::grpc::management::management_ap_is_service_server::{
    ManagementApIsService, ManagementApIsServiceServer,
};
use super::proto::org::pytorch::serve::grpc::management::*;
use super::{authorize, status, Key};
use crate::http::management::{self as ops, Answer, RegisterParams, ScaleParams};
use crate::http::{ApiError, AppState};

/// The service, over the server's state.
pub struct Management {
    state: Arc<AppState>,
}

/// The service as tonic serves it. Its messages are a few fields each.
pub fn service(state: Arc<AppState>) -> ManagementApIsServiceServer<Management> {
    ManagementApIsServiceServer::new(Management { state }).max_decoding_message_size(64 << 10)
}

fn answer(result: Result<Answer, ApiError>) -> Result<tonic::Response<ManagementResponse>, Status> {
    result
        .map(|a| {
            tonic::Response::new(ManagementResponse {
                msg: serde_json::to_string_pretty(&a.body).unwrap_or_default(),
            })
        })
        .map_err(|e| status(&e))
}

/// `model_version` as REST's optional path segment.
fn version(v: &str) -> Option<&str> {
    (!v.is_empty()).then_some(v)
}

/// A proto3 number where 0 means "not given".
fn given<T: TryFrom<i32>>(name: &str, n: i32) -> Result<Option<T>, Status> {
    match n {
        0 => Ok(None),
        n => T::try_from(n).map(Some).map_err(|_| {
            Status::invalid_argument(format!("`{name}` must be positive. Given: {n}"))
        }),
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
        authorize(&self.state, &request, Key::Management)?;
        let asked = request.into_inner();
        if asked.customized {
            return Err(Status::unimplemented(
                "`customized`: a handler's own metadata (TorchServe's describe_handle) is not \
                 served",
            ));
        }
        answer(ops::describe_model(
            &self.state,
            &asked.model_name,
            version(&asked.model_version),
        ))
    }

    async fn list_models(
        &self,
        request: tonic::Request<ListModelsRequest>,
    ) -> Result<tonic::Response<ManagementResponse>, Status> {
        authorize(&self.state, &request, Key::Management)?;
        let asked = request.into_inner();
        let limit = given::<usize>("limit", asked.limit)?;
        let token = count("next_page_token", asked.next_page_token)?.to_string();
        answer(ops::list_models(&self.state, limit, Some(&token)))
    }

    async fn register_model(
        &self,
        request: tonic::Request<RegisterModelRequest>,
    ) -> Result<tonic::Response<ManagementResponse>, Status> {
        authorize(&self.state, &request, Key::Management)?;
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
            initial_workers: Some(count("initial_workers", asked.initial_workers)?),
            synchronous: Some(asked.synchronous),
            response_timeout: given("response_timeout", asked.response_timeout)?,
        };
        answer(ops::register_url(self.state.clone(), params).await)
    }

    async fn scale_worker(
        &self,
        request: tonic::Request<ScaleWorkerRequest>,
    ) -> Result<tonic::Response<ManagementResponse>, Status> {
        authorize(&self.state, &request, Key::Management)?;
        let asked = request.into_inner();
        let params = ScaleParams {
            min_worker: Some(count("min_worker", asked.min_worker)?),
            max_worker: given("max_worker", asked.max_worker)?,
            synchronous: Some(asked.synchronous),
            timeout: (asked.timeout != 0).then_some(i64::from(asked.timeout)),
            number_gpu: Some(count("number_gpu", asked.number_gpu)?),
        };
        answer(
            ops::scale_workers(
                self.state.clone(),
                &asked.model_name,
                version(&asked.model_version),
                params,
            )
            .await,
        )
    }

    async fn set_default(
        &self,
        request: tonic::Request<SetDefaultRequest>,
    ) -> Result<tonic::Response<ManagementResponse>, Status> {
        authorize(&self.state, &request, Key::Management)?;
        let asked = request.into_inner();
        answer(ops::set_default_version(
            &self.state,
            &asked.model_name,
            &asked.model_version,
        ))
    }

    async fn unregister_model(
        &self,
        request: tonic::Request<UnregisterModelRequest>,
    ) -> Result<tonic::Response<ManagementResponse>, Status> {
        authorize(&self.state, &request, Key::Management)?;
        let asked = request.into_inner();
        answer(
            ops::unregister_model(
                &self.state,
                &asked.model_name,
                version(&asked.model_version),
            )
            .await,
        )
    }
}
