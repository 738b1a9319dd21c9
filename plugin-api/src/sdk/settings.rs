//! Reading a handler's `[handler]` table ([`InitContext::handler_config`](super::InitContext))
//! into the plugin's own settings struct, with errors that name the key, as `handler.<key>`.
//!
//! ```
//! use cresset_plugin_api::sdk::settings;
//! use serde::Deserialize;
//!
//! /// `[handler]` as this plugin reads it: every key optional, any other key refused.
//! #[derive(Debug, Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Keys {
//!     greeting: Option<String>,
//!     repeat: Option<u64>,
//! }
//!
//! let keys: Keys = settings::parse(&serde_json::json!({"greeting": "Hi"})).unwrap();
//! assert_eq!(keys.greeting.as_deref(), Some("Hi"));
//! assert_eq!(settings::within("repeat", keys.repeat, 1, 10).unwrap(), 1);
//!
//! let typo = settings::parse::<Keys>(&serde_json::json!({"greetin": "Hi"})).unwrap_err();
//! assert!(typo.message.contains("did you mean `greeting`?"));
//! let wrong = settings::parse::<Keys>(&serde_json::json!({"repeat": "twice"})).unwrap_err();
//! assert!(wrong.message.starts_with("`handler.repeat`"));
//! ```
use std::path::{Component, Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::PluginError;

/// Read the `[handler]` table into `T`, the plugin's settings struct
/// (`#[derive(Deserialize)]`, `#[serde(deny_unknown_fields)]`, every field optional): a key `T`
/// has no field for is refused, naming it and the field it is closest to; a value of the wrong
/// type is refused, naming its key. No table at all reads as an empty one.
///
/// `T` must be a plain struct (no `#[serde(flatten)]`): its field names are the keys it knows.
pub fn parse<T: DeserializeOwned>(config: &Value) -> Result<T, PluginError> {
    let empty = Value::Object(serde_json::Map::new());
    let config = if config.is_null() { &empty } else { config };
    only(config, known_keys::<T>())?;
    serde_path_to_error::deserialize(config).map_err(|e| {
        let message = e
            .inner()
            .to_string()
            .replace("expected u64", "expected a whole number")
            .replace("expected u32", "expected a whole number")
            .replace("expected f64", "expected a number");
        PluginError::invalid_input(format!("`handler.{}`: {message}", e.path()))
    })
}

/// `response_format`: the shape of a handler's answers where the reference handler's shape
/// differs from Cresset's.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResponseFormat {
    /// Cresset's shapes (the default).
    #[default]
    Cresset,
    /// The TorchServe reference handler's shapes.
    Torchserve,
}

/// `value` when it is from 1 to `max`, or `default` when absent; `key` names it in the error.
pub fn within(
    key: &str,
    value: Option<u64>,
    default: usize,
    max: usize,
) -> Result<usize, PluginError> {
    match value {
        None => Ok(default),
        Some(n) if (1..=max as u64).contains(&n) => Ok(n as usize),
        Some(n) => Err(PluginError::invalid_input(format!(
            "`handler.{key}` must be an integer from 1 to {max}. Given: {n}"
        ))),
    }
}

/// The keys the settings struct `T` knows: its field names as serde's derive hands them to
/// `deserialize_struct` (renames applied); none when `T` is not a struct.
pub fn known_keys<T: DeserializeOwned>() -> &'static [&'static str] {
    use serde::de::{Error, Visitor};
    struct Fields<'a>(&'a mut &'static [&'static str]);
    impl<'de> serde::Deserializer<'de> for Fields<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Self::Error> {
            *self.0 = fields;
            Err(Self::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
            ignored_any
        }
    }
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(Fields(&mut fields));
    fields
}

fn bad(key: &str, wanted: &str, given: &Value) -> PluginError {
    PluginError::invalid_input(format!("`handler.{key}` must be {wanted}. Given: {given}"))
}

