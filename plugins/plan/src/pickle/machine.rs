//! The pickle machine: a stack machine for the opcodes of plain values and containers, and for
//! the globals that what is read allows ([`Allow`]); any other global is refused by name.

use std::collections::HashMap;
use std::path::Path;

use super::{invalid, MAX_STRING};
use crate::safetensors::{dtype_size, CheckpointError, TensorInfo, MAX_DIMS};

/// What a file is read for, and so which globals its pickle may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Allow {
    /// A state dict: tensors in (ordered) dicts.
    StateDict,
    /// A vocabulary: torchtext's `Vocab` objects, `Counter`s and sets besides.
    Vocab,
}

impl Allow {
    /// What is read, for messages.
    fn read(self) -> &'static str {
        match self {
            Allow::StateDict => "a state dict",
            Allow::Vocab => "a vocabulary",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Allow::StateDict => "a checkpoint may hold tensors and plain containers only",
            Allow::Vocab => {
                "a vocabulary may hold torchtext's Vocab, tensors and plain containers only"
            }
        }
    }
}

/// A class whose objects the reader keeps as the state their pickle gives them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Class {
    /// `torchtext.vocab.Vocab`: up to torchtext 0.9 the Python vocabulary (`itos`, `stoi`,
    /// `freqs`, ... attributes), in 0.10 the `nn.Module` that 0.11 moved (below); or
    /// `torchtext.legacy.vocab.Vocab`, the Python one in 0.10 and 0.11.
    LegacyVocab,
    /// `torchtext.vocab.vocab.Vocab` (torchtext 0.11 to 0.18): an `nn.Module` whose `vocab`
    /// attribute is the C++ vocabulary.
    VocabModule,
    /// `torchtext._torchtext.Vocab`, the C++ vocabulary: its state is `(version, [default
    /// index], itos, [])`.
    VocabPybind,
}

/// A global the reader knows. Anything else in a `GLOBAL` opcode is refused.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Global {
    OrderedDict,
    RebuildTensor,
    RebuildParameter,
    /// `torch.Size`, called on a tuple.
    Size,
    /// A typed storage class, as its safetensors dtype.
    Storage(&'static str),
    /// `collections.Counter`: a dict.
    Counter,
    /// `set`: kept as a list.
    Set,
    Class(Class),
}

fn global(module: &str, name: &str, allow: Allow) -> Option<Global> {
    let vocab = allow == Allow::Vocab;
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
        ("collections", "Counter") if vocab => Global::Counter,
        ("builtins" | "__builtin__", "set") if vocab => Global::Set,
        ("torchtext.vocab" | "torchtext.legacy.vocab", "Vocab") if vocab => {
            Global::Class(Class::LegacyVocab)
        }
        ("torchtext.vocab.vocab", "Vocab") if vocab => Global::Class(Class::VocabModule),
        ("torchtext._torchtext", "Vocab") if vocab => Global::Class(Class::VocabPybind),
        _ => return None,
    })
}

/// A storage named by a persistent id: its dtype, its element count and where its bytes are.
#[derive(Debug, Clone)]
pub(super) struct Storage {
    dtype: &'static str,
    numel: u64,
    /// Absolute byte offset of the stored zip entry's data, and its length.
    start: u64,
    len: u64,
}

/// A value of the pickle machine. Containers hold indices into the arena, so a value fetched
/// from the memo again and again costs nothing.
#[derive(Debug)]
pub(super) enum Value {
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
    Storage(Box<Storage>),
    Tensor(Box<TensorInfo>),
    /// An object of a known class (`NEWOBJ`), and the state `BUILD` gave it.
    Object {
        class: Class,
        state: Option<usize>,
    },
}

/// The pickle machine's state.
pub(super) struct Machine<'a> {
    pub(super) path: &'a Path,
    pub(super) arena: Vec<Value>,
    stack: Vec<usize>,
    marks: Vec<usize>,
    memo: HashMap<u32, usize>,
    /// Storages by key, looked up in the zip once each.
    storages: &'a HashMap<String, (u64, u64)>,
    allow: Allow,
    /// The most opcodes run: each adds at most one value or reference.
    max_ops: usize,
    /// What the error messages call the pickle (`data.pkl`).
    part: &'static str,
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

impl<'a> Machine<'a> {
    /// A machine for one pickle of `path` (`part` names it in errors), whose persistent ids
    /// name `storages`, which runs at most `max_ops` opcodes.
    pub(super) fn new(
        path: &'a Path,
        part: &'static str,
        storages: &'a HashMap<String, (u64, u64)>,
        allow: Allow,
        max_ops: usize,
    ) -> Self {
        Machine {
            path,
            arena: Vec::new(),
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            storages,
            allow,
            max_ops,
            part,
        }
    }

