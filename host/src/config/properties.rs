//! TorchServe's `config.properties`, read by `cresset serve --ts-config FILE`: the keys with a
//! meaning here become the same settings as in `cresset.toml`; TorchServe keys Cresset does not
//! use are logged as warnings at start-up; TLS settings are refused (Cresset serves plain HTTP
//! and gRPC: silently dropping TLS would be worse than stopping). TorchServe's gRPC keys
//! (`grpc_inference_address`/`_port`, `grpc_management_address`/`_port`) open Cresset's gRPC
//! listeners; without them, those stay off (TorchServe opens 7070 and 7071 by default).

use super::FileConfig;

/// The most bytes read from the file (real ones are a few kilobytes).
const MAX_BYTES: usize = 1 << 20;
/// The most entries read.
const MAX_ENTRIES: usize = 10_000;

/// Keys that configure TLS, which Cresset does not serve.
const TLS_KEYS: [&str; 5] = [
    "keystore",
    "keystore_pass",
    "keystore_type",
    "certificate_file",
    "private_key_file",
];

/// The settings a `config.properties` gives, and a warning for each key without effect.
pub(super) fn read(text: &str) -> Result<(FileConfig, Vec<String>), String> {
    if text.len() > MAX_BYTES {
        return Err(format!("larger than {MAX_BYTES} bytes"));
    }
    let mut file = FileConfig::default();
    let mut warnings = Vec::new();
    // TorchServe's gRPC listeners: an address and a port each, put together below.
    let mut grpc: [(Option<String>, Option<u16>); 2] = Default::default();
    for (key, value) in entries(text)? {
        let value = value.trim();
        let int = |what: &str| -> Result<u64, String> {
            value
                .parse::<u64>()
                .map_err(|_| format!("`{key}` must be {what}. Given: {value:?}"))
        };
        let boolean = || -> Result<bool, String> {
            match value.to_ascii_lowercase().as_str() {
                "true" => Ok(true),
                "false" => Ok(false),
                _ => Err(format!("`{key}` must be true or false. Given: {value:?}")),
            }
        };
        let small = |n: u64| u32::try_from(n).map_err(|_| format!("`{key}` is too large: {n}"));
        match key.as_str() {
            "inference_address" => file.inference_address = Some(address(&key, value)?),
            "management_address" => file.management_address = Some(address(&key, value)?),
            "metrics_address" => file.metrics_address = Some(address(&key, value)?),
            "grpc_inference_address" => grpc[0].0 = Some(value.to_owned()),
            "grpc_management_address" => grpc[1].0 = Some(value.to_owned()),
            "grpc_inference_port" | "grpc_management_port" => {
                let port = u16::try_from(int("a port")?)
                    .map_err(|_| format!("`{key}` must be a port. Given: {value:?}"))?;
                grpc[usize::from(key == "grpc_management_port")].1 = Some(port);
            }
            "enable_grpc_ssl" => {
                if boolean()? {
                    return Err(
                        "`enable_grpc_ssl`: Cresset serves plain gRPC; terminate TLS in front of \
                         it and leave the key out"
                            .into(),
                    );
                }
            }
            "model_store" => file.model_store = Some(value.into()),
            "load_models" => {
                file.models = value
                    .split(',')
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(|m| match m.eq_ignore_ascii_case("all") {
                        true => "all".to_owned(),
                        false => m.to_owned(),
                    })
                    .collect()
            }
            "default_workers_per_model" => {
                file.default_workers_per_model = Some(small(int("a number of workers")?)?)
            }
            "job_queue_size" => file.job_queue_size = Some(small(int("a number of requests")?)?),
            "default_response_timeout" => {
                file.default_response_timeout = Some(int("a number of seconds")?)
            }
            "max_request_size" => {
                file.max_request_size = Some(
                    usize::try_from(int("a number of bytes")?)
                        .map_err(|_| format!("`{key}` is too large"))?,
                )
            }
            "number_of_netty_threads" => {
                file.http_workers = Some(
                    usize::try_from(int("a number of threads")?)
                        .map_err(|_| format!("`{key}` is too large"))?,
                )
            }
            "allowed_urls" => {
                file.allowed_urls = value
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            "disable_token_auth" => file.disable_token_auth = boolean()?,
            // TorchServe before 0.12: token auth off unless enabled; Cresset keeps it on unless
            // told otherwise.
            "enable_token_auth" => file.disable_token_auth = !boolean()?,
            tls if TLS_KEYS.contains(&tls) => {
                return Err(format!(
                    "`{tls}`: Cresset serves plain HTTP; terminate TLS in front of it (a proxy \
                     or the platform's ingress) and leave the TLS keys out"
                ))
            }
            _ => warnings.push(format!(
                "`{key}` (config.properties) is not used by Cresset and has no effect"
            )),
        }
    }
    // A listener TorchServe's keys mention is served, with TorchServe's defaults for the half
    // not given (127.0.0.1, ports 7070 and 7071); one they do not mention stays off.
    for (i, (host, port)) in grpc.into_iter().enumerate() {
        if host.is_none() && port.is_none() {
            continue;
        }
        let host = host.unwrap_or_else(|| "127.0.0.1".into());
        let port = port.unwrap_or(if i == 0 { 7070 } else { 7071 });
        let bracketed = if host.contains(':') && !host.starts_with('[') {
            format!("[{host}]")
        } else {
            host
        };
        let at = Some(format!("{bracketed}:{port}"));
        if i == 0 {
            file.grpc_address = at;
        } else {
            file.grpc_management_address = at;
        }
    }
    Ok((file, warnings))
}

/// An address as TorchServe writes it (`http://127.0.0.1:8080`, `0.0.0.0:8080`) as Cresset
/// takes it (`127.0.0.1:8080`).
fn address(key: &str, value: &str) -> Result<String, String> {
    if value.starts_with("https://") {
        return Err(format!(
            "`{key}` is https: Cresset serves plain HTTP; terminate TLS in front of it. Given: {value:?}"
        ));
    }
    let bare = value
        .strip_prefix("http://")
        .unwrap_or(value)
        .trim_end_matches('/');
    Ok(match bare.strip_prefix("localhost:") {
        Some(port) => format!("127.0.0.1:{port}"),
        None => bare.to_owned(),
    })
}

/// The key-value pairs of a Java properties text: `#`/`!` comments, `=`, `:` or blanks between
/// key and value, lines continued by a trailing backslash, and `\t`, `\n`, `\uXXXX`-style
/// escapes. A key given twice is an error naming it.
fn entries(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut lines = text.lines();
    while let Some(first) = lines.next() {
        let mut logical = first.trim_start().to_owned();
        if logical.is_empty() || logical.starts_with('#') || logical.starts_with('!') {
            continue;
        }
        while ends_continued(&logical) {
            logical.pop();
            match lines.next() {
                Some(next) => logical.push_str(next.trim_start()),
                None => break,
            }
        }
        let (key, value) = split(&logical);
        let (key, value) = (unescape(key)?, unescape(value)?);
        if out.iter().any(|(k, _)| *k == key) {
            return Err(format!("`{key}` is given twice"));
        }
        out.push((key, value));
        if out.len() > MAX_ENTRIES {
            return Err(format!("more than {MAX_ENTRIES} entries"));
        }
    }
    Ok(out)
}

/// Whether a line ends in an odd number of backslashes (it continues on the next).
fn ends_continued(line: &str) -> bool {
    line.chars().rev().take_while(|c| *c == '\\').count() % 2 == 1
}

/// The raw key and value of a logical line.
fn split(line: &str) -> (&str, &str) {
    let mut escaped = false;
    let mut end = line.len();
    for (i, c) in line.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '=' | ':' | ' ' | '\t' | '\x0c' => {
                end = i;
                break;
            }
            _ => {}
        }
    }
    let key = &line[..end];
    let mut rest = line[end..].trim_start_matches([' ', '\t', '\x0c']);
    if let Some(after) = rest.strip_prefix(['=', ':']) {
        rest = after.trim_start_matches([' ', '\t', '\x0c']);
    }
    (key, rest)
}

