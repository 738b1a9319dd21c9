//! The Open Inference Protocol over gRPC (`inference.GRPCInferenceService`, from
//! `proto/grpc_predict_v2.proto`) on the gRPC listener (`grpc_address`; off unless set).
//!
//! It is the REST protocol's twin: the same readiness, the same metadata, and `ModelInfer` goes
//! through the same path as `POST /v2/models/{m}/infer` (the request becomes the v2 JSON body,
//! checked by the same check and run by [`crate::http::run_v2`]), so a model answers both alike.
//! Tensors arrive in `contents` or `raw_input_contents`; outputs go back in
//! `raw_output_contents`, as Triton answers and as tritonclient reads them. The inference token
//! is `authorization: Bearer <key>` metadata; messages are capped at `max_request_size`, and
//! a request takes an in-flight permit (`max_concurrent_requests`) like a REST one. During a
//! shutdown, readiness is false and inference refused, as over REST.

use std::collections::HashMap;
use std::sync::Arc;

use cresset_plugin_api::{KeyValue, Request};
use serde_json::{json, Map, Value};
use tonic::Status;

use crate::http::{ApiError, AppState};
use crate::tensor_wire;

pub use super::proto::inference as proto;

use super::{code_for, status};
use proto::grpc_inference_service_server::{GrpcInferenceService, GrpcInferenceServiceServer};
use proto::infer_parameter::ParameterChoice;
use proto::model_infer_response::InferOutputTensor;
use proto::*;

/// The service, over the server's state.
pub struct Service {
    state: Arc<AppState>,
}

/// The service as tonic serves it, with the server's message size cap.
pub fn service(state: Arc<AppState>) -> GrpcInferenceServiceServer<Service> {
    let max = state.config.max_request_size;
    GrpcInferenceServiceServer::new(Service { state })
        .max_decoding_message_size(max)
        .max_encoding_message_size(usize::MAX)
}

impl Service {
    fn version(
        &self,
        name: &str,
        version: &str,
    ) -> Result<Arc<crate::registry::ModelVersion>, Status> {
        let version = (!version.is_empty()).then_some(version);
        self.state
            .registry
            .get(name, version)
            .map_err(|e| status(&ApiError::from(e)))
    }
}

#[tonic::async_trait]
impl GrpcInferenceService for Service {
    // Health needs no token, as REST's `/v2/health/*` does not.
    async fn server_live(
        &self,
        _request: tonic::Request<ServerLiveRequest>,
    ) -> Result<tonic::Response<ServerLiveResponse>, Status> {
        Ok(tonic::Response::new(ServerLiveResponse { live: true }))
    }

    async fn server_ready(
        &self,
        _request: tonic::Request<ServerReadyRequest>,
    ) -> Result<tonic::Response<ServerReadyResponse>, Status> {
        let (ready, _) = crate::http::readiness(&self.state);
        Ok(tonic::Response::new(ServerReadyResponse { ready }))
    }

    async fn model_ready(
        &self,
        request: tonic::Request<ModelReadyRequest>,
    ) -> Result<tonic::Response<ModelReadyResponse>, Status> {
        let asked = request.get_ref();
        let v = self.version(&asked.name, &asked.version)?;
        let ready = crate::http::model_is_ready(&self.state, &v);
        Ok(tonic::Response::new(ModelReadyResponse { ready }))
    }

    async fn server_metadata(
        &self,
        _request: tonic::Request<ServerMetadataRequest>,
    ) -> Result<tonic::Response<ServerMetadataResponse>, Status> {
        Ok(tonic::Response::new(ServerMetadataResponse {
            name: "cresset".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            extensions: Vec::new(),
        }))
    }

    async fn model_metadata(
        &self,
        request: tonic::Request<ModelMetadataRequest>,
    ) -> Result<tonic::Response<ModelMetadataResponse>, Status> {
        let asked = request.get_ref();
        let version = (!asked.version.is_empty()).then_some(asked.version.as_str());
        let (versions, platform) = crate::http::model_metadata(&self.state, &asked.name, version)
            .map_err(|e| status(&e))?;
        Ok(tonic::Response::new(ModelMetadataResponse {
            name: asked.name.clone(),
            versions,
            platform,
            inputs: Vec::new(),
            outputs: Vec::new(),
        }))
    }

