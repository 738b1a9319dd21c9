//! State dicts: the tensors of a `torch.save` zip, as names, dtypes, shapes and byte ranges.

use std::collections::BTreeMap;
use std::path::Path;

use super::machine::{Allow, Machine, Value};
use super::{open_zip, MAX_PICKLE};
use crate::safetensors::{CheckpointError, Header, TensorInfo, MAX_TENSORS};

/// The deepest nesting of containers walked when looking for tensors.
const MAX_DEPTH: usize = 32;

/// Read a `torch.save` zip's tensors: names, dtypes, shapes and absolute byte ranges.
pub fn read_header(path: &Path) -> Result<Header, CheckpointError> {
    let zip = open_zip(path, MAX_PICKLE)?;
    let mut machine = Machine::new(
        path,
        "data.pkl",
        &zip.storages,
        Allow::StateDict,
        MAX_PICKLE as usize,
    );
    let (root, _) = machine.run_from(&zip.pickle, 0)?;
    let tensors = tensors(&machine, root, 0)?;
    Ok(Header {
        tensors,
        data_start: 0,
    })
}

/// The tensors of the result: a dict of names to tensors, or one nested under
/// `state_dict`/`model` (training checkpoints). Entries that are not tensors are skipped.
fn tensors(
    m: &Machine,
    root: usize,
    depth: usize,
) -> Result<BTreeMap<String, TensorInfo>, CheckpointError> {
    if depth > MAX_DEPTH {
        return Err(m.err("dicts nest too deeply"));
    }
    let Value::Dict(items) = &m.arena[root] else {
        return Err(m.err("the checkpoint is not a dict of tensors"));
    };
    if items.len() > MAX_TENSORS {
        return Err(m.err(format!(
            "a dict of {} entries, more than the {MAX_TENSORS} tensors this reader accepts",
            items.len()
        )));
    }
    let mut out = BTreeMap::new();
    for &(k, v) in items {
        if let (Some(name), Value::Tensor(info)) = (m.str_of(k), &m.arena[v]) {
            out.insert(name.to_owned(), TensorInfo::clone(info));
        }
    }
    if out.is_empty() {
        for &(k, v) in items {
            if matches!(m.str_of(k), Some("state_dict" | "model"))
                && matches!(m.arena[v], Value::Dict(_))
            {
                return tensors(m, v, depth + 1);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::pickle::{magic, Magic};
    use std::collections::HashMap;
    use std::io::Write;

    /// A `torch.save`-shaped zip: `archive/data.pkl` and stored `archive/data/<key>` entries.
    pub(in crate::pickle) fn zip_with(
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
                "opcode 0x81 at byte 2 is not one a state dict uses",
            ),
            (
                b"\x80\x02\x82\x01.".to_vec(),
                &[],
                zip::CompressionMethod::Stored,
                "opcode 0x82",
            ),
            (
                b"\x80\x02ctorchtext.vocab\nVocab\n)\x81.".to_vec(),
                &[],
                zip::CompressionMethod::Stored,
                "refuses the global `torchtext.vocab.Vocab`",
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
        let mut machine = Machine::new(
            file.path(),
            "data.pkl",
            &storages,
            Allow::StateDict,
            MAX_PICKLE as usize,
        );
        machine.run_from(&p, 0).expect("run");
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
