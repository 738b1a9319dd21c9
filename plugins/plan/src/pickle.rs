//! PyTorch's `torch.save` checkpoints (`pytorch_model.bin`, `.pth`, `.pt`) read without running
//! pickle code.
//!
//! Since torch 1.6 such a file is a zip: `<archive>/data.pkl` is a pickle of the state dict in
//! which every tensor is a call of `torch._utils._rebuild_tensor_v2` on a storage that the
//! pickle names by a persistent id, and `<archive>/data/<key>` holds that storage's bytes,
//! stored uncompressed. A pickle is a program for a stack machine whose `GLOBAL` and `REDUCE`
//! opcodes import and call any Python function, which is how a hostile checkpoint runs code in
//! `torch.load`. This reader is its own stack machine: it knows the opcodes of plain values and
//! containers, the handful of globals a state dict uses (`collections.OrderedDict`, the tensor
//! and parameter rebuild functions, the typed storage classes) and nothing else; any other
//! global is refused by name before anything is called. It never reads tensor bytes: the
//! result is a safetensors-like [`Header`] whose byte ranges point into the zip's stored
//! entries, so loading and planning read a pickled checkpoint as they read safetensors.
//!
//! Memory is bounded by the size of `data.pkl` (every opcode adds at most one value, and
//! values are shared by index, never copied: about 40 bytes a value), and `data.pkl` is capped
//! at [`MAX_PICKLE`]; strings at [`MAX_STRING`], a dict's entries at [`MAX_TENSORS`], a call's
//! arguments at 8, so that no opcode's work grows with what the memo holds.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::Path;

use crate::safetensors::{dtype_size, CheckpointError, Header, TensorInfo, MAX_DIMS, MAX_TENSORS};

/// The largest `data.pkl` accepted. A state dict's pickle takes about 150 bytes a tensor:
/// GPT-2's is 26 KB, a 70B Llama's (723 tensors) about 110 KB; even DeepSeek-V3's 92,000
/// tensors would take about 14 MB. 16 MiB bounds the reader's memory at about 700 MB for a
/// pickle of one-byte opcodes.
pub const MAX_PICKLE: u64 = 16 << 20;

/// The longest string read: tensor names and storage keys are well under 1 KiB.
pub const MAX_STRING: usize = 4 << 10;

/// The deepest nesting of containers walked when looking for tensors.
const MAX_DEPTH: usize = 32;

fn invalid(path: &Path, message: impl std::fmt::Display) -> CheckpointError {
    CheckpointError(format!("{}: {message}", path.display()))
}

/// What a `torch.save` file starts with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Magic {
    /// A zip: the format of `torch.save` since torch 1.6.
    Zip,
    /// The pickled magic number (protocol 2, a 10-byte LONG1) that `torch.save` wrote first
    /// before torch 1.6.
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

/// A global the reader knows. Anything else in a `GLOBAL` opcode is refused.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    /// `torch.Size`, called on a tuple.
    Size,
    /// A typed storage class, as its safetensors dtype.
    Storage(&'static str),
}

fn global(module: &str, name: &str) -> Option<Global> {
    Some(match (module, name) {
        ("collections", "OrderedDict") => Global::OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensor,
        ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
        ("torch", "Size") => Global::Size,
        ("torch", storage) => Global::Storage(match storage {
            "DoubleStorage" => "F64",
            "FloatStorage" => "F32",
            "HalfStorage" => "F16",
            "BFloat16Storage" => "BF16",
            "LongStorage" => "I64",
            "IntStorage" => "I32",
            "ShortStorage" => "I16",
            "CharStorage" => "I8",
            "ByteStorage" => "U8",
            "BoolStorage" => "BOOL",
            _ => return None,
        }),
        _ => return None,
    })
}

/// A storage named by a persistent id: its dtype, its element count and where its bytes are.
#[derive(Debug, Clone)]
struct Storage {
    dtype: &'static str,
    numel: u64,
    /// Absolute byte offset of the stored zip entry's data, and its length.
    start: u64,
    len: u64,
}

/// A value of the pickle machine. Containers hold indices into the arena, so a value fetched
/// from the memo again and again costs nothing.
#[derive(Debug)]
enum Value {
    None,
    Bool(bool),
    Int(i64),
    Float,
    Str(String),
    Bytes,
    Tuple(Vec<usize>),
    List(Vec<usize>),
    Dict(Vec<(usize, usize)>),
    Global(Global),
    Storage(Storage),
    Tensor(Box<TensorInfo>),
}