/// Refuse any key of the `[handler]` table that is not in `known`, naming it (and the known key
/// it is closest to): a typo never passes silently. [`parse`] calls it with the settings
/// struct's [`known_keys`]; call it yourself only where a table is split between readers.
pub fn only(config: &Value, known: &[&str]) -> Result<(), PluginError> {
    let Some(table) = config.as_object() else {
        return Err(PluginError::invalid_input(format!(
            "`[handler]` must be a table of settings. Given: {config}"
        )));
    };
    for key in table.keys() {
        if known.contains(&key.as_str()) {
            continue;
        }
        let nearest = known
            .iter()
            .map(|k| (edit_distance(k, key), *k))
            .filter(|(d, k)| *d <= 2.max(k.len() / 3))
            .min();
        let hint = match nearest {
            Some((_, k)) => format!(" (did you mean `{k}`?)"),
            None => String::new(),
        };
        let mut listed: Vec<&str> = known.to_vec();
        listed.sort_unstable();
        return Err(PluginError::invalid_input(format!(
            "unknown setting `handler.{key}`{hint}; this handler reads: {}",
            listed.join(", ")
        )));
    }
    Ok(())
}

/// Levenshtein distance, for suggestions (keys are short).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The most bytes of a settings file read from an archive.
const MAX_SETTINGS_FILE: u64 = 1 << 20;

/// `[handler]` over the JSON object in `dir/file` (TorchServe's `setup_config.json`), when the
/// archive has one: a key in `[handler]` wins. Strings holding whole numbers (TorchServe's
/// examples write `"max_length": "150"`) become numbers for the keys in `numeric`. The file is
/// read with a 1 MiB bound.
pub fn merged_with_file(
    dir: &Path,
    file: &str,
    config: &Value,
    numeric: &[&str],
) -> Result<Value, PluginError> {
    use std::io::Read;
    let mut merged = serde_json::Map::new();
    let path = dir.join(file);
    if path.is_file() {
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_SETTINGS_FILE + 1).read_to_string(&mut text))
            .map_err(|e| PluginError::invalid_input(format!("cannot read {file}: {e}")))?;
        if text.len() as u64 > MAX_SETTINGS_FILE {
            return Err(PluginError::invalid_input(format!(
                "{file} is larger than {MAX_SETTINGS_FILE} bytes"
            )));
        }
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(map)) => {
                for (key, value) in map {
                    let value = match value {
                        Value::String(s) if numeric.contains(&key.as_str()) => s
                            .trim()
                            .parse::<u64>()
                            .map(Value::from)
                            .unwrap_or(Value::String(s)),
                        other => other,
                    };
                    merged.insert(key, value);
                }
            }
            Ok(_) => {
                return Err(PluginError::invalid_input(format!(
                    "{file} must be a JSON object of settings"
                )))
            }
            Err(e) => {
                return Err(PluginError::invalid_input(format!(
                    "{file} is not JSON: {e}"
                )))
            }
        }
    }
    match config {
        Value::Object(map) => merged.extend(map.clone()),
        Value::Null => {}
        _ => {
            return Err(PluginError::invalid_input(
                "`handler` must be a table of settings",
            ))
        }
    }
    Ok(Value::Object(merged))
}

/// What a JSON value is, for error messages ("a string", "a list", ...).
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// A string, if present (for readers of a table that is not a plugin's own, such as
/// `cresset plan`; a plugin reads its table with [`parse`]).
pub fn string<'a>(config: &'a Value, key: &str) -> Result<Option<&'a str>, PluginError> {
    match config.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(bad(key, "a string", v)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unknown_keys_are_refused_naming_the_nearest_known_one() {
        let known = ["max_length", "truncation", "mode"];
        assert!(only(&json!({"mode": "x", "max_length": 3}), &known).is_ok());
        let err = only(&json!({"max_lenght": 3}), &known).expect_err("typo");
        assert!(
            err.message.contains("`handler.max_lenght`")
                && err.message.contains("did you mean `max_length`?"),
            "{}",
            err.message
        );
        let err = only(&json!({"colour": "red"}), &known).expect_err("unknown");
        assert!(!err.message.contains("did you mean"), "{}", err.message);
        assert!(err.message.contains("max_length, mode, truncation"));
        assert!(only(&json!([1]), &known).is_err());
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }
}
