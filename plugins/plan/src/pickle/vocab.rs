//! Vocabularies that `torch.save` wrote: TorchServe's `source_vocab.pt`.
//!
//! TorchServe's `text_classifier` loads it with `torch.load` and looks every token up with
//! `vocab[token]`. What it holds depends on the torchtext that made it:
//! - torchtext's Python vocabulary (TorchServe's text classification example): an object with
//!   `itos`, `stoi` and `freqs` attributes, `torchtext.vocab.Vocab` up to torchtext 0.9 and
//!   `torchtext.legacy.vocab.Vocab` in 0.10 and 0.11. An unknown token is `stoi['<unk>']`
//!   (its `__getitem__` names `<unk>` itself); with no `<unk>`, the lookup fails.
//! - torchtext 0.10 to 0.18 (the last): an `nn.Module` (`torchtext.vocab.Vocab` in 0.10,
//!   `torchtext.vocab.vocab.Vocab` since) around the C++ `torchtext._torchtext.Vocab`, whose
//!   pickled state is `(version, [default index], itos, [])`. An unknown token is the default
//!   index; with none set, the lookup fails. Its tokens are distinct (torchtext refuses a
//!   vocabulary that repeats one).
//! - a plain dict of token to index, or a list of tokens, saved as they are: an unknown token
//!   is the handler's to choose.
//!
//! Both of `torch.save`'s formats are read: the zip (since torch 1.6) and the run of pickles
//! before it, where a module's class is a persistent id (`('module', cls, file, source)`).
//!
//! A container's entries are copied out as owned strings, so each must be its own value: an
//! entry that refers again to a value the same container already holds is refused (a real
//! vocabulary never does that, and a hostile one would make a small pickle copy one long
//! string millions of times).

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use super::machine::{Allow, Class, Machine, Value};
use super::{invalid, magic, open_zip, Magic};
use crate::safetensors::CheckpointError;

/// The largest vocabulary pickle read. A legacy torchtext vocabulary of AG_NEWS with bigrams
/// (1.3 million entries, each in `freqs`, `itos` and `stoi`) takes about 40 MB.
pub const MAX_VOCAB_PICKLE: u64 = 64 << 20;

/// The most opcodes run: the AG_NEWS vocabulary above takes about 8 million. Each adds at most
/// one value of about 32 bytes and one reference of 8 to 16, so a hostile pickle costs at most
/// about 800 MB.
const MAX_VOCAB_OPS: usize = 16 << 20;

/// The first 21 bytes of `torch.save`'s legacy format: the pickled magic number
/// 0x1950a86a20f9469cfc6c and protocol version 1001.
const LEGACY_HEAD: [u8; 21] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, b'.', 0x80,
    0x02, b'M', 0xe9, 0x03, b'.',
];

/// What an unknown token is, by the kind of vocabulary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unknown {
    /// The default index a C++ vocabulary names (`set_default_index`); `None`: the lookup
    /// fails.
    DefaultIndex(Option<i64>),
    /// The index of the token `<unk>`, as the Python vocabulary looks it up; the lookup fails
    /// where it has none.
    UnkToken,
    /// Not the vocabulary's to say (a plain dict or list).
    Unsaid,
}

/// A vocabulary read from a pickle.
#[derive(Debug, Clone, PartialEq)]
pub struct PickledVocab {
    /// Each token and its index.
    pub tokens: Vec<(String, i64)>,
    /// What an unknown token is.
    pub unknown: Unknown,
    /// What the file held, for messages: `torchtext's Python Vocab`, ...
    pub held: &'static str,
}

