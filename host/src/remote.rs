//! Archives registered by URL: which URLs are allowed (`allowed_urls`), and fetching them.
//!
//! An `allowed_urls` entry is matched against the *parsed* URL, part by part, never against the
//! raw string: `scheme://host[:port][/path]`, where each part is a regular expression that must
//! match that whole part. The URL is parsed and normalised first (lower-case scheme and host,
//! IDNA, dot segments resolved, `%2e` included), and a URL with user-info (`user@host`) is
//! refused outright, because `http://good.example@evil/` names the host `evil`. An entry without
//! a port allows the scheme's default port only; without a path, every path.
//!
//! A host given by name is resolved when the archive is fetched, and addresses that are
//! loopback, private, link-local, shared (CGNAT), multicast or unspecified are dropped unless
//! `allow_private_url_hosts` is on, so that a public name cannot be pointed at the server's own
//! network (DNS rebinding). A host written as an IP address is taken as the entry allows it:
//! the operator wrote that address. Redirects are not followed.

use std::net::IpAddr;

use regex::Regex;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};

/// One `allowed_urls` entry.
#[derive(Debug, Clone)]
struct UrlPattern {
    raw: String,
    scheme: Regex,
    host: Regex,
    /// `None`: the scheme's default port only.
    port: Option<Regex>,
    path: Regex,
}

fn whole(field: &str, part: &str, raw: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{part})$"))
        .map_err(|e| format!("`{field}` entry {raw:?} is not a valid pattern: {e}"))
}

impl UrlPattern {
    fn parse(raw: &str) -> Result<Self, String> {
        let bad = || {
            format!("`allowed_urls` entry {raw:?} must have the form scheme://host[:port][/path], each part a regular expression (e.g. `https://models\\.example\\.com/archives/.*`)")
        };
        let (scheme, rest) = raw.split_once("://").ok_or_else(bad)?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/.*"),
        };
        // The port follows the last `:` outside an IPv6 literal's brackets.
        let (host, port) = match authority.rfind(':') {
            Some(i) if !authority[i..].contains(']') => {
                (&authority[..i], Some(&authority[i + 1..]))
            }
            _ => (authority, None),
        };
        if scheme.is_empty() || host.is_empty() || authority.contains('@') {
            return Err(bad());
        }
        Ok(Self {
            raw: raw.to_owned(),
            scheme: whole("allowed_urls", scheme, raw)?,
            host: whole("allowed_urls", host, raw)?,
            port: port.map(|p| whole("allowed_urls", p, raw)).transpose()?,
            path: whole("allowed_urls", path, raw)?,
        })
    }

    fn matches(&self, url: &url::Url) -> bool {
        let host = match url.host() {
            Some(url::Host::Domain(d)) => d.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => format!("[{ip}]"),
            None => return false,
        };
        let port_ok = match (&self.port, url.port()) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(re), port) => port
                .or_else(|| url.port_or_known_default())
                .is_some_and(|p| re.is_match(&p.to_string())),
        };
        self.scheme.is_match(url.scheme())
            && self.host.is_match(&host)
            && port_ok
            && self.path.is_match(url.path())
    }
}

/// The URLs models may be registered from.
#[derive(Debug, Clone, Default)]
pub struct UrlPolicy {
    patterns: Vec<UrlPattern>,
    /// Whether hosts given by name may resolve to private, loopback or link-local addresses.
    pub allow_private_hosts: bool,
}

impl UrlPolicy {
    /// Parse `allowed_urls` entries (empty ones are skipped).
    pub fn parse(entries: &[String], allow_private_hosts: bool) -> Result<Self, String> {
        let patterns = entries
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .map(UrlPattern::parse)
            .collect::<Result<_, _>>()?;
        Ok(Self {
            patterns,
            allow_private_hosts,
        })
    }

    /// Parse and normalise `raw`, and check it against the entries. The error says why not.
    pub fn check(&self, raw: &str) -> Result<url::Url, String> {
        let url = url::Url::parse(raw.trim())
            .map_err(|e| format!("`url` {raw:?} is not a valid URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(format!("`url` must be an http(s) URL. Given: {raw:?}"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(format!(
                "`url` must not carry user information (`user@host`). Given: {raw:?}"
            ));
        }
        if url.host().is_none() {
            return Err(format!("`url` has no host. Given: {raw:?}"));
        }
        match self.patterns.iter().find(|p| p.matches(&url)) {
            Some(p) => {
                tracing::debug!(url = %url, pattern = %p.raw, "url allowed");
                Ok(url)
            }
            None => Err(format!(
                "`url` {raw:?} is not allowed: as parsed (scheme {}, host {}, port {}, path {}), it matches no `allowed_urls` entry (only the model store is allowed by default)",
                url.scheme(),
                url.host_str().unwrap_or(""),
                url.port_or_known_default().map(|p| p.to_string()).unwrap_or_default(),
                url.path()
            )),
        }
    }
}

