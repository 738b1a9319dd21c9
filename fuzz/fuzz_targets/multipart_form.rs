//! The multipart form reader of prediction requests (actix-multipart under the server's byte
//! cap): the first input byte picks how the body is split into chunks, the rest is the body of
//! a form with a fixed boundary.
#![no_main]

use std::time::Duration;

use actix_web::http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use actix_web::web::Bytes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(split).max(1);
    let chunks: Vec<Result<Bytes, actix_web::error::PayloadError>> = body
        .chunks(chunk)
        .map(|c| Ok(Bytes::copy_from_slice(c)))
        .collect();
    let mut headers = HeaderMap::new();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("multipart/form-data; boundary=XyZ"),
    );
    let local = tokio::task::LocalSet::new();
    RUNTIME.with(|runtime| local.block_on(runtime, async {
        let stream = futures_util::stream::iter(chunks);
        let _ = cresset::http::body::read_form(&headers, stream, 1 << 16, Duration::from_secs(5))
            .await;
    }));
});

thread_local! {
    /// One runtime for every input (building one per input made the target 1000 times slower).
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
}