/// Read a vocabulary that `torch.save` wrote, running no pickle code.
pub fn read_vocab(path: &Path) -> Result<PickledVocab, CheckpointError> {
    let no_storages = HashMap::new();
    let format = magic(path);
    let (bytes, storages, part) = match format {
        Some(Magic::Zip) => {
            let zip = open_zip(path, MAX_VOCAB_PICKLE)?;
            (zip.pickle, zip.storages, "data.pkl")
        }
        Some(Magic::LegacyPickle) => {
            let file = std::fs::File::open(path).map_err(|e| invalid(path, e))?;
            let mut bytes = Vec::new();
            file.take(MAX_VOCAB_PICKLE + 1)
                .read_to_end(&mut bytes)
                .map_err(|e| invalid(path, e))?;
            if bytes.len() as u64 > MAX_VOCAB_PICKLE {
                return Err(invalid(
                    path,
                    format!("more than the {MAX_VOCAB_PICKLE} bytes this reader accepts"),
                ));
            }
            if !bytes.starts_with(&LEGACY_HEAD) {
                return Err(invalid(
                    path,
                    "not torch.save's legacy format (magic number and protocol 1001)",
                ));
            }
            (bytes, no_storages, "the pickle")
        }
        None => {
            return Err(invalid(
                path,
                "not a file torch.save wrote (neither a zip nor its legacy pickle)",
            ))
        }
    };
    let mut machine = Machine::new(path, part, &storages, Allow::Vocab, MAX_VOCAB_OPS);
    let root = if format == Some(Magic::Zip) {
        machine.run_from(&bytes, 0)?.0
    } else {
        // The system information's pickle, then the object's.
        let mut info = Machine::new(path, part, &storages, Allow::Vocab, 1 << 10);
        let (_, next) = info.run_from(&bytes, LEGACY_HEAD.len())?;
        machine.run_from(&bytes, next)?.0
    };
    vocab_of(&machine, root)
}

/// The value of `key` in the dict `id`, if it is one and has it.
fn entry(m: &Machine, id: usize, key: &str) -> Option<usize> {
    match &m.arena[id] {
        Value::Dict(items) => items
            .iter()
            .find(|&&(k, _)| m.str_of(k) == Some(key))
            .map(|&(_, v)| v),
        _ => None,
    }
}

/// Refuses an entry of `what` that is a value the container already holds (see the module's
/// docs): `seen` holds those met so far.
fn own(
    m: &Machine,
    seen: &mut HashSet<usize>,
    id: usize,
    what: &str,
) -> Result<(), CheckpointError> {
    if seen.insert(id) {
        Ok(())
    } else {
        Err(m.err(format!("{what} holds one value twice (by reference)")))
    }
}

/// A list of tokens: each one's index is its position.
fn itos(m: &Machine, id: usize, what: &str) -> Result<Vec<(String, i64)>, CheckpointError> {
    let Value::List(items) = &m.arena[id] else {
        return Err(m.err(format!("{what} is not a list of tokens")));
    };
    let mut seen = HashSet::with_capacity(items.len());
    items
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            own(m, &mut seen, t, what)?;
            match m.str_of(t) {
                Some(t) => Ok((t.to_owned(), i as i64)),
                None => Err(m.err(format!(
                    "{what}[{i}] is not a token (a string of at most {} bytes)",
                    super::MAX_STRING
                ))),
            }
        })
        .collect()
}

/// A dict of token to index.
fn stoi(m: &Machine, id: usize, what: &str) -> Result<Vec<(String, i64)>, CheckpointError> {
    let Value::Dict(items) = &m.arena[id] else {
        return Err(m.err(format!("{what} is not a dict of token to index")));
    };
    let mut seen = HashSet::with_capacity(items.len());
    items
        .iter()
        .map(|&(k, v)| {
            own(m, &mut seen, k, what)?;
            let token = m
                .str_of(k)
                .ok_or_else(|| m.err(format!("a key of {what} is not a token")))?;
            match m.arena[v] {
                Value::Int(i) if i >= 0 => Ok((token.to_owned(), i)),
                _ => Err(m.err(format!(
                    "{what}[{token:?}] is not an index (a non-negative integer)"
                ))),
            }
        })
        .collect()
}