/// Whether an address is one a public name must not lead to.
pub fn is_internal(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared address space (CGNAT)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || (o[0] == 198 && (18..20).contains(&o[1])) // benchmarking
                || o[0] >= 240 // reserved
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_internal(IpAddr::V4(v4));
            }
            let s = v6.segments();
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
        }
    }
}

/// Resolves names and drops internal addresses (see the module docs).
#[derive(Debug)]
struct PublicOnly;

impl Resolver for PublicOnly {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: ureq::unversioned::transport::NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let resolved = DefaultResolver::default().resolve(uri, config, timeout)?;
        let host = uri.host().unwrap_or_default();
        let literal = host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok();
        if literal {
            return Ok(resolved);
        }
        let mut kept = self.empty();
        for addr in resolved.iter() {
            if !is_internal(addr.ip()) {
                kept.push(*addr);
            }
        }
        if kept.is_empty() {
            return Err(ureq::Error::Other(
                format!("`{host}` resolves only to loopback, private or link-local addresses, which are refused for hosts given by name (set `allow_private_url_hosts` to allow them)").into(),
            ));
        }
        Ok(kept)
    }
}

/// An agent that follows no redirect (they could lead outside `allowed_urls`) and, unless the
/// policy allows private hosts, resolves names to public addresses only.
pub fn agent(policy: &UrlPolicy, timeout: std::time::Duration) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .max_redirects(0)
        .build();
    if policy.allow_private_hosts {
        config.into()
    } else {
        ureq::Agent::with_parts(
            config,
            ureq::unversioned::transport::DefaultConnector::default(),
            PublicOnly,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(entries: &[&str]) -> UrlPolicy {
        UrlPolicy::parse(
            &entries.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            false,
        )
        .expect("valid entries")
    }

    #[test]
    fn user_info_is_refused_whatever_the_pattern() {
        let p = policy(&[r"http://good\.example.*"]);
        let err = p
            .check("http://good.example@127.0.0.1:18999/x.tar.gz")
            .expect_err("user-info");
        assert!(err.contains("user information"), "{err}");
        assert!(p.check("http://good.example/x.tar.gz").is_ok());
    }

    #[test]
    fn dot_segments_are_resolved_before_the_path_is_matched() {
        let p = policy(&[r"https://models\.example/ok/.*"]);
        assert!(p.check("https://models.example/ok/a.tar.gz").is_ok());
        for escape in [
            "https://models.example/ok/../secret.tar.gz",
            "https://models.example/ok/%2e%2e/secret.tar.gz",
            "https://models.example/ok/./../secret",
        ] {
            assert!(p.check(escape).is_err(), "{escape}");
        }
    }

    #[test]
    fn scheme_host_and_port_are_matched_as_parts() {
        let p = policy(&[r"https://models\.example/.*", r"http://10\.0\.0\.5:8000/.*"]);
        assert!(p.check("http://models.example/a").is_err(), "scheme");
        assert!(
            p.check("https://models.example.evil.com/a").is_err(),
            "host"
        );
        assert!(p.check("https://MODELS.example/a").is_ok(), "host case");
        assert!(p.check("https://models.example:8443/a").is_err(), "port");
        assert!(
            p.check("https://models.example:443/a").is_ok(),
            "default port"
        );
        assert!(p.check("http://10.0.0.5:8000/a").is_ok());
        assert!(p.check("http://10.0.0.5/a").is_err());
        assert!(p.check("ftp://models.example/a").is_err());
    }

    #[test]
    fn bad_entries_are_refused_at_start_up() {
        assert!(UrlPolicy::parse(&["models.example".into()], false).is_err());
        assert!(UrlPolicy::parse(&["https://a@b/".into()], false).is_err());
        assert!(UrlPolicy::parse(&["https://(/".into()], false).is_err());
    }

    #[test]
    fn internal_addresses_are_recognised() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "100.64.0.1",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(is_internal(ip.parse().expect("ip")), "{ip}");
        }
        for ip in ["93.184.216.34", "2606:4700::1111", "8.8.8.8"] {
            assert!(!is_internal(ip.parse().expect("ip")), "{ip}");
        }
    }
}
