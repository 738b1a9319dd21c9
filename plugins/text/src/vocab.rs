//! The vocabulary: token → index, from the archive.

use std::collections::HashMap;
use std::path::Path;

use cresset_plan::pickle::{read_vocab, Unknown};
use cresset_plugin_api::sdk::{settings, InitContext};
use cresset_plugin_api::PluginError;

/// The largest vocabulary file read. A vocabulary of unigrams and bigrams of a large corpus
/// has a few million entries of about 15 bytes.
const MAX_VOCAB_FILE: u64 = 256 << 20;

/// Token → index, and the index of unknown tokens.
pub struct Vocab {
    index: HashMap<String, i64>,
    unknown: Option<i64>,
    /// Why there is no index for unknown tokens, where there is none (for the error).
    no_unknown: String,
}

/// The reason an unknown token has no index, where `unk_token` would give it one.
fn no_unk_token(unk_token: &str) -> String {
    format!("has no {unk_token:?} for unknown tokens (`handler.unk_token`)")
}

impl Vocab {
    /// The archive's vocabulary: `vocab_file`, else `vocab.json`, else `vocab.txt`, else
    /// `source_vocab.pt`.
    pub fn from_archive(
        ctx: &InitContext,
        vocab_file: Option<&str>,
        unk_token: &str,
    ) -> Result<Self, PluginError> {
        let path = match vocab_file {
            Some(file) => settings::path_inside(&ctx.model_dir, "vocab_file", file)?,
            None => ["vocab.json", "vocab.txt", "source_vocab.pt"]
                .iter()
                .map(|f| ctx.model_dir.join(f))
                .find(|p| p.is_file())
                .ok_or_else(|| {
                    PluginError::invalid_input(
                        "the archive has no vocabulary: add vocab.json (a list of tokens, or an \
                         object of token to index), vocab.txt (one token per line) or \
                         TorchServe's source_vocab.pt (a torchtext Vocab that torch.save \
                         wrote), or name it with `handler.vocab_file`",
                    )
                })?,
        };
        Self::read(&path, unk_token)
    }

    /// Read a vocabulary file: a JSON list or object, one token per line, or one that
    /// `torch.save` wrote (told by its first bytes).
    pub fn read(path: &Path, unk_token: &str) -> Result<Self, PluginError> {
        if cresset_plan::pickle::magic(path).is_some() {
            return Self::read_pickle(path, unk_token);
        }
        let bad = |m: String| PluginError::invalid_input(format!("{}: {m}", path.display()));
        let len = std::fs::metadata(path)
            .map_err(|e| bad(e.to_string()))?
            .len();
        if len > MAX_VOCAB_FILE {
            return Err(bad(format!(
                "{len} bytes, more than the {MAX_VOCAB_FILE} this handler reads"
            )));
        }
        let bytes = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
        let index: HashMap<String, i64> = if path.extension().is_some_and(|x| x == "json") {
            match serde_json::from_slice::<serde_json::Value>(&bytes)
                .map_err(|e| bad(format!("not JSON: {e}")))?
            {
                serde_json::Value::Array(items) => items
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| match t {
                        serde_json::Value::String(t) => Ok((t, i as i64)),
                        other => Err(bad(format!("entry {i} is {other}, not a token"))),
                    })
                    .collect::<Result<_, _>>()?,
                serde_json::Value::Object(map) => map
                    .into_iter()
                    .map(|(t, i)| match i.as_i64() {
                        Some(i) if i >= 0 => Ok((t, i)),
                        _ => Err(bad(format!("the index of {t:?} is {i}, not an index"))),
                    })
                    .collect::<Result<_, _>>()?,
                _ => {
                    return Err(bad(
                        "a JSON vocabulary is a list of tokens or an object of token to index"
                            .into(),
                    ))
                }
            }
        } else {
            let text = std::str::from_utf8(&bytes).map_err(|e| bad(format!("not UTF-8: {e}")))?;
            text.lines()
                .enumerate()
                .map(|(i, t)| (t.to_owned(), i as i64))
                .collect()
        };
        if index.is_empty() {
            return Err(bad("the vocabulary is empty".into()));
        }
        Ok(Self {
            unknown: index.get(unk_token).copied(),
            index,
            no_unknown: no_unk_token(unk_token),
        })
    }

    /// A vocabulary that `torch.save` wrote (TorchServe's `source_vocab.pt`), read without
    /// running pickle code. An unknown token is what `vocab[token]` gives in torchtext: for its
    /// C++ vocabulary (torchtext 0.10+) the default index it names, for its Python one the
    /// index of `<unk>` (whatever `unk_token` says), and for a plain dict or list `unk_token`'s
    /// index; where that is none, a request with an unknown token fails, as it does in
    /// TorchServe.
    fn read_pickle(path: &Path, unk_token: &str) -> Result<Self, PluginError> {
        let vocab = read_vocab(path).map_err(|e| PluginError::invalid_input(e.to_string()))?;
        if vocab.tokens.is_empty() {
            return Err(PluginError::invalid_input(format!(
                "{}: the vocabulary ({}) is empty",
                path.display(),
                vocab.held
            )));
        }
        let index: HashMap<String, i64> = vocab.tokens.into_iter().collect();
        let (unknown, no_unknown) = match vocab.unknown {
            Unknown::DefaultIndex(i) => (
                i,
                format!(
                    "({}) names no default index for unknown tokens (torchtext's \
                     set_default_index)",
                    vocab.held
                ),
            ),
            Unknown::UnkToken => (
                index.get("<unk>").copied(),
                format!(
                    "({}) has no \"<unk>\", which it looks unknown tokens up as",
                    vocab.held
                ),
            ),
            Unknown::Unsaid => (index.get(unk_token).copied(), no_unk_token(unk_token)),
        };
        Ok(Self {
            unknown,
            index,
            no_unknown,
        })
    }

    /// The index of `token`: its own, or the unknown token's.
    pub fn index(&self, token: &str) -> Result<i64, PluginError> {
        self.index
            .get(token)
            .copied()
            .or(self.unknown)
            .ok_or_else(|| {
                PluginError::invalid_input(format!(
                    "the token {token:?} is not in the vocabulary, which {}",
                    self.no_unknown
                ))
            })
    }

    /// The smallest index (a token every model of this vocabulary takes).
    pub fn first_index(&self) -> i64 {
        self.index.values().copied().min().unwrap_or(0)
    }

    /// The number of tokens.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there are none (never, once read).
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
}
