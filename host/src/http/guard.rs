//! Guards in front of the routes: request headers over `max_header_size` get 431 (every
//! listener), and the management and metrics APIs refuse what a browser sends on a web page's
//! behalf (tokens or not):
//!
//! - an `Origin` header that is not the listener's own origin: a cross-site request, such as a
//!   form or `fetch` "simple" request from any page the operator visits;
//! - a `Host` header that is not the bound address, `localhost` or a name in `allowed_hosts`:
//!   DNS rebinding, where a page's own name is re-pointed at 127.0.0.1 so that its requests
//!   look same-origin.
//!
//! Both are 403 with the reason. Clients that are not browsers (curl, SDKs, Kubernetes) send no
//! `Origin` and the `Host` they dialled, and are not affected.

use std::net::{IpAddr, SocketAddr};

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::middleware::Next;
use actix_web::{web, ResponseError};

use super::ApiError;

/// The cap on each request header, shared by every listener.
#[derive(Debug, Clone, Copy)]
pub struct HeaderLimit(pub usize);

/// Middleware: 431 for a header over the cap.
pub async fn limit_headers<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    if let Some(limit) = req.app_data::<web::Data<HeaderLimit>>().map(|l| l.0) {
        let over = req
            .headers()
            .iter()
            .map(|(name, value)| (name, name.as_str().len() + value.len()))
            .find(|(_, size)| *size > limit);
        if let Some((name, size)) = over {
            let error = ApiError::HeaderTooLarge {
                name: name.as_str().chars().take(64).collect(),
                size,
                max: limit,
            };
            return Ok(req
                .into_response(error.error_response())
                .map_into_boxed_body());
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

/// What a listener answers to.
#[derive(Debug, Clone)]
pub struct BrowserGuard {
    /// The address it is bound to.
    pub bound: SocketAddr,
    /// Extra host names (lower-case), from `allowed_hosts`.
    pub allowed_hosts: Vec<String>,
}

/// The host part of a `Host` header or an origin's authority, lower-case, without the port or
/// IPv6 brackets.
fn host_part(authority: &str) -> String {
    let authority = authority.trim().to_ascii_lowercase();
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_owned();
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host.to_owned(),
        _ => authority,
    }
}

impl BrowserGuard {
    /// Why a request with these `Host` and `Origin` headers is refused, if it is.
    pub fn check(&self, host: Option<&str>, origin: Option<&str>) -> Result<(), String> {
        if let Some(host) = host {
            let name = host_part(host);
            let allowed = match name.parse::<IpAddr>() {
                // An address cannot be re-pointed by DNS; any of ours is fine when bound to all.
                Ok(ip) => ip == self.bound.ip() || self.bound.ip().is_unspecified(),
                Err(_) => {
                    name == "localhost"
                        || name.trim_end_matches('.') == "localhost"
                        || self.allowed_hosts.contains(&name)
                }
            };
            if !allowed {
                return Err(format!(
                    "`Host` {host:?} is not this listener's address, `localhost` or a name in `allowed_hosts`; refused (DNS rebinding protection)"
                ));
            }
        }
        if let Some(origin) = origin {
            let own = origin
                .split_once("://")
                .filter(|(scheme, _)| matches!(*scheme, "http" | "https"))
                .map(|(_, authority)| authority.trim_end_matches('/'))
                .zip(host)
                .is_some_and(|(authority, host)| authority.eq_ignore_ascii_case(host.trim()));
            if !own {
                return Err(format!(
                    "cross-origin requests to this API are refused (`Origin` {origin:?} is not this listener's origin)"
                ));
            }
        }
        Ok(())
    }
}

/// Middleware: refuse browser-made cross-origin and rebound requests (see the module docs).
pub async fn refuse_browsers<B: MessageBody + 'static>(
    req: ServiceRequest,
    next: Next<B>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    if let Some(guard) = req.app_data::<web::Data<BrowserGuard>>() {
        let header = |name: &str| {
            req.headers()
                .get(name)
                .map(|v| v.to_str().unwrap_or("\u{fffd}"))
        };
        if let Err(why) = guard.check(header("host"), header("origin")) {
            tracing::warn!(
                path = %req.path(),
                peer = %req.peer_addr().map(|a| a.to_string()).unwrap_or_default(),
                "{why}"
            );
            let response = ApiError::Forbidden(why).error_response();
            return Ok(req.into_response(response).map_into_boxed_body());
        }
    }
    next.call(req)
        .await
        .map(ServiceResponse::map_into_boxed_body)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(bound: &str, names: &[&str]) -> BrowserGuard {
        BrowserGuard {
            bound: bound.parse().expect("address"),
            allowed_hosts: names.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn hosts_must_be_the_bound_address_localhost_or_configured() {
        let g = guard("127.0.0.1:8081", &["cresset.internal"]);
        assert!(g.check(Some("127.0.0.1:8081"), None).is_ok());
        assert!(g.check(Some("localhost:8081"), None).is_ok());
        assert!(g.check(Some("LOCALHOST"), None).is_ok());
        assert!(g.check(Some("cresset.internal:8081"), None).is_ok());
        assert!(g.check(Some("evil.example:8081"), None).is_err());
        assert!(g.check(Some("10.0.0.1:8081"), None).is_err());
        assert!(
            g.check(None, None).is_ok(),
            "HTTP/1.0 without Host is not a browser"
        );
        let all = guard("0.0.0.0:8081", &[]);
        assert!(all.check(Some("10.0.0.1:8081"), None).is_ok());
        assert!(all.check(Some("[::1]:8081"), None).is_ok());
        assert!(all.check(Some("evil.example"), None).is_err());
    }

    #[test]
    fn origins_must_be_the_listeners_own() {
        let g = guard("127.0.0.1:8081", &[]);
        assert!(g
            .check(Some("127.0.0.1:8081"), Some("http://127.0.0.1:8081"))
            .is_ok());
        let err = g
            .check(Some("127.0.0.1:8081"), Some("http://evil.example"))
            .expect_err("cross-site");
        assert!(err.contains("cross-origin"), "{err}");
        assert!(g.check(Some("127.0.0.1:8081"), Some("null")).is_err());
        assert!(g
            .check(Some("localhost:8081"), Some("http://localhost:9999"))
            .is_err());
        // The attack of the issue: a rebound name with its own origin.
        assert!(g
            .check(Some("evil.example:8081"), Some("http://evil.example:8081"))
            .is_err());
    }
}