    pub(super) fn err(&self, message: impl std::fmt::Display) -> CheckpointError {
        invalid(self.path, format!("{}: {message}", self.part))
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

    pub(super) fn str_of(&self, id: usize) -> Option<&str> {
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

    /// In a vocabulary, `('module', cls, source_file, source)`: how torch.save's legacy format
    /// names the class of an `nn.Module` it saves (torchtext's `Vocab` module), read as `cls`
    /// (a global, checked as any other); the source is never looked at.
    fn module_class(&self, pid: usize) -> Option<usize> {
        match &self.arena[pid] {
            Value::Tuple(items) if self.allow == Allow::Vocab && items.len() == 4 => {
                (self.str_of(items[0]) == Some("module")
                    && matches!(self.arena[items[1]], Value::Global(Global::Class(_))))
                .then_some(items[1])
            }
            _ => None,
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
        Ok(Value::Storage(Box::new(Storage {
            dtype,
            numel,
            start,
            len,
        })))
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
            // `Counter()` or `Counter({token: count})`: the dict.
            Global::Counter if args.is_empty() => self.push(Value::Dict(Vec::new())),
            Global::Counter if matches!(self.arena[args[0]], Value::Dict(_)) => {
                self.stack.push(args[0]);
            }
            // `set()` or `set([items])`: the list.
            Global::Set if args.is_empty() => self.push(Value::List(Vec::new())),
            Global::Set if matches!(self.arena[args[0]], Value::List(_)) => {
                self.stack.push(args[0]);
            }
            other => return Err(self.err(format!("{other:?} is called with {args:?}"))),
        }
        Ok(())
    }

    fn unknown_opcode(&self, op: u8, at: usize) -> CheckpointError {
        self.err(format!(
            "opcode 0x{op:02x} at byte {at} is not one {} uses",
            self.allow.read()
        ))
    }

    /// `NEWOBJ`: `cls.__new__(cls, *args)` for a known class and no arguments, an object
    /// without state.
    fn new_object(&mut self, cls: usize, args: usize) -> Result<(), CheckpointError> {
        match (&self.arena[cls], &self.arena[args]) {
            (&Value::Global(Global::Class(class)), Value::Tuple(a)) if a.is_empty() => {
                self.push(Value::Object { class, state: None });
                Ok(())
            }
            (Value::Global(g), _) => Err(self.err(format!("NEWOBJ of {g:?}"))),
            _ => Err(self.err("NEWOBJ of a value that is not a known class")),
        }
    }

    /// Run the pickle that starts at byte `start` of `bytes` to its `STOP`: its value, and the
    /// byte after it.
    pub(super) fn run_from(
        &mut self,
        bytes: &[u8],
        start: usize,
    ) -> Result<(usize, usize), CheckpointError> {
        let mut c = Cursor { bytes, pos: start };
        let short = |m: &Self| m.err("truncated");
        for _ in 0..self.max_ops {
            let op = c.array::<1>().ok_or_else(|| short(self))?[0];
            // Objects and sets are a vocabulary's only: a state dict reads as it always has.
            let objects = matches!(op, 0x81 | 0x92 | 0x8f..=0x91);
            match op {
                _ if objects && self.allow != Allow::Vocab => {
                    return Err(self.unknown_opcode(op, c.pos - 1))
                }
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
                b'.' => return Ok((self.pop()?, c.pos)), // STOP
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
                    let g = global(&module, &name, self.allow).ok_or_else(|| {
                        // A name is short; a hostile one is cut to keep the message so.
                        let full = format!("{module}.{name}");
                        let cut: String = full.chars().take(200).collect();
                        let more = if cut.len() < full.len() { "..." } else { "" };
                        self.err(format!(
                            "refuses the global `{cut}{more}`: {}",
                            self.allow.what()
                        ))
                    })?;
                    self.push(Value::Global(g));
                }
                b'R' => self.reduce()?,
                b'Q' => {
                    // BINPERSID
                    let pid = self.pop()?;
                    if let Some(class) = self.module_class(pid) {
                        self.stack.push(class);
                    } else {
                        let storage = self.persistent(pid)?;
                        self.push(storage);
                    }
                }
                0x81 => {
                    // NEWOBJ
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    self.new_object(cls, args)?;
                }
                0x92 => {
                    // NEWOBJ_EX: keyword arguments are refused as positional ones are.
                    let kwargs = self.pop()?;
                    let args = self.pop()?;
                    let cls = self.pop()?;
                    if !matches!(&self.arena[kwargs], Value::Dict(d) if d.is_empty()) {
                        return Err(self.err("NEWOBJ_EX with keyword arguments"));
                    }
                    self.new_object(cls, args)?;
                }
                0x8f => self.push(Value::List(Vec::new())), // EMPTY_SET, kept as a list
                0x90 => {
                    // ADDITEMS
                    let items = self.pop_mark()?;
                    let set = self.top()?;
                    self.list_mut(set)?.extend(items);
                }
                0x91 => {
                    // FROZENSET
                    let items = self.pop_mark()?;
                    self.push(Value::List(items));
                }
                b'b' => {
                    // BUILD: an object's state, or a state dict's `_metadata` attribute
                    // (ignored).
                    let state = self.pop()?;
                    let target = self.top()?;
                    match self.arena[target] {
                        Value::Object { state: None, class } => {
                            self.arena[target] = Value::Object {
                                class,
                                state: Some(state),
                            };
                        }
                        Value::Dict(_)
                            if matches!(self.arena[state], Value::Dict(_) | Value::None) => {}
                        _ => {
                            return Err(self.err(
                                "BUILD sets state on a value that is neither a dict nor a new \
                                 object",
                            ))
                        }
                    }
                }
                other => return Err(self.unknown_opcode(other, c.pos - 1)),
            }
        }
        Err(self.err(format!(
            "more than {} opcodes, the most this reader runs",
            self.max_ops
        )))
    }
}
