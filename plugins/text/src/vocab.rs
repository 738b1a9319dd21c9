//! The vocabulary: token → index, from the archive.

use std::collections::HashMap;
use std::path::Path;

use cresset_plugin_api::sdk::{settings, InitContext};
use cresset_plugin_api::PluginError;

/// The largest vocabulary file read. A vocabulary of unigrams and bigrams of a large corpus
/// has a few million entries of about 15 bytes.
const MAX_VOCAB_FILE: u64 = 256 << 20;

/// Token → index, and the index of unknown tokens.
pub struct Vocab {
    index: HashMap<String, i64>,
    unknown: Option<i64>,
    unk_token: String,
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
            unk_token: unk_token.to_owned(),
        })
    }

    /// A vocabulary that `torch.save` wrote (TorchServe's `source_vocab.pt`), read without
    /// running pickle code. Unknown tokens take the default index the vocabulary names
    /// (torchtext 0.12+'s `set_default_index`), else `unk_token`'s index, as torchtext's
    /// older `Vocab` looks up `<unk>`.
    fn read_pickle(path: &Path, unk_token: &str) -> Result<Self, PluginError> {
        let vocab = cresset_plan::pickle::read_vocab(path)
            .map_err(|e| PluginError::invalid_input(e.to_string()))?;
        if vocab.tokens.is_empty() {
            return Err(PluginError::invalid_input(format!(
                "{}: the vocabulary ({}) is empty",
                path.display(),
                vocab.held
            )));
        }
        let index: HashMap<String, i64> = vocab.tokens.into_iter().collect();
        Ok(Self {
            unknown: vocab
                .default_index
                .or_else(|| index.get(unk_token).copied()),
            index,
            unk_token: unk_token.to_owned(),
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
                    "the token {token:?} is not in the vocabulary, which has no {:?} for \
                     unknown tokens (`handler.unk_token`)",
                    self.unk_token
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
