//! Token authorization, as TorchServe >= 0.11 has it: an inference key and a management key,
//! kept in a key file made with mode 0600 at first start, sent as `Authorization: Bearer`.
//! Keys are compared in constant time. A missing or wrong token is a 401 (TorchServe answers
//! 400). Health routes need no token, so that Kubernetes probes work.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};
use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

use super::ApiError;

/// Routes that never need a token.
const OPEN_PATHS: &[&str] = &["/ping", "/v2/health/live", "/v2/health/ready"];

/// The keys of the key file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ApiKeys {
    /// For the inference API.
    pub inference: String,
    /// For the management and metrics APIs.
    pub management: String,
}

fn new_key() -> anyhow::Result<String> {
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut bytes))
        .context("cannot read /dev/urandom for a token")?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

impl ApiKeys {
    /// Read the key file, or create it (mode 0600) with fresh keys. A key file that other
    /// users can read is refused.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        match std::fs::metadata(path) {
            Ok(meta) => {
                if meta.mode() & 0o077 != 0 {
                    bail!(
                        "the key file {} can be read by other users: chmod 600 it",
                        path.display()
                    );
                }
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read the key file {}", path.display()))?;
                let keys: ApiKeys = serde_json::from_str(&text)
                    .with_context(|| format!("the key file {} is not valid", path.display()))?;
                if keys.inference.len() < 16 || keys.management.len() < 16 {
                    bail!(
                        "the keys in {} must be at least 16 characters",
                        path.display()
                    );
                }
                Ok(keys)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let keys = ApiKeys {
                    inference: new_key()?,
                    management: new_key()?,
                };
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir)?;
                }
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .with_context(|| format!("cannot create the key file {}", path.display()))?;
                file.write_all(serde_json::to_string_pretty(&keys)?.as_bytes())?;
                file.sync_all()?;
                tracing::info!(file = %path.display(), "created API keys (mode 0600)");
                Ok(keys)
            }
            Err(e) => {
                Err(e).with_context(|| format!("cannot read the key file {}", path.display()))
            }
        }
    }
}

/// The token a listener requires (`None`: auth is off).
#[derive(Debug, Clone)]
pub struct RequiredToken(pub Option<String>);

/// Equal in constant time for equal lengths (the length of a key is not a secret).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The token of an `Authorization: Bearer <token>` value. The scheme is case-insensitive
/// (RFC 9110 section 11.1): `bearer` and `BEARER` are `Bearer`.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim_start().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Check an `Authorization` value (HTTP header or gRPC metadata) against `key`: why it is
/// refused, if it is.
pub(crate) fn check_bearer(given: Option<&str>, key: &str) -> Result<(), &'static str> {
    match given.and_then(bearer_token) {
        None => {
            Err("this API needs a token: send `Authorization: Bearer <key>` (see the key file)")
        }
        Some(token) if !same(token.as_bytes(), key.as_bytes()) => {
            Err("the token is not valid for this API")
        }
        Some(_) => Ok(()),
    }
}

/// Middleware: check `Authorization: Bearer <token>` against the listener's required token.
pub async fn require_token<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let required = req
        .app_data::<web::Data<RequiredToken>>()
        .and_then(|t| t.0.clone());
    if let Some(key) = required {
        if !OPEN_PATHS.contains(&req.path()) {
            let given = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if let Err(problem) = check_bearer(given, &key) {
                let mut response = ApiError::Unauthorized(problem.into()).error_response();
                response.headers_mut().insert(
                    actix_web::http::header::WWW_AUTHENTICATE,
                    actix_web::http::header::HeaderValue::from_static("Bearer"),
                );
                return Ok(req.into_response(response).map_into_boxed_body());
            }
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_private_reused_and_refused_when_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys.json");
        let keys = ApiKeys::load_or_create(&path).expect("create");
        assert_eq!(
            std::fs::metadata(&path).expect("stat").mode() & 0o777,
            0o600
        );
        assert_ne!(keys.inference, keys.management);
        assert_eq!(ApiKeys::load_or_create(&path).expect("reuse"), keys);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = ApiKeys::load_or_create(&path)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc"), Some("abc"));
        assert_eq!(bearer_token("BEARER  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }

    #[test]
    fn tokens_compare_by_content() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
    }
}
