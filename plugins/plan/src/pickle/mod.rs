//! Files that `torch.save` wrote, read without running pickle code: state dicts
//! (`pytorch_model.bin`, `.pth`, `.pt`: [`read_header`]) and TorchServe's `source_vocab.pt`, a
//! pickled torchtext vocabulary ([`read_vocab`]).
//!
//! Since torch 1.6 such a file is a zip: `<archive>/data.pkl` is a pickle of the saved object in
//! which every tensor is a call of `torch._utils._rebuild_tensor_v2` on a storage that the
//! pickle names by a persistent id, and `<archive>/data/<key>` holds that storage's bytes,
//! stored uncompressed. Before, it was a run of pickles (magic number, protocol, system
//! information, the object, storage keys) followed by the storages. A pickle is a program for
//! a stack machine whose `GLOBAL` and `REDUCE` opcodes import and call any Python function,
//! which is how a hostile checkpoint runs code in `torch.load`. This reader is its own stack
//! machine (`machine.rs`): it knows the opcodes of plain values and containers and a short list
//! of globals, given by what is read (a state dict's: `collections.OrderedDict`, the tensor
//! and parameter rebuild functions, the typed storage classes; a vocabulary's adds torchtext's
//! `Vocab` classes, `collections.Counter` and `set`, and the opcodes that make objects and
//! sets), and nothing else; any other global is refused by name before anything is called. Classes are never instantiated: an object is
//! its class's name and the state the pickle gives it, which the reader then interprets. It
//! never reads tensor bytes: a state dict's result is a safetensors-like
//! [`Header`](crate::safetensors::Header) whose byte ranges point into the zip's stored
//! entries, so loading and planning read a pickled checkpoint as they read safetensors.
//!
//! Memory is bounded by the pickle's size and opcode count: every opcode adds at most one value
//! or one reference (values are shared by index, never copied: about 40 bytes a value), and
//! what is copied out of the machine is copied once per value (see `vocab.rs`). Strings
//! are capped at [`MAX_STRING`], a dict's entries at
//! [`MAX_TENSORS`](crate::safetensors::MAX_TENSORS) where tensors are looked for, a call's
//! arguments at 8, so that no opcode's work grows with what the memo holds.

mod machine;
mod state_dict;
mod vocab;

use std::collections::HashMap;
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::safetensors::CheckpointError;

pub use state_dict::read_header;
pub use vocab::{read_vocab, PickledVocab, Unknown, MAX_VOCAB_PICKLE};

/// The largest state dict `data.pkl` accepted. A state dict's pickle takes about 150 bytes a
/// tensor: GPT-2's is 26 KB, a 70B Llama's (723 tensors) about 110 KB; even DeepSeek-V3's
/// 92,000 tensors would take about 14 MB. 16 MiB bounds the reader's memory at about 700 MB for
/// a pickle of one-byte opcodes.
pub const MAX_PICKLE: u64 = 16 << 20;

/// The longest string read: tensor names, storage keys and a vocabulary's tokens are well
/// under 1 KiB.
pub const MAX_STRING: usize = 4 << 10;

fn invalid(path: &Path, message: impl std::fmt::Display) -> CheckpointError {
    CheckpointError(format!("{}: {message}", path.display()))
}

/// What a `torch.save` file starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    /// A zip: the format of `torch.save` since torch 1.6.
    Zip,
    /// The pickled magic number (protocol 2, a 10-byte LONG1) that `torch.save` wrote first
    /// before torch 1.6 (and since, with `_use_new_zipfile_serialization=False`).
    LegacyPickle,
}

/// The format a file's first bytes show, if it is one of `torch.save`'s.
pub fn magic(path: &Path) -> Option<Magic> {
    let mut head = [0u8; 4];
    File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .ok()?;
    match head {
        [b'P', b'K', 3, 4] => Some(Magic::Zip),
        [0x80, 0x02, 0x8a, 0x0a] => Some(Magic::LegacyPickle),
        _ => None,
    }
}

/// A `torch.save` zip, opened: its pickle's bytes and where each storage's bytes lie.
struct TorchZip {
    pickle: Vec<u8>,
    /// Storage key → absolute byte offset of the stored entry's data, and its length.
    storages: HashMap<String, (u64, u64)>,
}

/// Open a `torch.save` zip whose `data.pkl` is at most `max_pickle` bytes.
fn open_zip(path: &Path, max_pickle: u64) -> Result<TorchZip, CheckpointError> {
    let file = File::open(path).map_err(|e| invalid(path, e))?;
    let file_len = file.metadata().map_err(|e| invalid(path, e))?.len();
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| invalid(path, format!("not a torch.save zip: {e}")))?;
    let pickle_name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_owned)
        .ok_or_else(|| invalid(path, "a zip without <archive>/data.pkl is not torch.save's"))?;
    let prefix = pickle_name.trim_end_matches("data.pkl").to_owned();
    if let Ok(mut order) = zip.by_name(&format!("{prefix}byteorder")) {
        let mut text = String::new();
        (&mut order)
            .take(16)
            .read_to_string(&mut text)
            .map_err(|e| invalid(path, e))?;
        if text.trim() != "little" {
            return Err(invalid(
                path,
                format!("byte order {:?} is not little-endian", text.trim()),
            ));
        }
    }
    let mut storages = HashMap::new();
    let data_prefix = format!("{prefix}data/");
    for i in 0..zip.len() {
        let entry = zip.by_index_raw(i).map_err(|e| invalid(path, e))?;
        let Some(key) = entry.name().strip_prefix(&data_prefix) else {
            continue;
        };
        if entry.compression() != zip::CompressionMethod::Stored {
            return Err(invalid(
                path,
                format!("storage {key} is compressed; torch.save stores storages uncompressed"),
            ));
        }
        let start = entry.data_start();
        if start
            .checked_add(entry.size())
            .is_none_or(|end| end > file_len)
        {
            return Err(invalid(
                path,
                format!("storage {key} lies outside the file ({file_len} bytes)"),
            ));
        }
        storages.insert(key.to_owned(), (start, entry.size()));
    }
    let entry = zip.by_name(&pickle_name).map_err(|e| invalid(path, e))?;
    if entry.size() > max_pickle {
        return Err(invalid(
            path,
            format!(
                "data.pkl is {} bytes, more than the {max_pickle} this reader accepts",
                entry.size()
            ),
        ));
    }
    let mut pickle = Vec::new();
    entry
        .take(max_pickle)
        .read_to_end(&mut pickle)
        .map_err(|e| invalid(path, format!("data.pkl: {e}")))?;
    Ok(TorchZip { pickle, storages })
}
