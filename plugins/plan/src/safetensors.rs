//! safetensors checkpoints as the planner sees them: headers only (names, dtypes, shapes,
//! byte ranges), parsed and validated as hostile input, and the files of a checkpoint folder
//! (one file, or shards listed by `model.safetensors.index.json`).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::error::Category;

/// A checkpoint that cannot be read; the message names the file and the problem.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CheckpointError(pub String);

fn invalid(path: &Path, message: impl std::fmt::Display) -> CheckpointError {
    CheckpointError(format!("{}: {message}", path.display()))
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone, Deserialize)]
pub struct TensorInfo {
    /// `F32`, `F16`, `BF16`, `I64`, …
    pub dtype: String,
    /// The shape, at most [`MAX_DIMS`] long.
    #[serde(deserialize_with = "bounded_shape")]
    pub shape: Vec<i64>,
    /// Start and end of the bytes, relative to the end of the header.
    pub data_offsets: [u64; 2],
}

/// A parsed safetensors header: tensor name → entry, plus where the data begins.
#[derive(Debug, Clone)]
pub struct Header {
    /// Entries by tensor name (`__metadata__` excluded).
    pub tensors: BTreeMap<String, TensorInfo>,
    /// Byte offset of the data section in the file.
    pub data_start: u64,
}

/// The size in bytes of one element of a safetensors dtype.
pub fn dtype_size(dtype: &str) -> Option<usize> {
    Some(match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        "I8" | "U8" | "BOOL" | "F8_E4M3" | "F8_E5M2" => 1,
        _ => return None,
    })
}

/// The largest header accepted. A header entry is 100 to 150 bytes per tensor, and checkpoints
/// are sharded at a few GB, so real headers are small. The largest among the models Cresset
/// serves and tests with is MiniLM's, 11,408 bytes (104 tensors; measured on every
/// `*.safetensors` of the asset cache and of `make models`). A shard of Llama 3.1 405B (1,138
/// tensors over 191 files) or of DeepSeek-V3 (about 92,000 tensors with their FP8 scales, over
/// 163 files) is well under 100 KiB; even DeepSeek-V3 saved as one file would have a header
/// of about 13 MiB, Kimi K2 (about 140,000 tensors) about 20 MiB. 32 MiB is 2.5 times the
/// first and 1.6 times the second. (The cap was 100 MiB, and a header of one long shape list
/// then cost 4.4 GiB when it was parsed into a `serde_json::Value`.)
pub const MAX_HEADER: u64 = 32 << 20;

/// The most tensors one file may describe: a full [`MAX_HEADER`] at 128 bytes an entry, nearly
/// three times DeepSeek-V3's tensors in a single file.
pub const MAX_TENSORS: usize = 1 << 18;

/// The most dimensions a shape may have. The most real weights have is 5 (3-D convolutions).
pub const MAX_DIMS: usize = 8;

fn bounded_shape<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<i64>, D::Error> {
    struct Shape;
    impl<'de> Visitor<'de> for Shape {
        type Value = Vec<i64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "a shape: a list of at most {MAX_DIMS} integers")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<i64>, A::Error> {
            let mut dims = Vec::with_capacity(MAX_DIMS);
            while let Some(d) = seq.next_element()? {
                if dims.len() == MAX_DIMS {
                    return Err(de::Error::custom(format_args!(
                        "the shape has more than {MAX_DIMS} dimensions"
                    )));
                }
                dims.push(d);
            }
            Ok(dims)
        }
    }
    deserializer.deserialize_seq(Shape)
}

/// The header's top-level map, read entry by entry straight into [`TensorInfo`]s:
/// `__metadata__` is skipped unread, and the tensor being read is recorded in `current` so
/// that an error can name it.
struct Entries<'a> {
    current: &'a mut Option<String>,
}

