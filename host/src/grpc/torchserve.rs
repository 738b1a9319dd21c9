//! TorchServe's own gRPC inference API (`org.pytorch.serve.grpc.inference.InferenceAPIsService`,
//! from `proto/torchserve_inference.proto`), on the gRPC listener beside the Open Inference
//! Protocol's, so that TorchServe's gRPC clients work unchanged.
//!
//! A `PredictionsRequest`'s `input` map is the request's fields, as a multipart form's are over
//! REST: `data` (or `body`) is the body, the others are parameters; it then runs as
//! `POST /predictions/{model}[/{version}]` does, and the answer's bytes are `prediction`.
//! `Predictions` answers once (a streamed answer's chunks joined, as a REST client reads the
//! chunked body, up to [`MAX_JOINED`]); `StreamPredictions` sends each chunk as it comes;
//! `StreamPredictions2` runs the requests of a bidirectional stream one after another, each
//! answer (or its error, as `status`) tagged with the request's `sequence_id`, and the stream
//! goes on after an error (it ends when the client stops sending, goes quiet for
//! `body_idle_timeout`, or the server shuts down). A call whose client has gone is dropped with
//! its job, as REST's is. `Ping` needs no token, as `GET /ping` does not, and answers its JSON
//! as `health`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cresset_plugin_api::{KeyValue, Request, Response};
use futures_util::Stream;
use tokio::sync::mpsc;
use tonic::Status;

use super::proto::google::rpc;
use super::proto::org::pytorch::serve::grpc::inference::inference_ap_is_service_server::{
    InferenceApIsService, InferenceApIsServiceServer,
};
use super::proto::org::pytorch::serve::grpc::inference::{
    PredictionResponse, PredictionsRequest, TorchServeHealthResponse,
};
use super::{code_for, status};
use crate::http::body::{BODY_FIELD, RESERVED_PREFIX};
use crate::http::{acquire, await_answer, Answered, ApiError, AppState};
use crate::registry::ModelVersion;
use crate::worker::{JobKind, Reply};

/// The service, over the server's state.
pub struct Inference {
    state: Arc<AppState>,
}

/// The service as tonic serves it, with the server's message size cap.
pub fn service(state: Arc<AppState>) -> InferenceApIsServiceServer<Inference> {
    let max = state.config.max_request_size;
    InferenceApIsServiceServer::new(Inference { state })
        .max_decoding_message_size(max)
        .max_encoding_message_size(usize::MAX)
}

/// The most answers a stream buffers for a client that reads slowly.
const STREAM_BUFFER: usize = 16;

/// The largest answer `Predictions` joins from a streamed one; past it, StreamPredictions is
/// the call to make.
pub const MAX_JOINED: usize = 256 << 20;

type Answers = Pin<Box<dyn Stream<Item = Result<PredictionResponse, Status>> + Send>>;

/// The messages sent to `rx`, as the stream a call answers.
fn answers(rx: mpsc::Receiver<Result<PredictionResponse, Status>>) -> Answers {
    Box::pin(futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|message| (message, rx))
    }))
}

/// What one request makes: its model version and the plugin's request.
struct Prepared {
    target: Arc<ModelVersion>,
    request: Request,
}

/// A request's `input` map as the plugin's request: `data` (or `body`) is the body, the other
/// fields are parameters (as text), the server's own (`cresset-*`) dropped.
fn prepare(state: &AppState, asked: PredictionsRequest) -> Result<Prepared, Status> {
    let version = (!asked.model_version.is_empty()).then_some(asked.model_version.as_str());
    let target = state
        .registry
        .get(&asked.model_name, version)
        .map_err(|e| status(&ApiError::from(e)))?;
    let mut input = asked.input;
    let mut params = Vec::new();
    let body = ["data", "body"].iter().find_map(|&field| {
        input
            .remove(field)
            .inspect(|_| params.push(KeyValue::new(BODY_FIELD, field)))
    });
    let Some(body) = body else {
        return Err(Status::invalid_argument(
            "`input` has no `data` (or `body`) field: the request's body",
        ));
    };
    let mut rest: Vec<_> = input.into_iter().collect();
    rest.sort();
    params.extend(
        rest.into_iter()
            .filter(|(k, _)| !k.starts_with(RESERVED_PREFIX))
            .map(|(k, v)| KeyValue::new(k, String::from_utf8_lossy(&v).into_owned())),
    );
    params.push(KeyValue::new("cresset-protocol", "torchserve"));
    let request = Request {
        id: uuid::Uuid::new_v4().to_string().as_str().into(),
        content_type: "".into(),
        body: body.into(),
        headers: Vec::new().into(),
        params: params.into(),
    };
    Ok(Prepared { target, request })
}