fn vocab_of(m: &Machine, root: usize) -> Result<PickledVocab, CheckpointError> {
    let object = |class: Class| match m.arena[root] {
        Value::Object {
            class: c,
            state: Some(state),
        } if c == class => Some(state),
        _ => None,
    };
    if let Some(state) = object(Class::LegacyVocab) {
        // `Vocab.__getstate__` keeps `itos` and `stoi` (as a plain dict); `__getitem__` looks
        // up `stoi`, unknown tokens as '<unk>'. torchtext 0.10's module of this name holds the
        // C++ vocabulary instead.
        let held = "torchtext's Python Vocab";
        let tokens = match (
            entry(m, state, "stoi"),
            entry(m, state, "itos"),
            entry(m, state, "vocab"),
        ) {
            (Some(d), _, _) => stoi(m, d, "Vocab.stoi")?,
            (None, Some(l), _) => itos(m, l, "Vocab.itos")?,
            (None, None, Some(inner)) => return pybind_vocab(m, inner),
            (None, None, None) => {
                return Err(m.err(format!("a {held} without stoi, itos or vocab")))
            }
        };
        return Ok(PickledVocab {
            tokens,
            unknown: Unknown::UnkToken,
            held,
        });
    }
    if let Some(state) = object(Class::VocabModule) {
        let inner = entry(m, state, "vocab").ok_or_else(|| {
            m.err("a torchtext Vocab module without its C++ vocabulary (`vocab`)")
        })?;
        return pybind_vocab(m, inner);
    }
    if object(Class::VocabPybind).is_some() {
        return pybind_vocab(m, root);
    }
    match &m.arena[root] {
        Value::Dict(_) => Ok(PickledVocab {
            tokens: stoi(m, root, "the dict")?,
            unknown: Unknown::Unsaid,
            held: "a dict of token to index",
        }),
        Value::List(_) => Ok(PickledVocab {
            tokens: itos(m, root, "the list")?,
            unknown: Unknown::Unsaid,
            held: "a list of tokens",
        }),
        Value::Object { class, state: None } => Err(m.err(format!(
            "a {class:?} object without state is not a vocabulary"
        ))),
        other => Err(m.err(format!(
            "holds {}, not a vocabulary (torchtext's Vocab, a dict of token to index or a list \
             of tokens)",
            describe(other)
        ))),
    }
}

/// `torchtext._torchtext.Vocab`: its state is `(version, [default index], itos, tensors)`.
fn pybind_vocab(m: &Machine, id: usize) -> Result<PickledVocab, CheckpointError> {
    let held = "torchtext's C++ Vocab (torchtext 0.10 to 0.18)";
    let state = match m.arena[id] {
        Value::Object {
            class: Class::VocabPybind,
            state: Some(state),
        } => state,
        _ => return Err(m.err(format!("the C++ vocabulary of a {held} is not one"))),
    };
    let Value::Tuple(parts) = &m.arena[state] else {
        return Err(m.err(format!("the state of a {held} is not a tuple")));
    };
    let [version, integers, strings, ..] = parts[..] else {
        return Err(m.err(format!(
            "the state of a {held} is not (version, integers, tokens, tensors)"
        )));
    };
    if m.str_of(version).is_none() {
        return Err(m.err(format!("the state of a {held} has no version string")));
    }
    let default_index = match &m.arena[integers] {
        Value::List(ints) => match ints.first().map(|&i| &m.arena[i]) {
            None => None,
            Some(&Value::Int(i)) if i >= 0 => Some(i),
            Some(_) => return Err(m.err(format!("the default index of a {held} is not one"))),
        },
        _ => return Err(m.err(format!("the integers of a {held} are not a list"))),
    };
    let tokens = itos(m, strings, "the tokens")?;
    // torchtext refuses a vocabulary that repeats a token.
    let mut distinct = HashSet::with_capacity(tokens.len());
    if let Some((token, _)) = tokens.iter().find(|(t, _)| !distinct.insert(t.as_str())) {
        return Err(m.err(format!("the {held} repeats the token {token:?}")));
    }
    Ok(PickledVocab {
        tokens,
        unknown: Unknown::DefaultIndex(default_index),
        held,
    })
}