impl<'de> DeserializeSeed<'de> for Entries<'_> {
    type Value = BTreeMap<String, TensorInfo>;
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Entries<'_> {
    type Value = BTreeMap<String, TensorInfo>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map of tensor names to entries")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut tensors = BTreeMap::new();
        while let Some(name) = map.next_key::<String>()? {
            if name == "__metadata__" {
                map.next_value::<de::IgnoredAny>()?;
                continue;
            }
            if tensors.len() == MAX_TENSORS {
                return Err(de::Error::custom(format_args!(
                    "more than {MAX_TENSORS} tensors, the most this reader accepts in one file"
                )));
            }
            *self.current = Some(name);
            let info: TensorInfo = map.next_value()?;
            let name = self.current.take().expect("set above: this is a bug");
            if tensors.contains_key(&name) {
                return Err(de::Error::custom(format_args!(
                    "tensor `{name}` appears twice"
                )));
            }
            tensors.insert(name, info);
        }
        Ok(tensors)
    }
}

/// Check the header length read from a file's first 8 bytes.
fn check_header_len(path: &Path, header_len: u64, file_len: u64) -> Result<(), CheckpointError> {
    if header_len > file_len.saturating_sub(8) {
        return Err(invalid(
            path,
            format!("header length {header_len} is larger than the file ({file_len} bytes)"),
        ));
    }
    if header_len > MAX_HEADER {
        return Err(invalid(
            path,
            format!(
                "the header is {header_len} bytes, more than the {MAX_HEADER} this reader accepts"
            ),
        ));
    }
    Ok(())
}

/// Parse and validate the header of a safetensors file of `file_len` bytes from its first
/// bytes (`bytes` may be the whole mapping).
pub fn parse_header(path: &Path, bytes: &[u8], file_len: u64) -> Result<Header, CheckpointError> {
    let len_bytes: [u8; 8] = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| invalid(path, "too short to be a safetensors file"))?;
    let header_len = u64::from_le_bytes(len_bytes);
    check_header_len(path, header_len, file_len)?;
    let json = bytes
        .get(8..8 + header_len as usize)
        .ok_or_else(|| invalid(path, "truncated header"))?;
    let mut current = None;
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let raw = Entries {
        current: &mut current,
    }
    .deserialize(&mut deserializer)
    .and_then(|tensors| deserializer.end().map(|()| tensors))
    .map_err(|e| match (&current, e.classify()) {
        (Some(name), _) => invalid(path, format!("tensor `{name}`: {e}")),
        (None, Category::Data) => invalid(path, format!("header: {e}")),
        (None, _) => invalid(path, format!("header is not valid JSON: {e}")),
    })?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    for (name, info) in &raw {
        let [start, end] = info.data_offsets;
        if start > end || end > data_len {
            return Err(invalid(
                path,
                format!(
                    "tensor `{name}`: bytes {start}..{end} lie outside the data ({data_len} bytes)"
                ),
            ));
        }
        if let Some(size) = dtype_size(&info.dtype) {
            let numel = info.shape.iter().try_fold(1u64, |acc, &d| {
                u64::try_from(d).ok().and_then(|d| acc.checked_mul(d))
            });
            if numel.and_then(|n| n.checked_mul(size as u64)) != Some(end - start) {
                return Err(invalid(
                    path,
                    format!(
                        "tensor `{name}`: shape {:?} of {} does not match its {} bytes",
                        info.shape,
                        info.dtype,
                        end - start
                    ),
                ));
            }
        }
    }
    Ok(Header {
        tensors: raw,
        data_start,
    })
}

/// Read only the header of a safetensors file (the planner's view: sizes without weights).
pub fn read_header(path: &Path) -> Result<Header, CheckpointError> {
    use std::io::Read;
    let mut file = File::open(path).map_err(|e| invalid(path, e))?;
    let file_len = file.metadata().map_err(|e| invalid(path, e))?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|e| invalid(path, e))?;
    let header_len = u64::from_le_bytes(len);
    check_header_len(path, header_len, file_len)?;
    let mut bytes = len.to_vec();
    bytes.resize(8 + header_len as usize, 0);
    file.read_exact(&mut bytes[8..])
        .map_err(|e| invalid(path, e))?;
    parse_header(path, &bytes, file_len)
}