/// The pickle machine's state.
struct Machine<'a> {
    path: &'a Path,
    arena: Vec<Value>,
    stack: Vec<usize>,
    marks: Vec<usize>,
    memo: HashMap<u32, usize>,
    /// Storages by key, looked up in the zip once each.
    storages: &'a HashMap<String, (u64, u64)>,
}

/// Reads through the pickle's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let slice = self.bytes.get(self.pos..end)?;
        self.pos = end;
        Some(slice)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|b| b.try_into().ok())
    }
    fn line(&mut self) -> Option<&'a str> {
        let rest = self.bytes.get(self.pos..)?;
        let end = rest.iter().position(|&b| b == b'\n')?;
        self.pos += end + 1;
        std::str::from_utf8(&rest[..end]).ok()
    }
}

impl Machine<'_> {
    fn err(&self, message: impl std::fmt::Display) -> CheckpointError {
        invalid(self.path, format!("data.pkl: {message}"))
    }

    fn push(&mut self, value: Value) {
        self.arena.push(value);
        self.stack.push(self.arena.len() - 1);
    }

    fn pop(&mut self) -> Result<usize, CheckpointError> {
        if self.marks.last() == Some(&self.stack.len()) {
            return Err(self.err("a value is taken across a mark"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }

    fn top(&self) -> Result<usize, CheckpointError> {
        self.stack
            .last()
            .copied()
            .ok_or_else(|| self.err("stack underflow"))
    }

    /// The values pushed since the last mark, removing them and the mark.
    fn pop_mark(&mut self) -> Result<Vec<usize>, CheckpointError> {
        let mark = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no mark to pop to"))?;
        if mark > self.stack.len() {
            return Err(self.err("a mark lies above the stack"));
        }
        Ok(self.stack.split_off(mark))
    }

    fn int(&self, id: usize, what: &str) -> Result<i64, CheckpointError> {
        match self.arena[id] {
            Value::Int(v) => Ok(v),
            Value::Bool(b) => Ok(i64::from(b)),
            _ => Err(self.err(format!("{what} is not an integer"))),
        }
    }

    fn ints(&self, id: usize, what: &str) -> Result<Vec<i64>, CheckpointError> {
        match &self.arena[id] {
            Value::Tuple(items) | Value::List(items) if items.len() <= MAX_DIMS => {
                items.iter().map(|&i| self.int(i, what)).collect()
            }
            _ => Err(self.err(format!(
                "{what} is not a tuple of at most {MAX_DIMS} integers"
            ))),
        }
    }

    fn str_of(&self, id: usize) -> Option<&str> {
        match &self.arena[id] {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    fn dict_mut(&mut self, id: usize) -> Result<&mut Vec<(usize, usize)>, CheckpointError> {
        if !matches!(self.arena[id], Value::Dict(_)) {
            return Err(self.err("items are set on a value that is not a dict"));
        }
        match &mut self.arena[id] {
            Value::Dict(items) => Ok(items),
            _ => unreachable!("checked above"),
        }
    }

    fn list_mut(&mut self, id: usize) -> Result<&mut Vec<usize>, CheckpointError> {
        if !matches!(self.arena[id], Value::List(_)) {
            return Err(self.err("items are appended to a value that is not a list"));
        }
        match &mut self.arena[id] {
            Value::List(items) => Ok(items),
            _ => unreachable!("checked above"),
        }
    }

    /// `('storage', storage_type, key, location, numel)`: a storage of the zip.
    fn persistent(&mut self, pid: usize) -> Result<Value, CheckpointError> {
        let Value::Tuple(items) = &self.arena[pid] else {
            return Err(self.err("a persistent id is not a tuple"));
        };
        let [tag, ty, key, _location, numel] = items[..] else {
            return Err(self.err("a persistent id is not ('storage', type, key, location, numel)"));
        };
        if self.str_of(tag) != Some("storage") {
            return Err(self.err("a persistent id does not name a storage"));
        }
        let Value::Global(Global::Storage(dtype)) = self.arena[ty] else {
            return Err(self.err("a storage's type is not a typed storage class"));
        };
        let key = self
            .str_of(key)
            .ok_or_else(|| self.err("a storage key is not a string"))?;
        let numel = u64::try_from(self.int(numel, "a storage's size")?)
            .map_err(|_| self.err(format!("storage {key} has a negative size")))?;
        let &(start, len) = self
            .storages
            .get(key)
            .ok_or_else(|| self.err(format!("storage {key} has no data/{key} entry")))?;
        let size = dtype_size(dtype).unwrap_or(1) as u64;
        if numel.checked_mul(size) != Some(len) {
            return Err(self.err(format!(
                "storage {key} holds {len} bytes, not {numel} elements of {dtype}"
            )));
        }
        Ok(Value::Storage(Storage {
            dtype,
            numel,
            start,
            len,
        }))
    }

    /// `_rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, hooks, ...)`.
    fn rebuild_tensor(&self, args: &[usize]) -> Result<Value, CheckpointError> {
        let [storage, offset, size, stride, ..] = args[..] else {
            return Err(self.err("_rebuild_tensor_v2 has too few arguments"));
        };
        let Value::Storage(storage) = &self.arena[storage] else {
            return Err(self.err("_rebuild_tensor_v2's first argument is not a storage"));
        };
        let offset = u64::try_from(self.int(offset, "a tensor's storage offset")?)
            .map_err(|_| self.err("a tensor's storage offset is negative"))?;
        let shape = self.ints(size, "a tensor's size")?;
        let stride = self.ints(stride, "a tensor's stride")?;
        if shape.len() != stride.len() {
            return Err(self.err(format!("a tensor of size {shape:?} has strides {stride:?}")));
        }
        let mut numel: u64 = 1;
        for &d in &shape {
            let d = u64::try_from(d)
                .map_err(|_| self.err(format!("a tensor has a negative size {shape:?}")))?;
            numel = numel
                .checked_mul(d)
                .ok_or_else(|| self.err(format!("a tensor's size {shape:?} overflows")))?;
        }
        // Row-major strides; a dimension of size 1 may have any stride.
        let mut expected: i64 = 1;
        for (&d, &s) in shape.iter().zip(&stride).rev() {
            if d != 1 && numel > 0 && s != expected {
                return Err(self.err(format!(
                    "a tensor of size {shape:?} is a non-contiguous view (strides {stride:?}); \
                     save it with .contiguous()"
                )));
            }
            expected = expected.saturating_mul(d);
        }
        if offset
            .checked_add(numel)
            .is_none_or(|end| end > storage.numel)
        {
            return Err(self.err(format!(
                "a tensor of size {shape:?} at offset {offset} lies outside its storage of {} \
                 elements",
                storage.numel
            )));
        }
        let size = dtype_size(storage.dtype).unwrap_or(1) as u64;
        let first = storage.start + offset * size;
        debug_assert!(offset * size + numel * size <= storage.len);
        Ok(Value::Tensor(Box::new(TensorInfo {
            dtype: storage.dtype.to_owned(),
            shape,
            data_offsets: [first, first + numel * size],
        })))
    }

    fn reduce(&mut self) -> Result<(), CheckpointError> {
        let args = self.pop()?;
        let callable = self.pop()?;
        let Value::Tuple(args) = &self.arena[args] else {
            return Err(self.err("REDUCE's arguments are not a tuple"));
        };
        // Rebuilding takes at most 7 arguments; copying more would let one memoized tuple make
        // every call as costly as its length.
        if args.len() > 8 {
            return Err(self.err(format!("a call with {} arguments", args.len())));
        }
        let args = args.clone();
        let Value::Global(g) = self.arena[callable] else {
            return Err(self.err("REDUCE calls a value that is not a known global"));
        };
        match g {
            Global::OrderedDict if args.is_empty() => self.push(Value::Dict(Vec::new())),
            Global::RebuildTensor => {
                let tensor = self.rebuild_tensor(&args)?;
                self.push(tensor);
            }
            Global::RebuildParameter | Global::Size if !args.is_empty() => {
                self.stack.push(args[0]);
            }
            other => return Err(self.err(format!("{other:?} is called with {args:?}"))),
        }
        Ok(())
    }

    fn run(&mut self, bytes: &[u8]) -> Result<usize, CheckpointError> {
        let mut c = Cursor { bytes, pos: 0 };
        let short = |m: &Self| m.err("truncated");
        loop {
            let op = c.array::<1>().ok_or_else(|| short(self))?[0];
            match op {
                0x80 => {
                    // PROTO
                    let v = c.array::<1>().ok_or_else(|| short(self))?[0];
                    if v > 5 {
                        return Err(self.err(format!("pickle protocol {v} is not known")));
                    }
                }
                0x95 => {
                    // FRAME: a length hint only.
                    c.array::<8>().ok_or_else(|| short(self))?;
                }
                b'.' => return self.pop(), // STOP
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let top = self.top()?;
                    self.stack.push(top);
                }
                b'N' => self.push(Value::None),
                0x88 => self.push(Value::Bool(true)),
                0x89 => self.push(Value::Bool(false)),
                b'K' => {
                    let v = c.array::<1>().ok_or_else(|| short(self))?[0];
                    self.push(Value::Int(i64::from(v)));
                }
                b'M' => {
                    let v = u16::from_le_bytes(c.array().ok_or_else(|| short(self))?);
                    self.push(Value::Int(i64::from(v)));
                }
                b'J' => {
                    let v = i32::from_le_bytes(c.array().ok_or_else(|| short(self))?);
                    self.push(Value::Int(i64::from(v)));
                }
                0x8a => {
                    // LONG1: a little-endian two's complement integer of n bytes.
                    let n = c.array::<1>().ok_or_else(|| short(self))?[0] as usize;
                    let b = c.take(n).ok_or_else(|| short(self))?;
                    if n > 8 {
                        return Err(self.err("an integer wider than 64 bits"));
                    }
                    let mut v: i64 = 0;
                    for (i, &byte) in b.iter().enumerate() {
                        v |= i64::from(byte) << (8 * i);
                    }
                    if n > 0 && n < 8 && b[n - 1] & 0x80 != 0 {
                        v -= 1i64 << (8 * n);
                    }
                    self.push(Value::Int(v));
                }
                b'G' => {
                    c.array::<8>().ok_or_else(|| short(self))?;
                    self.push(Value::Float);
                }
                b'X' | 0x8c | 0x8d => {
                    // BINUNICODE, SHORT_BINUNICODE, BINUNICODE8
                    let n = match op {
                        b'X' => u32::from_le_bytes(c.array().ok_or_else(|| short(self))?) as u64,
                        0x8c => u64::from(c.array::<1>().ok_or_else(|| short(self))?[0]),
                        _ => u64::from_le_bytes(c.array().ok_or_else(|| short(self))?),
                    };
                    let n = usize::try_from(n).map_err(|_| short(self))?;
                    let b = c.take(n).ok_or_else(|| short(self))?;
                    let s =
                        std::str::from_utf8(b).map_err(|_| self.err("a string is not UTF-8"))?;
                    // Longer than any name: kept as an opaque value.
                    if s.len() > MAX_STRING {
                        self.push(Value::Bytes);
                    } else {
                        self.push(Value::Str(s.to_owned()));
                    }
                }
                b'U' | b'T' | b'C' | b'B' => {
                    // SHORT_BINSTRING, BINSTRING, SHORT_BINBYTES, BINBYTES
                    let n = if matches!(op, b'U' | b'C') {
                        c.array::<1>().ok_or_else(|| short(self))?[0] as usize
                    } else {
                        u32::from_le_bytes(c.array().ok_or_else(|| short(self))?) as usize
                    };
                    let b = c.take(n).ok_or_else(|| short(self))?;
                    match (op, std::str::from_utf8(b)) {
                        (b'U' | b'T', Ok(s)) if s.len() <= MAX_STRING => {
                            self.push(Value::Str(s.to_owned()))
                        }
                        _ => self.push(Value::Bytes),
                    }
                }
                b'}' => self.push(Value::Dict(Vec::new())),
                b']' => self.push(Value::List(Vec::new())),
                b')' => self.push(Value::Tuple(Vec::new())),
                b'd' | b'l' | b't' => {
                    let items = self.pop_mark()?;
                    let value = match op {
                        b'l' => Value::List(items),
                        b't' => Value::Tuple(items),
                        _ => {
                            if items.len() % 2 != 0 {
                                return Err(self.err("DICT has an odd number of items"));
                            }
                            Value::Dict(items.chunks(2).map(|kv| (kv[0], kv[1])).collect())
                        }
                    };
                    self.push(value);
                }
                0x85..=0x87 => {
                    // TUPLE1..3
                    let n = usize::from(op - 0x84);
                    if self.stack.len() < n
                        || self.marks.last().is_some_and(|&m| m > self.stack.len() - n)
                    {
                        return Err(self.err("stack underflow"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push(Value::Tuple(items));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let d = self.top()?;
                    self.dict_mut(d)?.push((k, v));
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    if items.len() % 2 != 0 {
                        return Err(self.err("SETITEMS has an odd number of items"));
                    }
                    let d = self.top()?;
                    let dict = self.dict_mut(d)?;
                    dict.extend(items.chunks(2).map(|kv| (kv[0], kv[1])));
                }
                b'a' => {
                    let v = self.pop()?;
                    let l = self.top()?;
                    self.list_mut(l)?.push(v);
                }
                b'e' => {
                    let items = self.pop_mark()?;
                    let l = self.top()?;
                    self.list_mut(l)?.extend(items);
                }
                b'q' | b'r' | 0x94 => {
                    // BINPUT, LONG_BINPUT, MEMOIZE
                    let key = match op {
                        b'q' => u32::from(c.array::<1>().ok_or_else(|| short(self))?[0]),
                        b'r' => u32::from_le_bytes(c.array().ok_or_else(|| short(self))?),
                        _ => self.memo.len() as u32,
                    };
                    let top = self.top()?;
                    self.memo.insert(key, top);
                }
                b'h' | b'j' => {
                    // BINGET, LONG_BINGET
                    let key = if op == b'h' {
                        u32::from(c.array::<1>().ok_or_else(|| short(self))?[0])
                    } else {
                        u32::from_le_bytes(c.array().ok_or_else(|| short(self))?)
                    };
                    let id = *self
                        .memo
                        .get(&key)
                        .ok_or_else(|| self.err(format!("memo key {key} is not set")))?;
                    self.stack.push(id);
                }
                b'c' | 0x93 => {
                    // GLOBAL, STACK_GLOBAL
                    let (module, name) = if op == b'c' {
                        let module = c.line().ok_or_else(|| short(self))?.to_owned();
                        let name = c.line().ok_or_else(|| short(self))?.to_owned();
                        (module, name)
                    } else {
                        let name = self.pop()?;
                        let module = self.pop()?;
                        match (self.str_of(module), self.str_of(name)) {
                            (Some(m), Some(n)) => (m.to_owned(), n.to_owned()),
                            _ => return Err(self.err("STACK_GLOBAL names are not strings")),
                        }
                    };
                    let g = global(&module, &name).ok_or_else(|| {
                        self.err(format!(
                            "refuses the global `{module}.{name}`: a checkpoint may hold \
                             tensors and plain containers only"
                        ))
                    })?;
                    self.push(Value::Global(g));
                }
                b'R' => self.reduce()?,
                b'Q' => {
                    // BINPERSID
                    let pid = self.pop()?;
                    let storage = self.persistent(pid)?;
                    self.push(storage);
                }
                b'b' => {
                    // BUILD: a state dict's `_metadata` attribute; ignored.
                    let state = self.pop()?;
                    let target = self.top()?;
                    if !matches!(self.arena[target], Value::Dict(_))
                        || !matches!(self.arena[state], Value::Dict(_) | Value::None)
                    {
                        return Err(self.err("BUILD sets state on a value that is not a dict"));
                    }
                }
                other => {
                    return Err(self.err(format!(
                        "opcode 0x{other:02x} at byte {} is not one a state dict uses",
                        c.pos - 1
                    )))
                }
            }
        }
    }

    /// The tensors of the result: a dict of names to tensors, or one nested under
    /// `state_dict`/`model` (training checkpoints). Entries that are not tensors are skipped.
    fn tensors(
        &self,
        root: usize,
        depth: usize,
    ) -> Result<BTreeMap<String, TensorInfo>, CheckpointError> {
        if depth > MAX_DEPTH {
            return Err(self.err("dicts nest too deeply"));
        }
        let Value::Dict(items) = &self.arena[root] else {
            return Err(self.err("the checkpoint is not a dict of tensors"));
        };
        if items.len() > MAX_TENSORS {
            return Err(self.err(format!(
                "a dict of {} entries, more than the {MAX_TENSORS} tensors this reader accepts",
                items.len()
            )));
        }
        let mut out = BTreeMap::new();
        for &(k, v) in items {
            if let (Some(name), Value::Tensor(info)) = (self.str_of(k), &self.arena[v]) {
                out.insert(name.to_owned(), TensorInfo::clone(info));
            }
        }
        if out.is_empty() {
            for &(k, v) in items {
                if matches!(self.str_of(k), Some("state_dict" | "model"))
                    && matches!(self.arena[v], Value::Dict(_))
                {
                    return self.tensors(v, depth + 1);
                }
            }
        }
        Ok(out)
    }
}

/// Read a `torch.save` zip's tensors: names, dtypes, shapes and absolute byte ranges.
pub fn read_header(path: &Path) -> Result<Header, CheckpointError> {
    let file = File::open(path).map_err(|e| invalid(path, e))?;
    let file_len = file.metadata().map_err(|e| invalid(path, e))?.len();
    let mut zip = zip::ZipArchive::new(file)
        .map_err(|e| invalid(path, format!("not a torch.save zip: {e}")))?;
    let pickle_name = zip
        .file_names()
        .find(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(str::to_owned)
        .ok_or_else(|| {
            invalid(
                path,
                "a zip without <archive>/data.pkl is not a torch.save checkpoint",
            )
        })?;
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
    let pickle = {
        let entry = zip.by_name(&pickle_name).map_err(|e| invalid(path, e))?;
        if entry.size() > MAX_PICKLE {
            return Err(invalid(
                path,
                format!(
                    "data.pkl is {} bytes, more than the {MAX_PICKLE} this reader accepts",
                    entry.size()
                ),
            ));
        }
        let mut bytes = Vec::new();
        entry
            .take(MAX_PICKLE)
            .read_to_end(&mut bytes)
            .map_err(|e| invalid(path, format!("data.pkl: {e}")))?;
        bytes
    };
    let mut machine = Machine {
        path,
        arena: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
        storages: &storages,
    };
    let root = machine.run(&pickle)?;
    let tensors = machine.tensors(root, 0)?;
    Ok(Header {
        tensors,
        data_start: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    /// A `torch.save`-shaped zip: `archive/data.pkl` and stored `archive/data/<key>` entries.
    fn zip_with(
        pickle: &[u8],
        storages: &[(&str, &[u8])],
        method: zip::CompressionMethod,
    ) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp");
        let mut w = zip::ZipWriter::new(file.reopen().expect("reopen"));
        let opts = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        w.start_file("archive/data.pkl", opts).expect("start");
        w.write_all(pickle).expect("write");
        w.start_file("archive/byteorder", opts).expect("start");
        w.write_all(b"little").expect("write");
        for (key, bytes) in storages {
            w.start_file(
                format!("archive/data/{key}"),
                opts.compression_method(method),
            )
            .expect("start");
            w.write_all(bytes).expect("write");
        }
        w.finish().expect("finish");
        file
    }

    /// The pickle `torch.save({"w": t})` writes (protocol 2) for a float tensor of `size` and
    /// `stride` at `offset` in a FloatStorage `"0"` of `numel` elements.
    fn state_dict_pickle(size: &[u8], stride: &[u8], offset: u8, numel: u8) -> Vec<u8> {
        let mut p = b"\x80\x02ccollections\nOrderedDict\nq\x00)Rq\x01X\x01\x00\x00\x00wq\x02ctorch._utils\n_rebuild_tensor_v2\nq\x03((X\x07\x00\x00\x00storageq\x04ctorch\nFloatStorage\nq\x05X\x01\x00\x00\x000q\x06X\x03\x00\x00\x00cpuq\x07K".to_vec();
        p.push(numel);
        p.extend_from_slice(b"tq\x08QK");
        p.push(offset);
        p.push(b'(');
        for &d in size {
            p.extend_from_slice(&[b'K', d]);
        }
        p.extend_from_slice(b"t(");
        for &s in stride {
            p.extend_from_slice(&[b'K', s]);
        }
        p.extend_from_slice(
            b"t\x89h\x00)Rq\x09tq\x0aRq\x0bs}q\x0cX\x09\x00\x00\x00_metadataq\x0d}sb.",
        );
        p
    }

    #[test]
    fn reads_a_state_dict_and_its_byte_ranges() {
        let data: Vec<u8> = (0..8u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let file = zip_with(
            &state_dict_pickle(&[2, 3], &[3, 1], 2, 8),
            &[("0", &data)],
            zip::CompressionMethod::Stored,
        );
        let header = read_header(file.path()).expect("read");
        let w = &header.tensors["w"];
        assert_eq!((w.dtype.as_str(), &w.shape[..]), ("F32", &[2i64, 3][..]));
        let bytes = std::fs::read(file.path()).expect("read");
        let [a, b] = w.data_offsets;
        assert_eq!(&bytes[a as usize..b as usize], &data[8..32]);
        assert_eq!(magic(file.path()), Some(Magic::Zip));
    }

    #[test]
    fn hostile_checkpoints_are_refused_by_name() {
        let data = vec![0u8; 32];
        let stored: &[(&str, &[u8])] = &[("0", &data)];
        type Case<'a> = (
            Vec<u8>,
            &'a [(&'a str, &'a [u8])],
            zip::CompressionMethod,
            &'a str,
        );
        let cases: Vec<Case> = vec![
            (
                b"\x80\x02cposix\nsystem\nX\x05\x00\x00\x00touchR.".to_vec(),
                &[],
                zip::CompressionMethod::Stored,
                "refuses the global `posix.system`",
            ),
            (
                b"\x80\x02\x8c\x08builtins\x8c\x04eval\x93.".to_vec(),
                &[],
                zip::CompressionMethod::Stored,
                "refuses the global `builtins.eval`",
            ),
            (
                state_dict_pickle(&[2, 3], &[1, 2], 0, 8),
                stored,
                zip::CompressionMethod::Stored,
                "non-contiguous",
            ),
            (
                state_dict_pickle(&[2, 3], &[3, 1], 4, 8),
                stored,
                zip::CompressionMethod::Stored,
                "outside its storage",
            ),
            (
                state_dict_pickle(&[2, 3], &[3, 1], 0, 9),
                stored,
                zip::CompressionMethod::Stored,
                "not 9 elements",
            ),
            (
                state_dict_pickle(&[2, 3], &[3, 1], 0, 8),
                &[],
                zip::CompressionMethod::Stored,
                "no data/0 entry",
            ),
            (
                state_dict_pickle(&[2, 3], &[3, 1], 0, 8),
                stored,
                zip::CompressionMethod::Deflated,
                "compressed",
            ),
            (
                b"\x80\x02}q\x00".to_vec(),
                &[],
                zip::CompressionMethod::Stored,
                "truncated",
            ),
            (
                b"\x80\x02s.".to_vec(),
                &[],
                zip::CompressionMethod::Stored,
                "underflow",
            ),
            (
                b"\x80\x02h\x07.".to_vec(),
                &[],
                zip::CompressionMethod::Stored,
                "memo key 7",
            ),
            (
                b"\x80\x02K\x01(\x85.".to_vec(),
                &[],
                zip::CompressionMethod::Stored,
                "underflow",
            ),
            (
                b"\x80\x02]K\x01.".to_vec(),
                &[],
                zip::CompressionMethod::Stored,
                "not a dict",
            ),
            (
                b"\x80\x02\x81.".to_vec(),
                &[],
                zip::CompressionMethod::Stored,
                "opcode 0x81",
            ),
        ];
        for (pickle, storages, method, needle) in cases {
            let file = zip_with(&pickle, storages, method);
            let err = read_header(file.path()).expect_err("refused");
            assert!(err.to_string().contains(needle), "{needle}: {err}");
        }
    }

    #[test]
    fn memo_references_share_values_instead_of_copying_them() {
        // A list appended to itself through the memo 100,000 times: each BINGET pushes an
        // index, so this costs one arena entry an opcode, not a copy of the list.
        let mut p = b"\x80\x02]q\x00".to_vec();
        for _ in 0..100_000 {
            p.extend_from_slice(b"h\x00a");
        }
        p.extend_from_slice(b"0}.");
        let file = zip_with(&p, &[], zip::CompressionMethod::Stored);
        let header = read_header(file.path()).expect("read");
        assert!(header.tensors.is_empty());
        let storages = HashMap::new();
        let mut machine = Machine {
            path: file.path(),
            arena: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            storages: &storages,
        };
        machine.run(&p).expect("run");
        assert_eq!(
            machine.arena.len(),
            2,
            "one list and one dict, nothing copied"
        );
        // A call with a long memoized argument tuple is refused, not copied call after call.
        let mut q = b"\x80\x02ccollections\nOrderedDict\n(".to_vec();
        q.extend(std::iter::repeat_n(b'N', 100));
        q.extend_from_slice(b"tR.");
        let file = zip_with(&q, &[], zip::CompressionMethod::Stored);
        let err = read_header(file.path()).expect_err("refused");
        assert!(err.to_string().contains("100 arguments"), "{err}");
    }
}