    async fn model_infer(
        &self,
        request: tonic::Request<ModelInferRequest>,
    ) -> Result<tonic::Response<ModelInferResponse>, Status> {
        let state = &self.state;
        // A body slot, as a REST body takes while it arrives, held until the answer is made:
        // it bounds the calls being converted at once, and a shutdown counts this call from
        // here to its answer.
        let _slot =
            state.in_transit.clone().try_acquire_owned().map_err(|_| {
                status(&ApiError::TooManyBodies(state.config.max_bodies_in_transit))
            })?;
        if state.is_draining() {
            return Err(status(&ApiError::shutting_down()));
        }
        let asked = request.into_inner();
        let target = self.version(&asked.model_name, &asked.model_version)?;
        let started = std::time::Instant::now();
        let id = if asked.id.is_empty() || asked.id.len() > 128 {
            uuid::Uuid::new_v4().to_string()
        } else {
            asked.id.clone()
        };
        let model_name = asked.model_name.clone();
        let max = state.config.max_request_size;
        let result = async {
            // The tensors' conversion to the JSON body runs off the server's async thread.
            let body = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, ApiError> {
                let body = request_json(&asked, max).map_err(ApiError::BadRequest)?;
                let body =
                    serde_json::to_vec(&body).map_err(|e| ApiError::Internal(e.to_string()))?;
                crate::http::check_v2(&body).map_err(ApiError::BadRequest)?;
                Ok(body)
            })
            .await
            .map_err(|e| ApiError::Internal(format!("converting the request failed: {e}")))??;
            let permit = crate::http::acquire(state, &target)?;
            let plugin_request = Request {
                id: id.as_str().into(),
                content_type: "application/json".into(),
                body: body.into(),
                headers: Vec::new().into(),
                params: vec![KeyValue::new("cresset-protocol", "kserve-v2")].into(),
            };
            let response =
                crate::http::run_v2(&target, &model_name, plugin_request, None, permit).await?;
            Ok(response)
        }
        .await;
        // An error is (HTTP status, gRPC status); a plugin's own error status keeps its meaning
        // (400 stays INVALID_ARGUMENT).
        let result: Result<ModelInferResponse, (u16, Status)> = match result {
            Err(e) => Err((
                actix_web::ResponseError::status_code(&e).as_u16(),
                status(&e),
            )),
            Ok(response) if response.status != 200 => Err((
                response.status,
                Status::new(
                    code_for(response.status),
                    String::from_utf8_lossy(&response.body).into_owned(),
                ),
            )),
            Ok(response) => {
                // The answer's conversion to raw outputs, off the async thread too.
                let id = id.clone();
                tokio::task::spawn_blocking(move || response_message(&response.body, &id))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
                    .map_err(|e| (500, Status::internal(e)))
            }
        };
        let code = result.as_ref().map_or_else(|(code, _)| *code, |_| 200);
        state.metrics.record_request(
            &target.name,
            &target.version,
            code,
            started.elapsed().as_secs_f64(),
        );
        result.map(tonic::Response::new).map_err(|(_, s)| s)
    }
}

/// A parameter as JSON.
fn parameter(p: &InferParameter) -> Value {
    match &p.parameter_choice {
        Some(ParameterChoice::BoolParam(b)) => json!(b),
        Some(ParameterChoice::Int64Param(i)) => json!(i),
        Some(ParameterChoice::StringParam(s)) => json!(s),
        Some(ParameterChoice::DoubleParam(d)) => json!(d),
        Some(ParameterChoice::Uint64Param(u)) => json!(u),
        None => Value::Null,
    }
}

/// Parameters as a JSON object, without the wire's own (`binary_data_size`, `binary_data`,
/// `binary_data_output`: gRPC's outputs are always raw).
fn parameters(map: &HashMap<String, InferParameter>) -> Option<Value> {
    let object: Map<String, Value> = map
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "binary_data_size" | "binary_data" | "binary_data_output"
            )
        })
        .map(|(k, v)| (k.clone(), parameter(v)))
        .collect();
    (!object.is_empty()).then_some(Value::Object(object))
}

