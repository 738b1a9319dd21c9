//! Request bodies shared by the inference and management APIs: multipart forms counted byte
//! for byte, and reads that give up when a body stalls.

use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;

use actix_web::http::header::HeaderMap;
use actix_web::web::Bytes;
use actix_web::HttpRequest;
use cresset_plugin_api::KeyValue;
use futures_util::{FutureExt, Stream, StreamExt};

use super::ApiError;

/// Parameters whose names start with this are the server's to give (a client's are dropped).
pub const RESERVED_PREFIX: &str = "cresset-";
/// The parameter naming the multipart field that became the body (`data` or `body`).
pub const BODY_FIELD: &str = "cresset-body-field";

/// Whether the request is a `multipart/form-data` form.
pub fn is_multipart(req: &HttpRequest) -> bool {
    req.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/form-data"))
}

/// A multipart form over `payload` that counts every byte, part headers included
/// (actix-multipart buffers part headers without a cap of its own), and fails past `max`.
/// The second value tells, after a failure, whether it was the cap.
pub fn capped_multipart<S>(
    headers: &HeaderMap,
    payload: S,
    max: u64,
) -> (actix_multipart::Multipart, impl Fn() -> bool)
where
    S: Stream<Item = Result<Bytes, actix_web::error::PayloadError>> + 'static,
{
    let seen = Rc::new(Cell::new(0u64));
    let counter = seen.clone();
    let limited = payload.map(move |chunk| {
        let chunk = chunk?;
        counter.set(counter.get() + chunk.len() as u64);
        if counter.get() > max {
            Err(actix_web::error::PayloadError::Overflow)
        } else {
            Ok(chunk)
        }
    });
    (
        actix_multipart::Multipart::new(headers, limited),
        move || seen.get() > max,
    )
}

/// Run a body parser so that a panic in it (a bug here or in a library: fuzzing found one in
/// actix-multipart 0.7) fails this request with a 400 instead of unwinding through the HTTP
/// worker thread, which would drop every connection that thread serves.
pub async fn without_panics<T>(
    what: &str,
    parse: impl std::future::Future<Output = Result<T, ApiError>>,
) -> Result<T, ApiError> {
    match std::panic::AssertUnwindSafe(parse).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let why = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!("the {what} parser panicked ({why}); the request is refused");
            Err(ApiError::BadRequest(format!(
                "the {what} could not be parsed"
            )))
        }
    }
}

/// The next item of a body stream, unless `idle` passes first with nothing arriving: a stalled
/// body is refused (408) instead of holding its slot for a fixed total time.
pub async fn next_within<F: std::future::Future<Output = Option<T>>, T>(
    idle: Duration,
    next: F,
) -> Result<Option<T>, ApiError> {
    tokio::time::timeout(idle, next)
        .await
        .map_err(|_| ApiError::BodyStalled(idle.as_secs()))
}