/// Submit a prepared request with a body slot and an in-flight permit, as a REST request
/// holds them; refused once the server is shutting down.
async fn submit(state: &AppState, prepared: Prepared) -> Result<Answered, ApiError> {
    let slot = state
        .in_transit
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyBodies(state.config.max_bodies_in_transit))?;
    if state.is_draining() {
        return Err(ApiError::shutting_down());
    }
    let permit = acquire(state, &prepared.target)?;
    // The message has arrived: from here the request is counted by its permit, as REST's.
    drop(slot);
    await_answer(
        &prepared.target,
        JobKind::Predict,
        prepared.request,
        None,
        permit,
    )
    .await
}

/// A plugin's answer with a status other than 200, as a gRPC error.
fn refused(response: &Response) -> Status {
    Status::new(
        code_for(response.status),
        String::from_utf8_lossy(&response.body).into_owned(),
    )
}

/// Send an answer's parts to `tx` as they come: the first, each chunk, then the final one,
/// each made into a message by `message`. A chunk that does not come within the model's
/// response timeout ends the stream with DEADLINE_EXCEEDED; an error of the plugin's ends it
/// with its status; a client that takes no message for that long is let go. Returns the status
/// to count: the error's, or 200 for an answer (a stream's error after its first part counts
/// as REST's does not, 500 or 504), or 499 for a client gone.
async fn relay(
    target: &ModelVersion,
    answered: Result<Answered, ApiError>,
    tx: &mpsc::Sender<Result<PredictionResponse, Status>>,
    message: impl Fn(Result<Vec<u8>, Status>) -> Result<PredictionResponse, Status>,
) -> u16 {
    let idle = Duration::from_secs(target.config.response_timeout_s);
    let send = |m| async {
        matches!(
            tokio::time::timeout(idle, tx.send(message(m))).await,
            Ok(Ok(()))
        )
    };
    let (first, mut rx, _permit) = match answered {
        Err(e) => {
            send(Err(status(&e))).await;
            return actix_web::ResponseError::status_code(&e).as_u16();
        }
        Ok(Answered::Whole(response)) if !(200..300).contains(&response.status) => {
            send(Err(refused(&response))).await;
            return response.status;
        }
        Ok(Answered::Whole(response)) => {
            send(Ok(response.body.into_vec())).await;
            return response.status;
        }
        Ok(Answered::Stream(first, rx, permit)) => (first, rx, permit),
    };
    if !send(Ok(first.body.into_vec())).await {
        return 499;
    }
    loop {
        match tokio::time::timeout(idle, rx.recv()).await {
            Ok(Some(Reply::Chunk(c))) => {
                if !send(Ok(c.body.into_vec())).await {
                    return 499;
                }
            }
            Ok(Some(Reply::Final(Ok(r)))) => {
                send(Ok(r.body.into_vec())).await;
                return 200;
            }
            Ok(Some(Reply::Final(Err(e)))) => {
                tracing::warn!(model = %target.name, "stream ended with an error: {e}");
                send(Err(status(&ApiError::Plugin(e)))).await;
                return 500;
            }
            Ok(None) | Err(_) => {
                tracing::warn!(model = %target.name, "stream ended without a final response");
                send(Err(Status::deadline_exceeded("no final response"))).await;
                return 504;
            }
        }
    }
}

/// Run one request and send its answer to `tx` (see [`relay`]), counted in the metrics.
async fn run_one(
    state: &AppState,
    asked: PredictionsRequest,
    tx: &mpsc::Sender<Result<PredictionResponse, Status>>,
    message: impl Fn(Result<Vec<u8>, Status>) -> Result<PredictionResponse, Status>,
) {
    let started = Instant::now();
    let prepared = match prepare(state, asked) {
        Ok(p) => p,
        Err(e) => {
            let _ = tx.send(message(Err(e))).await;
            return;
        }
    };
    let target = prepared.target.clone();
    let answered = submit(state, prepared).await;
    // A request refused for want of a permit was counted when it was refused.
    if matches!(answered, Err(ApiError::TooManyRequests(_))) {
        let _ = relay(&target, answered, tx, message).await;
        return;
    }
    let code = relay(&target, answered, tx, message).await;
    state.metrics.record_request(
        &target.name,
        &target.version,
        code,
        started.elapsed().as_secs_f64(),
    );
}