/// A gRPC infer request as the v2 JSON body REST takes. Raw contents may hold at most as many
/// elements as a JSON body of `max_request_size` bytes could (half as many as its bytes), so
/// that a binary request costs no more memory than a JSON one.
pub fn request_json(request: &ModelInferRequest, max_request_size: usize) -> Result<Value, String> {
    let raw = &request.raw_input_contents;
    if !raw.is_empty() && raw.len() != request.inputs.len() {
        return Err(format!(
            "`raw_input_contents` has {} entries for {} inputs: one per input",
            raw.len(),
            request.inputs.len()
        ));
    }
    let mut inputs = Vec::with_capacity(request.inputs.len());
    let mut elements = 0usize;
    for (i, input) in request.inputs.iter().enumerate() {
        let field = |m: String| format!("`inputs[{i}]` ({}): {m}", input.name);
        let data = match raw.get(i) {
            Some(bytes) => {
                if input.contents.is_some() {
                    return Err(field(
                        "has both `contents` and raw_input_contents: send one".into(),
                    ));
                }
                tensor_wire::check_size(&input.datatype, Some(&input.shape), bytes.len())
                    .map_err(|e| field(format!("its raw contents are {e}")))?;
                let data = tensor_wire::decode(&input.datatype, bytes).map_err(field)?;
                elements += data.len();
                tensor_wire::check_elements(elements, max_request_size)?;
                data
            }
            None => contents(&input.datatype, input.contents.as_ref()).map_err(field)?,
        };
        let mut object = json!({
            "name": input.name,
            "shape": input.shape,
            "datatype": input.datatype,
            "data": data,
        });
        if let Some(p) = parameters(&input.parameters) {
            object["parameters"] = p;
        }
        inputs.push(object);
    }
    let mut body = json!({ "inputs": inputs });
    if !request.id.is_empty() {
        body["id"] = json!(request.id);
    }
    if let Some(p) = parameters(&request.parameters) {
        body["parameters"] = p;
    }
    if !request.outputs.is_empty() {
        body["outputs"] = request
            .outputs
            .iter()
            .map(|o| {
                let mut object = json!({ "name": o.name });
                if let Some(p) = parameters(&o.parameters) {
                    object["parameters"] = p;
                }
                object
            })
            .collect();
    }
    Ok(body)
}

/// The elements of typed `contents`, from the field the datatype uses.
fn contents(datatype: &str, contents: Option<&InferTensorContents>) -> Result<Vec<Value>, String> {
    let empty = InferTensorContents::default();
    let c = contents.unwrap_or(&empty);
    Ok(match datatype {
        "BOOL" => c.bool_contents.iter().map(|&b| json!(b)).collect(),
        "INT8" | "INT16" | "INT32" => c.int_contents.iter().map(|&v| json!(v)).collect(),
        "INT64" => c.int64_contents.iter().map(|&v| json!(v)).collect(),
        "UINT8" | "UINT16" | "UINT32" => c.uint_contents.iter().map(|&v| json!(v)).collect(),
        "UINT64" => c.uint64_contents.iter().map(|&v| json!(v)).collect(),
        "FP32" => c
            .fp32_contents
            .iter()
            .map(|&v| tensor_wire::number(f64::from(v)))
            .collect::<Result<_, _>>()?,
        "FP64" => c
            .fp64_contents
            .iter()
            .map(|&v| tensor_wire::number(v))
            .collect::<Result<_, _>>()?,
        "BYTES" => c
            .bytes_contents
            .iter()
            .map(|b| {
                std::str::from_utf8(b)
                    .map(|s| json!(s))
                    .map_err(|_| "a BYTES element is not UTF-8 text".to_owned())
            })
            .collect::<Result<_, _>>()?,
        "FP16" | "BF16" => {
            return Err(format!(
                "{datatype} has no `contents` field: send it in raw_input_contents"
            ))
        }
        other => return Err(format!("unknown datatype {other}")),
    })
}