/// A prediction's multipart form: the `data` (or `body`) field is the request body, with its
/// part's content type, and the other fields become parameters. Every byte counts against
/// `max` (413), and each must arrive within `idle` (408).
pub async fn read_form<S>(
    headers: &HeaderMap,
    payload: S,
    max: usize,
    idle: Duration,
) -> Result<(String, Vec<u8>, Vec<KeyValue>), ApiError>
where
    S: Stream<Item = Result<Bytes, actix_web::error::PayloadError>> + 'static,
{
    let (mut form, over_cap) = capped_multipart(headers, payload, max as u64);
    let failed = |what: String| {
        if over_cap() {
            ApiError::PayloadTooLarge(max)
        } else {
            ApiError::BadRequest(what)
        }
    };
    let mut data: Option<(String, Vec<u8>)> = None;
    let mut params = Vec::new();
    while let Some(field) = next_within(idle, form.next()).await? {
        let mut field = field.map_err(|e| failed(format!("malformed multipart body: {e}")))?;
        let name = field.name().unwrap_or_default().to_owned();
        let field_type = field
            .content_type()
            .map(|m| m.to_string())
            .unwrap_or_default();
        let mut bytes = Vec::new();
        while let Some(chunk) = next_within(idle, field.next()).await? {
            let chunk =
                chunk.map_err(|e| failed(format!("malformed multipart field `{name}`: {e}")))?;
            bytes.extend_from_slice(&chunk);
        }
        if (name == "data" || name == "body") && data.is_none() {
            data = Some((field_type, bytes));
            // Which of the two it was, for handlers that look it up by name (TorchServe's).
            params.push(KeyValue::new(BODY_FIELD, name));
        } else if name.starts_with(RESERVED_PREFIX) {
            // The server's own parameters are not the client's to give.
            continue;
        } else {
            params.push(KeyValue::new(
                name,
                String::from_utf8_lossy(&bytes).into_owned(),
            ));
        }
    }
    let (content_type, body) =
        data.ok_or_else(|| ApiError::BadRequest("the multipart form has no `data` field".into()))?;
    Ok((content_type, body, params))
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderValue, CONTENT_TYPE};

    fn read(boundary: &str, body: &'static [u8], chunk: usize) -> Result<Vec<u8>, ApiError> {
        read_all(boundary, body, chunk).map(|(body, _)| body)
    }

    /// The body and the parameters of a form.
    fn read_all(
        boundary: &str,
        body: &'static [u8],
        chunk: usize,
    ) -> Result<(Vec<u8>, Vec<KeyValue>), ApiError> {
        let mut headers = HeaderMap::new();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_str(&format!("multipart/form-data; boundary={boundary}"))
                .expect("header"),
        );
        let chunks: Vec<Result<Bytes, actix_web::error::PayloadError>> = body
            .chunks(chunk)
            .map(|c| Ok(Bytes::from_static(c)))
            .collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        tokio::task::LocalSet::new().block_on(&runtime, async {
            read_form(
                &headers,
                futures_util::stream::iter(chunks),
                1 << 16,
                Duration::from_secs(5),
            )
            .await
            .map(|(_, body, params)| (body, params))
        })
    }

    /// Found by the `multipart_form` fuzz target: with a boundary of 3 characters, a line shorter
    /// than the boundary's `--` and line break made actix-multipart 0.7 slice out of bounds and
    /// panic, killing the HTTP worker thread (and every connection on it).
    #[test]
    fn a_line_shorter_than_the_boundary_marker_is_refused_not_a_panic() {
        let body: &[u8] = b"--X\ryZ\nContent-Disposition: ation/o\xbd\"topk*\r\n\r\n4\r\n--\nContent-Disposition: XyZ4\r\n--XyZ-~-~-\r\n";
        for chunk in [1, 7, body.len()] {
            assert!(read("XyZ", body, chunk).is_err());
        }
        assert!(read("a", b"x\r\n--a\r\n", 3).is_err());
    }

    #[test]
    fn a_parser_that_panics_fails_its_request_with_a_400() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let result: Result<(), ApiError> =
            runtime.block_on(without_panics("multipart body", async {
                let line: &[u8] = b"ab";
                // What actix-multipart 0.7 did with a short line.
                let _ = &line[2..line.len() - 1];
                Ok(())
            }));
        let err = result.expect_err("the panic is an error");
        assert!(matches!(err, ApiError::BadRequest(_)), "{err}");
    }

    #[test]
    fn the_data_field_is_the_body() {
        let body: &[u8] =
            b"--XyZ\r\nContent-Disposition: form-data; name=\"data\"\r\n\r\nhello\r\n--XyZ--\r\n";
        assert_eq!(read("XyZ", body, 5).expect("a form"), b"hello");
    }

    #[test]
    fn other_fields_are_parameters_the_body_field_is_named_and_reserved_names_are_dropped() {
        let body: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"topk\"\r\n\r\n3\r\n\
            --XyZ\r\nContent-Disposition: form-data; name=\"cresset-protocol\"\r\n\r\nkserve\r\n\
            --XyZ\r\nContent-Disposition: form-data; name=\"body\"\r\n\r\nhello\r\n--XyZ--\r\n";
        let (data, params) = read_all("XyZ", body, 7).expect("a form");
        assert_eq!(data, b"hello");
        let params: Vec<(&str, &str)> = params
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect();
        assert_eq!(params, [("topk", "3"), (BODY_FIELD, "body")]);
    }
}
