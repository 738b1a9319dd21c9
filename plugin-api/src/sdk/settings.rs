//! Reading a handler's `[handler]` table ([`InitContext::handler_config`](super::InitContext))
//! with errors that name the key, as `handler.<key>`.
use std::path::{Component, Path, PathBuf};

use serde_json::Value;

use crate::PluginError;

fn bad(key: &str, wanted: &str, given: &Value) -> PluginError {
    PluginError::invalid_input(format!("`handler.{key}` must be {wanted}. Given: {given}"))
}

/// A string, if present.
pub fn string<'a>(config: &'a Value, key: &str) -> Result<Option<&'a str>, PluginError> {
    match config.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(bad(key, "a string", v)),
    }
}

/// An integer from 1 to `max`, or `default` when absent.
pub fn integer(
    config: &Value,
    key: &str,
    default: usize,
    max: usize,
) -> Result<usize, PluginError> {
    match config.get(key) {
        None => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=max as u64).contains(n))
            .map(|n| n as usize)
            .ok_or_else(|| bad(key, &format!("an integer from 1 to {max}"), v)),
    }
}

/// A boolean, or `default` when absent.
pub fn boolean(config: &Value, key: &str, default: bool) -> Result<bool, PluginError> {
    match config.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(bad(key, "true or false", v)),
    }
}

/// The folder the setting `key` names inside `dir` (a path as [`path_inside`] takes it),
/// or `dir` itself when it is not set: a checkpoint folder such as `model_path`.
pub fn folder_inside(dir: &Path, config: &Value, key: &str) -> Result<PathBuf, PluginError> {
    path_inside(dir, key, string(config, key)?.unwrap_or("."))
}

/// The file `name` inside `dir` when given (the value of the setting `key`), else the only
/// file in `dir` ending in `.{ext}`, or none. Several such files are an error asking for
/// `key`.
pub fn named_or_only_file(
    dir: &Path,
    key: &str,
    name: Option<&str>,
    ext: &str,
) -> Result<Option<PathBuf>, PluginError> {
    if let Some(name) = name {
        return path_inside(dir, key, name).map(Some);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| PluginError::internal(format!("cannot list {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    match found.len() {
        0 | 1 => Ok(found.pop()),
        n => Err(PluginError::invalid_input(format!(
            "the archive has {n} .{ext} files; name one in `handler.{key}`"
        ))),
    }
}

/// `rel` under `dir`, refusing absolute paths and `..` (a path must stay inside the
/// archive).
pub fn path_inside(dir: &Path, key: &str, rel: &str) -> Result<PathBuf, PluginError> {
    let path = Path::new(rel);
    if path
        .components()
        .any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(PluginError::invalid_input(format!(
            "`handler.{key}` must be a path inside the archive. Given: {rel:?}"
        )));
    }
    Ok(dir.join(path))
}