/// The model's v2 JSON answer as a gRPC response: each output's data as raw bytes.
pub fn response_message(answer: &[u8], id: &str) -> Result<ModelInferResponse, String> {
    let value: Value = serde_json::from_slice(answer)
        .map_err(|e| format!("the model's v2 answer is not JSON: {e}"))?;
    let text = |key: &str| value.get(key).and_then(Value::as_str).unwrap_or_default();
    let mut response = ModelInferResponse {
        model_name: text("model_name").into(),
        model_version: text("model_version").into(),
        id: id.into(),
        ..ModelInferResponse::default()
    };
    let outputs = value
        .get("outputs")
        .and_then(Value::as_array)
        .ok_or("the model's v2 answer has no `outputs` list")?;
    for (i, output) in outputs.iter().enumerate() {
        let datatype = output
            .get("datatype")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("`outputs[{i}]` has no datatype"))?;
        let shape: Vec<i64> = output
            .get("shape")
            .and_then(Value::as_array)
            .map(|s| s.iter().filter_map(Value::as_i64).collect())
            .unwrap_or_default();
        let data = output.get("data").unwrap_or(&Value::Null);
        let bytes =
            tensor_wire::encode(datatype, data).map_err(|e| format!("`outputs[{i}]`: {e}"))?;
        response.outputs.push(InferOutputTensor {
            name: output
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .into(),
            datatype: datatype.into(),
            shape,
            parameters: HashMap::new(),
            contents: None,
        });
        response.raw_output_contents.push(bytes);
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(name: &str, datatype: &str, shape: &[i64]) -> model_infer_request::InferInputTensor {
        model_infer_request::InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape: shape.to_vec(),
            ..Default::default()
        }
    }

    #[test]
    fn raw_and_typed_inputs_become_the_rest_body() {
        let mut typed = input("x", "FP32", &[1, 2]);
        typed.contents = Some(InferTensorContents {
            fp32_contents: vec![0.5, 1.5],
            ..Default::default()
        });
        let request = ModelInferRequest {
            model_name: "m".into(),
            id: "r1".into(),
            inputs: vec![typed],
            ..Default::default()
        };
        let body = request_json(&request, 1 << 20).expect("json");
        assert_eq!(
            body,
            json!({"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32",
                               "data": [0.5, 1.5]}], "id": "r1"})
        );
        let mut raw = Vec::new();
        raw.extend(0.5f32.to_le_bytes());
        raw.extend(1.5f32.to_le_bytes());
        let request = ModelInferRequest {
            inputs: vec![input("x", "FP32", &[1, 2])],
            raw_input_contents: vec![raw.clone()],
            ..Default::default()
        };
        assert_eq!(
            request_json(&request, 1 << 20).expect("json")["inputs"][0]["data"],
            json!([0.5, 1.5])
        );
        // Raw bytes that disagree with the shape, or a count of raw entries that disagrees
        // with the inputs, are refused.
        for (inputs, raws, says) in [
            (
                vec![input("x", "FP32", &[3])],
                vec![raw.clone()],
                "not the 12",
            ),
            (
                vec![input("x", "FP32", &[2]), input("y", "FP32", &[2])],
                vec![raw.clone()],
                "1 entries for 2 inputs",
            ),
            (vec![input("h", "FP16", &[1])], vec![], "raw_input_contents"),
        ] {
            let request = ModelInferRequest {
                inputs,
                raw_input_contents: raws,
                ..Default::default()
            };
            let err = request_json(&request, 1 << 20).expect_err(says);
            assert!(err.contains(says), "{says}: {err}");
        }
    }

    #[test]
    fn answers_go_back_as_raw_outputs() {
        let answer = json!({"model_name": "m", "model_version": "1.0", "outputs": [
            {"name": "y", "shape": [2], "datatype": "INT64", "data": [1, 2]}]});
        let response =
            response_message(&serde_json::to_vec(&answer).expect("json"), "r").expect("message");
        assert_eq!(response.model_version, "1.0");
        assert_eq!(response.outputs[0].shape, [2]);
        assert_eq!(response.raw_output_contents[0].len(), 16);
        assert!(response_message(b"{}", "r").is_err());
    }
}