fn prediction(bytes: Vec<u8>) -> PredictionResponse {
    PredictionResponse {
        prediction: bytes,
        sequence_id: None,
        status: None,
    }
}

#[tonic::async_trait]
impl InferenceApIsService for Inference {
    async fn ping(
        &self,
        _request: tonic::Request<()>,
    ) -> Result<tonic::Response<TorchServeHealthResponse>, Status> {
        let (_, body) = crate::http::health(&self.state);
        Ok(tonic::Response::new(TorchServeHealthResponse {
            health: serde_json::to_string_pretty(&body).unwrap_or_default(),
        }))
    }

    async fn predictions(
        &self,
        request: tonic::Request<PredictionsRequest>,
    ) -> Result<tonic::Response<PredictionResponse>, Status> {
        let (tx, mut rx) = mpsc::channel(STREAM_BUFFER);
        let state = self.state.clone();
        let asked = request.into_inner();
        let run = async move { run_one(&state, asked, &tx, |m| m.map(prediction)).await };
        // Parts are joined as they come, so that a long stream is not held twice.
        let collect = async {
            let mut whole = Vec::new();
            while let Some(part) = rx.recv().await {
                let part = part?.prediction;
                if whole.len() + part.len() > MAX_JOINED {
                    return Err(Status::resource_exhausted(format!(
                        "the answer is longer than the {MAX_JOINED} bytes Predictions joins; \
                         call StreamPredictions for it"
                    )));
                }
                whole.extend_from_slice(&part);
            }
            Ok(whole)
        };
        let ((), whole) = tokio::join!(run, collect);
        whole.map(|w| tonic::Response::new(prediction(w)))
    }

    type StreamPredictionsStream = Answers;

    async fn stream_predictions(
        &self,
        request: tonic::Request<PredictionsRequest>,
    ) -> Result<tonic::Response<Self::StreamPredictionsStream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let state = self.state.clone();
        let asked = request.into_inner();
        tokio::spawn(async move {
            // A client that goes away drops the call, and so its job.
            tokio::select! {
                () = run_one(&state, asked, &tx, |m| m.map(prediction)) => {}
                () = tx.closed() => {}
            }
        });
        Ok(tonic::Response::new(answers(rx)))
    }

    type StreamPredictions2Stream = Answers;

    async fn stream_predictions2(
        &self,
        request: tonic::Request<tonic::Streaming<PredictionsRequest>>,
    ) -> Result<tonic::Response<Self::StreamPredictions2Stream>, Status> {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let state = self.state.clone();
        let mut incoming = request.into_inner();
        let idle = self.state.config.body_idle_timeout;
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = tokio::time::timeout(idle, incoming.message()) => next,
                    () = tx.closed() => break,
                };
                let asked = match next {
                    Ok(Ok(Some(asked))) => asked,
                    Ok(Ok(None)) => break,
                    Ok(Err(e)) => {
                        let _ = tx.send(Err(e)).await;
                        break;
                    }
                    Err(_) => {
                        let _ = tx
                            .send(Err(Status::deadline_exceeded(format!(
                                "no request for {} s (body_idle_timeout)",
                                idle.as_secs()
                            ))))
                            .await;
                        break;
                    }
                };
                if state.is_draining() {
                    let _ = tx.send(Err(status(&ApiError::shutting_down()))).await;
                    break;
                }
                // Each answer carries its request's sequence; an error is its `status`, and
                // the stream goes on.
                let sequence = asked.sequence_id.clone();
                let message = move |m: Result<Vec<u8>, Status>| {
                    Ok(match m {
                        Ok(bytes) => PredictionResponse {
                            prediction: bytes,
                            sequence_id: sequence.clone(),
                            status: None,
                        },
                        Err(e) => PredictionResponse {
                            prediction: Vec::new(),
                            sequence_id: sequence.clone(),
                            status: Some(rpc::Status {
                                code: e.code() as i32,
                                message: e.message().to_owned(),
                                details: Vec::new(),
                            }),
                        },
                    })
                };
                tokio::select! {
                    () = run_one(&state, asked, &tx, message) => {}
                    () = tx.closed() => break,
                }
            }
        });
        Ok(tonic::Response::new(answers(rx)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn plugin_errors_keep_their_meaning_as_grpc_codes() {
        let mut r = Response::ok("text/plain", "bad input");
        r.status = 400;
        let s = refused(&r);
        assert_eq!(
            (s.code(), s.message()),
            (Code::InvalidArgument, "bad input")
        );
    }
}