fn unescape(raw: &str) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('f') => out.push('\x0c'),
            Some('u') => {
                let hex: String = chars.by_ref().take(4).collect();
                let code = u32::from_str_radix(&hex, 16)
                    .ok()
                    .and_then(char::from_u32)
                    .ok_or_else(|| format!("bad escape \\u{hex} in {raw:?}"))?;
                out.push(code);
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn torchserve_keys_map_onto_cresset_settings_and_the_rest_warn() {
        let (file, warnings) = read(
            "# TorchServe's sample\n\
             inference_address=http://0.0.0.0:8085\n\
             management_address = http://localhost:8086\n\
             metrics_address: 127.0.0.1:8087\n\
             model_store=/mnt/models/model-store\n\
             load_models=iris.mar,\\\n    bert=bert.mar\n\
             default_workers_per_model=3\n\
             job_queue_size=7\n\
             default_response_timeout=33\n\
             max_request_size=1000\n\
             number_of_netty_threads=4\n\
             allowed_urls=https://models\\\\.example\\\\.com/.*,https://s3.amazonaws.com/.*\n\
             disable_token_auth=true\n\
             grpc_inference_port=7075\n\
             grpc_management_address=0.0.0.0\n\
             enable_grpc_ssl=false\n\
             enable_metrics_api=true\n\
             service_envelope=kserve\n\
             ! a comment\n",
        )
        .expect("reads");
        assert_eq!(file.inference_address.as_deref(), Some("0.0.0.0:8085"));
        assert_eq!(file.management_address.as_deref(), Some("127.0.0.1:8086"));
        assert_eq!(file.metrics_address.as_deref(), Some("127.0.0.1:8087"));
        assert_eq!(
            file.model_store.as_deref(),
            Some(std::path::Path::new("/mnt/models/model-store"))
        );
        assert_eq!(file.models, ["iris.mar", "bert=bert.mar"]);
        assert_eq!(file.default_workers_per_model, Some(3));
        assert_eq!(file.job_queue_size, Some(7));
        assert_eq!(file.default_response_timeout, Some(33));
        assert_eq!(file.max_request_size, Some(1000));
        assert_eq!(file.http_workers, Some(4));
        assert_eq!(
            file.allowed_urls,
            [
                "https://models\\.example\\.com/.*",
                "https://s3.amazonaws.com/.*"
            ]
        );
        assert!(file.disable_token_auth);
        assert_eq!(file.grpc_address.as_deref(), Some("127.0.0.1:7075"));
        assert_eq!(
            file.grpc_management_address.as_deref(),
            Some("0.0.0.0:7071")
        );
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("`enable_metrics_api`"));
        assert!(warnings[1].contains("`service_envelope`"));
        let (all, _) = read("load_models=ALL\nenable_token_auth=false\n").expect("reads");
        assert_eq!(all.models, ["all"]);
        assert!(all.disable_token_auth);
    }

    #[test]
    fn bad_values_tls_and_duplicates_are_errors_naming_the_key() {
        for (text, says) in [
            (
                "default_workers_per_model=two\n",
                "`default_workers_per_model`",
            ),
            ("disable_token_auth=yes\n", "`disable_token_auth`"),
            ("inference_address=https://0.0.0.0:8443\n", "plain HTTP"),
            ("private_key_file=key.pem\n", "`private_key_file`"),
            ("enable_grpc_ssl=true\n", "plain gRPC"),
            (
                "grpc_inference_port=70000\n",
                "`grpc_inference_port` must be a port",
            ),
            ("job_queue_size=1\njob_queue_size=2\n", "given twice"),
            ("a=\\uZZZZ\n", "bad escape"),
        ] {
            let err = read(text).expect_err(text);
            assert!(err.contains(says), "{text:?}: {err}");
        }
        assert!(read(&"#".repeat(2 << 20)).is_err());
    }
}