/// The largest `model.safetensors.index.json` accepted. Its `weight_map` has a line of about
/// 90 bytes per tensor: DeepSeek-V3's (about 91,000 tensors) is about 9 MB, Kimi K2's (about
/// 141,000) about 13 MB. 64 MiB is over 4 times that.
const MAX_INDEX: u64 = 64 << 20;

/// The most shards an index may name. Llama 3.1 405B has 191.
const MAX_SHARDS: usize = 1 << 14;

/// An index's `weight_map` (tensor → shard), read entry by entry into what the order of the
/// shards needs: each shard with the first of its tensor names. Memory is per shard, not per
/// tensor.
struct ShardsByFirstTensor(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for ShardsByFirstTensor {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct WeightMap;
        impl<'de> Visitor<'de> for WeightMap {
            type Value = BTreeMap<String, String>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of tensor names to shard file names")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut shards: BTreeMap<String, String> = BTreeMap::new();
                while let Some((tensor, shard)) = map.next_entry::<String, String>()? {
                    let full = shards.len() == MAX_SHARDS;
                    match shards.get_mut(&shard) {
                        Some(first) if tensor < *first => *first = tensor,
                        Some(_) => {}
                        None if full => {
                            return Err(de::Error::custom(format_args!(
                                "more than {MAX_SHARDS} shards, the most this reader accepts"
                            )))
                        }
                        None => {
                            shards.insert(shard, tensor);
                        }
                    }
                }
                Ok(shards)
            }
        }
        deserializer.deserialize_map(WeightMap).map(Self)
    }
}

/// The shard files an index names, in the order of their first tensors.
fn shards_of_index(index: &Path) -> Result<Vec<String>, CheckpointError> {
    use std::io::Read;
    #[derive(Deserialize)]
    struct Index {
        weight_map: ShardsByFirstTensor,
    }
    let file = File::open(index).map_err(|e| invalid(index, e))?;
    let len = file.metadata().map_err(|e| invalid(index, e))?.len();
    if len > MAX_INDEX {
        return Err(invalid(
            index,
            format!("the index is {len} bytes, more than the {MAX_INDEX} this reader accepts"),
        ));
    }
    let mut text = Vec::new();
    file.take(MAX_INDEX)
        .read_to_end(&mut text)
        .map_err(|e| invalid(index, e))?;
    let parsed: Index = serde_json::from_slice(&text)
        .map_err(|e| invalid(index, format!("not a safetensors index: {e}")))?;
    let mut shards: Vec<(String, String)> = parsed
        .weight_map
        .0
        .into_iter()
        .map(|(shard, first)| (first, shard))
        .collect();
    shards.sort();
    Ok(shards.into_iter().map(|(_, shard)| shard).collect())
}

/// The weight files of a checkpoint directory: the safetensors shards named by
/// `model.safetensors.index.json` (in the order of their first tensor names), else
/// `model.safetensors`; failing both, the `torch.save` files of older checkpoints, found the
/// same way (`pytorch_model.bin.index.json`, else `pytorch_model.bin`), whose headers
/// [`read_any_header`] reads without running pickle code.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    for (index, single) in [
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ] {
        let index = dir.join(index);
        if index.is_file() {
            let mut files: Vec<PathBuf> = Vec::new();
            for shard in shards_of_index(&index)? {
                let name = Path::new(&shard);
                if name.components().count() != 1 || name.is_absolute() {
                    return Err(invalid(
                        &index,
                        format!("shard name {shard:?} is not a file name"),
                    ));
                }
                files.push(dir.join(name));
            }
            return Ok(files);
        }
        let single = dir.join(single);
        if single.is_file() {
            return Ok(vec![single]);
        }
    }
    Err(CheckpointError(format!(
        "{} has no weights: neither model.safetensors (or its index) nor pytorch_model.bin (or \
         its index)",
        dir.display()
    )))
}

