//! Request bodies shared by the inference and management APIs.

use std::cell::Cell;
use std::rc::Rc;

use actix_web::{web, HttpRequest};
use futures_util::StreamExt;

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
pub fn capped_multipart(
    req: &HttpRequest,
    payload: web::Payload,
    max: u64,
) -> (actix_multipart::Multipart, impl Fn() -> bool) {
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
        actix_multipart::Multipart::new(req.headers(), limited),
        move || seen.get() > max,
    )
}

/// The next item of a body stream, unless `idle` passes first with nothing arriving: a stalled
/// body is refused (408) instead of holding its slot for a fixed total time.
pub async fn next_within<F: std::future::Future<Output = Option<T>>, T>(
    idle: std::time::Duration,
    next: F,
) -> Result<Option<T>, super::ApiError> {
    tokio::time::timeout(idle, next)
        .await
        .map_err(|_| super::ApiError::BodyStalled(idle.as_secs()))
}