fn describe(value: &Value) -> &'static str {
    match value {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::Int(_) => "an integer",
        Value::Float => "a float",
        Value::Str(_) | Value::Bytes => "a string",
        Value::Tuple(_) => "a tuple",
        Value::List(_) => "a list",
        Value::Dict(_) => "a dict",
        Value::Global(_) => "a class or function",
        Value::Storage(_) => "a storage",
        Value::Tensor(_) => "a tensor",
        Value::Object { .. } => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pickle::state_dict::tests::zip_with;

    fn read(pickle: &[u8]) -> Result<PickledVocab, String> {
        let file = zip_with(pickle, &[], zip::CompressionMethod::Stored);
        read_vocab(file.path()).map_err(|e| e.to_string())
    }

    #[test]
    fn plain_containers_are_vocabularies() {
        // torch.save(["<unk>", "a"]) and torch.save({"<unk>": 0, "a": 1}).
        let list =
            read(b"\x80\x02]q\x00(X\x05\x00\x00\x00<unk>X\x01\x00\x00\x00ae.").expect("list");
        let dict = read(b"\x80\x02}q\x00(X\x05\x00\x00\x00<unk>K\x00X\x01\x00\x00\x00aK\x01u.")
            .expect("dict");
        assert_eq!(list.tokens, dict.tokens);
        assert_eq!(list.tokens, vec![("<unk>".into(), 0), ("a".into(), 1)]);
        assert_eq!(list.unknown, Unknown::Unsaid);
    }

    /// `(version, [default index], itos, [])`, BUILT onto a C++ vocabulary.
    const CPP_VOCAB: &[u8] = b"ctorchtext._torchtext\nVocab\n)\x81(X\x05\x00\x00\x000.0.2]K\x00a](X\x05\x00\x00\x00<unk>X\x01\x00\x00\x00ae]tb";

    #[test]
    fn every_torchtexts_vocab_class_is_read() {
        let expect = |v: PickledVocab, unknown: Unknown| {
            assert_eq!(v.tokens, vec![("<unk>".into(), 0), ("a".into(), 1)]);
            assert_eq!(v.unknown, unknown);
        };
        // torchtext 0.11 to 0.18: the module; 0.10: the module under the old class name.
        for class in [&b"torchtext.vocab.vocab"[..], b"torchtext.vocab"] {
            let mut p = b"\x80\x02c".to_vec();
            p.extend_from_slice(class);
            p.extend_from_slice(b"\nVocab\n)\x81}(X\x05\x00\x00\x00vocab");
            p.extend_from_slice(CPP_VOCAB);
            p.extend_from_slice(b"ub.");
            expect(read(&p).expect("module"), Unknown::DefaultIndex(Some(0)));
        }
        // torchtext 0.10 and 0.11's Python vocabulary.
        let p = b"\x80\x02ctorchtext.legacy.vocab\nVocab\n)\x81}(X\x04\x00\x00\x00itos](X\x05\x00\x00\x00<unk>X\x01\x00\x00\x00aeub.";
        expect(read(p).expect("legacy"), Unknown::UnkToken);
        // torch.save's legacy format names a module's class by a persistent id.
        let mut legacy = LEGACY_HEAD.to_vec();
        legacy.extend_from_slice(b"\x80\x02}.\x80\x02(X\x06\x00\x00\x00modulectorchtext.vocab.vocab\nVocab\nX\x01\x00\x00\x00fX\x01\x00\x00\x00stQ)\x81}(X\x05\x00\x00\x00vocab");
        legacy.extend_from_slice(CPP_VOCAB);
        legacy.extend_from_slice(b"ub.\x80\x02].");
        let file = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(file.path(), &legacy).expect("write");
        expect(
            read_vocab(file.path()).expect("legacy format"),
            Unknown::DefaultIndex(Some(0)),
        );
        // A persistent id naming a module of any other class is refused as its global is.
        let mut other = legacy.clone();
        let at = other
            .windows(21)
            .position(|w| w == b"torchtext.vocab.vocab")
            .expect("class");
        other[at..at + 21].copy_from_slice(b"os.path.posix.vocab.v");
        std::fs::write(file.path(), &other).expect("write");
        let err = read_vocab(file.path()).expect_err("refused").to_string();
        assert!(
            err.contains("refuses the global `os.path.posix.vocab.v.Vocab`"),
            "{err}"
        );
    }

    #[test]
    fn values_repeated_by_reference_or_repeated_tokens_are_refused() {
        // One 4 KiB string appended a million times by reference: a 1 MB pickle that would
        // copy out as 4 GB of tokens.
        let mut p = b"\x80\x02](X\x00\x10\x00\x00".to_vec();
        p.extend(std::iter::repeat_n(b'x', 4096));
        p.extend(std::iter::repeat_n(b'2', 1 << 20));
        p.extend_from_slice(b"e.");
        let err = read(&p).expect_err("refused");
        assert!(err.contains("the list holds one value twice"), "{err}");
        // The same as the keys of a dict.
        let p = b"\x80\x02}(X\x01\x00\x00\x00aq\x00K\x00h\x00K\x01u.";
        let err = read(p).expect_err("refused");
        assert!(err.contains("the dict holds one value twice"), "{err}");
        // A C++ vocabulary that repeats a token, as torchtext refuses it.
        let p = b"\x80\x02ctorchtext._torchtext\nVocab\n)\x81(X\x05\x00\x00\x000.0.2]](X\x01\x00\x00\x00aX\x01\x00\x00\x00ae]tb.";
        let err = read(p).expect_err("refused");
        assert!(err.contains("repeats the token \"a\""), "{err}");
    }

    #[test]
    fn hostile_vocabularies_are_refused_by_name() {
        let cases: [(&[u8], &str); 8] = [
            (
                b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00lsR.",
                "refuses the global `os.system`",
            ),
            // A known class called rather than made: REDUCE on it is refused.
            (b"\x80\x02ctorchtext.vocab\nVocab\n)R.", "is called with"),
            // NEWOBJ with arguments.
            (
                b"\x80\x02ctorchtext.vocab\nVocab\nK\x01\x85\x81.",
                "NEWOBJ of",
            ),
            (b"\x80\x02ctorchtext.vocab\nVocab\n)\x81.", "without state"),
            (
                b"\x80\x02ctorchtext.vocab\nVocab\n)\x81}b.",
                "without stoi, itos or vocab",
            ),
            (b"\x80\x02]K\x01a.", "the list[0] is not a token"),
            (
                b"\x80\x02}X\x01\x00\x00\x00aJ\xff\xff\xff\xffs.",
                "is not an index",
            ),
            (b"\x80\x02K\x01.", "holds an integer, not a vocabulary"),
        ];
        for (pickle, needle) in cases {
            let err = read(pickle).expect_err(needle);
            assert!(err.contains(needle), "{needle}: {err}");
        }
        // Not a torch.save file at all.
        let file = tempfile::NamedTempFile::new().expect("temp");
        std::fs::write(file.path(), b"<unk>\na\n").expect("write");
        let err = read_vocab(file.path()).expect_err("text").to_string();
        assert!(err.contains("not a file torch.save wrote"), "{err}");
    }

    #[test]
    fn a_pickle_of_too_many_opcodes_stops_at_the_cap() {
        // An endless run of DUPs: each adds a reference, so the cap is what bounds memory.
        let mut p = b"\x80\x02N".to_vec();
        p.extend(std::iter::repeat_n(b'2', MAX_VOCAB_OPS + 1));
        p.push(b'.');
        let err = read(&p).expect_err("capped");
        assert!(err.contains("more than 16777216 opcodes"), "{err}");
    }
}