/// The header of one file [`checkpoint_files`] lists: a safetensors header, or the tensors of
/// a `torch.save` zip (recognized by its magic) as [`crate::pickle::read_header`] reads them.
pub fn read_any_header(path: &Path) -> Result<Header, CheckpointError> {
    match crate::pickle::magic(path) {
        Some(crate::pickle::Magic::Zip) => crate::pickle::read_header(path),
        Some(crate::pickle::Magic::LegacyPickle) => Err(invalid(
            path,
            "a torch.save file in the legacy format of torch before 1.6 (a bare pickle), \
             which this reader does not take: save it again with a current torch \
             (torch.save(torch.load(f), f)) or as safetensors",
        )),
        None => read_header(path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::counting_alloc::allocated_by;
    use std::time::{Duration, Instant};

    /// A file's bytes: the header's length, the header, then `data` bytes.
    fn file(header: &str, data: usize) -> Vec<u8> {
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend(header.as_bytes());
        bytes.resize(bytes.len() + data, 0);
        bytes
    }

    fn parse(bytes: &[u8]) -> Result<Header, CheckpointError> {
        parse_header(Path::new("model.safetensors"), bytes, bytes.len() as u64)
    }

    fn refusal(bytes: &[u8]) -> String {
        parse(bytes).expect_err("refused").to_string()
    }

    #[test]
    fn entries_are_read_into_typed_tensors_and_metadata_is_skipped() {
        let bytes = file(
            r#"{"__metadata__":{"format":"pt","nested":[[{"a":1}]]},
                "w":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16],"extra":{"x":[1,2]}},
                "b":{"dtype":"I64","shape":[],"data_offsets":[16,24]}}"#,
            24,
        );
        let header = parse(&bytes).expect("parses");
        assert_eq!(
            header.tensors.keys().collect::<Vec<_>>(),
            ["b", "w"],
            "`__metadata__` is not a tensor"
        );
        assert_eq!(header.tensors["w"].shape, [2, 2]);
        assert_eq!(header.tensors["b"].data_offsets, [16, 24]);
        assert_eq!(header.data_start, 8 + bytes.len() as u64 - 8 - 24);
    }

    #[test]
    fn a_shape_of_ten_million_dimensions_is_refused_at_the_ninth() {
        // The attack at a fifth of its size: one shape list of 10 million entries (20 MB of
        // JSON). Reading it into a `serde_json::Value` first cost 44 times the header.
        let shape = vec!["1"; 10_000_000].join(",");
        let header = format!(r#"{{"w":{{"dtype":"U8","shape":[{shape}],"data_offsets":[0,1]}}}}"#);
        let bytes = file(&header, 1);
        let started = Instant::now();
        let (result, allocated) = allocated_by(|| parse(&bytes));
        let err = result.expect_err("refused").to_string();
        assert!(
            err.contains("model.safetensors")
                && err.contains("tensor `w`")
                && err.contains(&format!("more than {MAX_DIMS} dimensions")),
            "{err}"
        );
        assert!(allocated < 4 << 10, "{allocated} bytes allocated");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
        // Eight dimensions are allowed.
        let bytes = file(
            r#"{"w":{"dtype":"U8","shape":[1,1,1,1,1,1,1,2],"data_offsets":[0,2]}}"#,
            2,
        );
        assert_eq!(
            parse(&bytes).expect("parses").tensors["w"].shape.len(),
            MAX_DIMS
        );
    }

    #[test]
    fn more_tensors_than_the_cap_are_refused() {
        let mut header = String::from("{");
        for i in 0..=MAX_TENSORS {
            header.push_str(&format!(
                r#""t{i}":{{"dtype":"U8","shape":[0],"data_offsets":[0,0]}},"#
            ));
        }
        header.pop();
        header.push('}');
        let err = refusal(&file(&header, 0));
        assert!(
            err.contains(&format!("more than {MAX_TENSORS} tensors")),
            "{err}"
        );
    }

    #[test]
    fn a_header_at_the_tensor_cap_costs_a_small_multiple_of_its_size() {
        let mut header = String::from("{");
        for i in 0..MAX_TENSORS {
            header.push_str(&format!(
                r#""model.layers.{i}.mlp.weight":{{"dtype":"BF16","shape":[0,64],"data_offsets":[0,0]}},"#
            ));
        }
        header.pop();
        header.push('}');
        let bytes = file(&header, 0);
        let (result, allocated) = allocated_by(|| parse(&bytes));
        assert_eq!(result.expect("parses").tensors.len(), MAX_TENSORS);
        assert!(
            allocated < 4 * header.len() as u64,
            "{allocated} bytes allocated for a {} byte header",
            header.len()
        );
    }

    #[test]
    fn a_header_past_the_cap_is_refused_before_it_is_read() {
        // The length alone decides: the file claims to be long enough.
        let bytes = (MAX_HEADER + 1).to_le_bytes();
        let (result, allocated) =
            allocated_by(|| parse_header(Path::new("model.safetensors"), &bytes, MAX_HEADER + 100));
        let err = result.expect_err("refused").to_string();
        assert!(
            err.contains(&format!("more than the {MAX_HEADER}")),
            "{err}"
        );
        assert!(allocated < 1 << 10, "{allocated} bytes allocated");
        // And read_header reads no more than the first 8 bytes of such a file.
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("model.safetensors");
        let f = File::create(&path).expect("create");
        std::io::Write::write_all(&mut &f, &bytes).expect("write");
        f.set_len(MAX_HEADER + 100).expect("sparse file");
        let err = read_header(&path).expect_err("refused").to_string();
        assert!(
            err.contains(&format!("more than the {MAX_HEADER}")),
            "{err}"
        );
    }

    #[test]
    fn malformed_headers_are_refused_with_what_is_wrong() {
        for (header, needle) in [
            ("not json", "not valid JSON"),
            ("[1,2]", "expected a map"),
            (
                r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}"#,
                "tensor `w` appears twice",
            ),
            (
                r#"{"w":{"dtype":"U8","shape":"long","data_offsets":[0,1]}}"#,
                "tensor `w`: invalid type",
            ),
            (
                r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1,2,3]}}"#,
                "tensor `w`",
            ),
            (
                r#"{"w":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}} x"#,
                "trailing",
            ),
        ] {
            let err = refusal(&file(header, 1));
            assert!(err.contains(needle), "{header}: {err}");
        }
    }

    #[test]
    fn shards_come_in_the_order_of_their_first_tensors_and_the_index_is_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = dir.path().join("model.safetensors.index.json");
        std::fs::write(
            &index,
            r#"{"metadata":{"total_size":1},"weight_map":{
                "z.weight":"b.safetensors","a.weight":"c.safetensors",
                "m.weight":"b.safetensors","b.weight":"a.safetensors"}}"#,
        )
        .expect("write");
        let files = checkpoint_files(dir.path()).expect("files");
        let names: Vec<_> = files
            .iter()
            .map(|f| f.file_name().expect("name").to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["c.safetensors", "a.safetensors", "b.safetensors"]);

        std::fs::write(&index, r#"{"weight_map":{"a":"../a.safetensors"}}"#).expect("write");
        let err = checkpoint_files(dir.path())
            .expect_err("refused")
            .to_string();
        assert!(err.contains("is not a file name"), "{err}");

        let f = File::create(&index).expect("create");
        f.set_len(MAX_INDEX + 1).expect("sparse file");
        let err = checkpoint_files(dir.path())
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("index.json") && err.contains("more than the"),
            "{err}"
        );
    }
}
