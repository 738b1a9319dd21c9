//! SentencePiece `tokenizer.model` files (what GPT-fast, Llama 2, Mistral and T5 ship): the
//! protobuf is read here (pieces with their scores and types, the trainer's model type, byte
//! fallback and special ids, the normalizer's rules) and turned into the equivalent `tokenizers`
//! pipeline, so that ids are the `sentencepiece` package's on the same file.
//!
//! - BPE models (Llama, Mistral): sentencepiece merges the adjacent pair whose joined piece
//!   scores highest; here every split of every normal piece is a merge, ranked by that piece's
//!   score. Characters outside the vocabulary become `<0xXX>` byte pieces when the model has
//!   byte fallback, else one `<unk>` per run.
//! - Unigram models: the Viterbi segmentation over the pieces' scores.
//! - Normalization: the model's precompiled character map (`nmt_nfkc` and the like), trimming
//!   and collapsing spaces (`remove_extra_whitespaces`), the dummy `▁` prefix, `▁` for spaces.
//! - User-defined symbols are matched whole. Control symbols (`<s>`, `</s>`) are never read from
//!   a BPE model's text, as sentencepiece reads them as plain characters, and decode to nothing;
//!   a Unigram model's text that spells one is read as that piece (as transformers does).
//!
//! The file is outside input: its size is capped, every length is checked against what is
//! left, and a malformed file is an error that says what is wrong.

use std::io::Read;
use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::BPE;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{
    NormalizerWrapper, Precompiled, Prepend, Replace, Sequence as NormalizerSequence,
};
use tokenizers::AddedToken;

use crate::ModelError;

/// The largest `tokenizer.model` read (Gemma's, with 256k pieces, is about 4 MiB).
pub const MAX_FILE_BYTES: u64 = 64 << 20;
/// The most pieces a model may have.
pub const MAX_PIECES: usize = 1 << 21;

/// What a piece is (sentencepiece's `SentencePiece.Type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceType {
    /// A piece of text.
    Normal,
    /// `<unk>`.
    Unknown,
    /// A control symbol (`<s>`, `</s>`): never read from text.
    Control,
    /// A user-defined symbol: matched whole in text.
    UserDefined,
    /// Reserved and not used.
    Unused,
    /// A byte-fallback piece (`<0x41>`).
    Byte,
}

impl PieceType {
    fn from_wire(v: u64) -> Result<Self, String> {
        Ok(match v {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            other => return Err(format!("a piece has an unknown type {other}")),
        })
    }
}

/// One vocabulary entry.
#[derive(Debug, Clone)]
pub struct Piece {
    /// Its text, with `▁` for spaces.
    pub piece: String,
    /// Its score (a log probability for Unigram, the merge order for BPE).
    pub score: f32,
    /// What it is.
    pub kind: PieceType,
}

/// The segmentation algorithm (`TrainerSpec.model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// Unigram language model.
    Unigram,
    /// Byte-pair encoding.
    Bpe,
}

/// A parsed `tokenizer.model`.
#[derive(Debug, Clone)]
pub struct SentencePiece {
    /// The vocabulary, by id.
    pub pieces: Vec<Piece>,
    /// The segmentation algorithm.
    pub model_type: ModelType,
    /// Whether characters outside the vocabulary become byte pieces.
    pub byte_fallback: bool,
    /// `<unk>`'s id.
    pub unk_id: Option<u32>,
    /// `<s>`'s id, if the model has one.
    pub bos_id: Option<u32>,
    /// `</s>`'s id, if the model has one.
    pub eos_id: Option<u32>,
    /// The normalizer's precompiled character map (empty: none, as `identity`).
    pub precompiled_charsmap: Vec<u8>,
    /// Put a space before the text.
    pub add_dummy_prefix: bool,
    /// Trim spaces at both ends and collapse runs of them.
    pub remove_extra_whitespaces: bool,
    /// Write spaces as `▁`.
    pub escape_whitespaces: bool,
}

/// A protobuf field's value.
enum Field<'a> {
    Varint(u64),
    Fixed32([u8; 4]),
    Bytes(&'a [u8]),
}

/// A reader of protobuf wire format over a buffer; every length is checked against the rest.
struct Wire<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Wire<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or("the file ends inside a field")?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut value = 0u64;
        for i in 0..10 {
            let byte = self.take(1)?[0];
            value |= u64::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("a number is longer than 10 bytes".into())
    }

    /// The next field (number and value), or `None` at the end.
    fn next(&mut self) -> Result<Option<(u64, Field<'a>)>, String> {
        loop {
            if self.pos == self.buf.len() {
                return Ok(None);
            }
            let key = self.varint()?;
            let number = key >> 3;
            let field = match key & 7 {
                0 => Field::Varint(self.varint()?),
                // No field of the model is 64-bit: skip it.
                1 => {
                    self.take(8)?;
                    continue;
                }
                2 => {
                    let len =
                        usize::try_from(self.varint()?).map_err(|_| "a length is too large")?;
                    Field::Bytes(self.take(len)?)
                }
                5 => {
                    let b = self.take(4)?;
                    Field::Fixed32([b[0], b[1], b[2], b[3]])
                }
                other => return Err(format!("field {number} has wire type {other}")),
            };
            return Ok(Some((number, field)));
        }
    }
}

fn bytes<'a>(field: &Field<'a>, name: &str) -> Result<&'a [u8], String> {
    match field {
        Field::Bytes(b) => Ok(b),
        _ => Err(format!("`{name}` is not a length-delimited field")),
    }
}

fn varint(field: &Field<'_>, name: &str) -> Result<u64, String> {
    match field {
        Field::Varint(v) => Ok(*v),
        _ => Err(format!("`{name}` is not a number")),
    }
}

fn boolean(field: &Field<'_>, name: &str) -> Result<bool, String> {
    varint(field, name).map(|v| v != 0)
}

/// An `int32` id (negative ids are written as 10-byte two's complement): `None` when negative.
fn id(field: &Field<'_>, name: &str) -> Result<Option<i64>, String> {
    let v = varint(field, name)? as i64;
    i32::try_from(v)
        .map(|v| (v >= 0).then_some(i64::from(v)))
        .map_err(|_| format!("`{name}` is out of range"))
}

impl SentencePiece {
    /// Read and check a `tokenizer.model`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bad = |m: String| ModelError::Tokenizer(format!("{}: {m}", path.display()));
        let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot open: {e}")))?;
        let mut buf = Vec::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut buf)
            .map_err(|e| bad(format!("cannot read: {e}")))?;
        if buf.len() as u64 > MAX_FILE_BYTES {
            return Err(bad(format!(
                "larger than {} MiB: not a SentencePiece model",
                MAX_FILE_BYTES >> 20
            )));
        }
        Self::parse(&buf).map_err(|m| bad(format!("not a valid SentencePiece model: {m}")))
    }

    /// Parse a serialized `ModelProto`.
    pub fn parse(buf: &[u8]) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut trainer: Option<&[u8]> = None;
        let mut normalizer: Option<&[u8]> = None;
        let mut wire = Wire::new(buf);
        while let Some((number, field)) = wire.next()? {
            match number {
                1 => {
                    if pieces.len() == MAX_PIECES {
                        return Err(format!("more than {MAX_PIECES} pieces"));
                    }
                    pieces.push(Self::piece(bytes(&field, "pieces")?)?);
                }
                2 => trainer = Some(bytes(&field, "trainer_spec")?),
                3 => normalizer = Some(bytes(&field, "normalizer_spec")?),
                5 if !bytes(&field, "denormalizer_spec")?.is_empty() => {
                    return Err("denormalizer rules are not supported".into())
                }
                _ => {}
            }
        }
        if pieces.is_empty() {
            return Err("it has no pieces".into());
        }
        let mut model = Self {
            pieces,
            model_type: ModelType::Unigram,
            byte_fallback: false,
            unk_id: Some(0),
            bos_id: Some(1),
            eos_id: Some(2),
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: true,
            remove_extra_whitespaces: true,
            escape_whitespaces: true,
        };
        let (mut unk, mut bos, mut eos) = (Some(0i64), Some(1i64), Some(2i64));
        let mut wire = Wire::new(trainer.unwrap_or_default());
        while let Some((number, field)) = wire.next()? {
            match number {
                3 => {
                    model.model_type = match varint(&field, "model_type")? {
                        1 => ModelType::Unigram,
                        2 => ModelType::Bpe,
                        3 => return Err("WORD models are not supported".into()),
                        4 => return Err("CHAR models are not supported".into()),
                        other => return Err(format!("unknown model_type {other}")),
                    }
                }
                24 if boolean(&field, "treat_whitespace_as_suffix")? => {
                    return Err("treat_whitespace_as_suffix is not supported".into())
                }
                35 => model.byte_fallback = boolean(&field, "byte_fallback")?,
                40 => unk = id(&field, "unk_id")?,
                41 => bos = id(&field, "bos_id")?,
                42 => eos = id(&field, "eos_id")?,
                _ => {}
            }
        }
        let mut wire = Wire::new(normalizer.unwrap_or_default());
        while let Some((number, field)) = wire.next()? {
            match number {
                2 => model.precompiled_charsmap = bytes(&field, "precompiled_charsmap")?.to_vec(),
                3 => model.add_dummy_prefix = boolean(&field, "add_dummy_prefix")?,
                4 => model.remove_extra_whitespaces = boolean(&field, "remove_extra_whitespaces")?,
                5 => model.escape_whitespaces = boolean(&field, "escape_whitespaces")?,
                _ => {}
            }
        }
        let n = model.pieces.len();
        let check = |id: Option<i64>, name: &str, want: PieceType| -> Result<Option<u32>, String> {
            match id {
                None => Ok(None),
                Some(i) if (i as usize) < n && model.pieces[i as usize].kind == want => {
                    Ok(Some(i as u32))
                }
                Some(i) => Err(format!("`{name}` {i} is not a {want:?} piece")),
            }
        };
        model.unk_id = check(unk, "unk_id", PieceType::Unknown)?;
        model.bos_id = check(bos, "bos_id", PieceType::Control)?;
        model.eos_id = check(eos, "eos_id", PieceType::Control)?;
        if model.unk_id.is_none() {
            return Err("it has no <unk> piece".into());
        }
        let mut seen = std::collections::HashSet::with_capacity(n);
        if let Some(p) = model.pieces.iter().find(|p| !seen.insert(p.piece.as_str())) {
            return Err(format!("the piece {:?} is there twice", p.piece));
        }
        Ok(model)
    }

    fn piece(buf: &[u8]) -> Result<Piece, String> {
        let mut piece = Piece {
            piece: String::new(),
            score: 0.0,
            kind: PieceType::Normal,
        };
        let mut wire = Wire::new(buf);
        while let Some((number, field)) = wire.next()? {
            match (number, field) {
                (1, Field::Bytes(b)) => {
                    piece.piece = String::from_utf8(b.to_vec())
                        .map_err(|_| "a piece is not UTF-8".to_string())?
                }
                (2, Field::Fixed32(b)) => piece.score = f32::from_le_bytes(b),
                (3, field) => piece.kind = PieceType::from_wire(varint(&field, "type")?)?,
                (1 | 2, _) => return Err("a piece's text or score has the wrong wire type".into()),
                _ => {}
            }
        }
        if piece.piece.is_empty() {
            return Err("a piece is empty".into());
        }
        if !piece.score.is_finite() {
            return Err(format!("the piece {:?} has no finite score", piece.piece));
        }
        Ok(piece)
    }

    /// The `tokenizers` pipeline that segments as sentencepiece does. It adds no BOS or EOS:
    /// callers put [`Self::bos_id`] first where the model wants it.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer, ModelError> {
        let err = |e: Box<dyn std::error::Error + Send + Sync>| {
            ModelError::Tokenizer(format!("SentencePiece model: {e}"))
        };
        let unk = self.unk_id.map(|i| self.pieces[i as usize].piece.clone());
        let mut tokenizer = match self.model_type {
            ModelType::Bpe => {
                let vocab: tokenizers::models::bpe::Vocab = self
                    .pieces
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (p.piece.clone(), i as u32))
                    .collect();
                let mut builder = BPE::builder()
                    .vocab_and_merges(vocab.clone(), self.merges(&vocab))
                    .byte_fallback(self.byte_fallback)
                    .fuse_unk(true);
                if let Some(unk) = unk.clone() {
                    builder = builder.unk_token(unk);
                }
                tokenizers::Tokenizer::new(builder.build().map_err(err)?)
            }
            ModelType::Unigram => {
                let vocab = self
                    .pieces
                    .iter()
                    .map(|p| (p.piece.clone(), f64::from(p.score)))
                    .collect();
                let unk = self.unk_id.map(|i| i as usize);
                tokenizers::Tokenizer::new(
                    Unigram::from(vocab, unk, self.byte_fallback).map_err(err)?,
                )
            }
        };
        tokenizer
            .with_normalizer(Some(self.normalizer().map_err(err)?))
            .map_err(err)?;
        tokenizer.with_decoder(Some(self.decoder().map_err(err)?));
        let user_defined: Vec<AddedToken> = self
            .pieces
            .iter()
            .filter(|p| p.kind == PieceType::UserDefined)
            .map(|p| AddedToken::from(p.piece.clone(), false))
            .collect();
        tokenizer.add_tokens(user_defined).map_err(err)?;
        Ok(tokenizer)
    }

    /// BPE merges: each split of each normal piece into two pieces, ranked by the joined
    /// piece's score (highest first; ties by id).
    fn merges(&self, vocab: &tokenizers::models::bpe::Vocab) -> Vec<(String, String)> {
        let mut order: Vec<(usize, &Piece)> = self
            .pieces
            .iter()
            .enumerate()
            .filter(|(_, p)| p.kind == PieceType::Normal)
            .collect();
        order.sort_by(|(i, a), (j, b)| b.score.total_cmp(&a.score).then(i.cmp(j)));
        let mut merges = Vec::new();
        for (_, p) in order {
            for (at, _) in p.piece.char_indices().skip(1) {
                let (left, right) = p.piece.split_at(at);
                if vocab.contains_key(left) && vocab.contains_key(right) {
                    merges.push((left.to_owned(), right.to_owned()));
                }
            }
        }
        merges
    }

    /// The pieces of one type, escaped for a regular expression.
    fn escaped_pieces(&self, kind: PieceType) -> Vec<String> {
        self.pieces
            .iter()
            .filter(|p| p.kind == kind)
            .map(|p| escape_regex(&p.piece))
            .collect()
    }

    fn normalizer(&self) -> tokenizers::Result<NormalizerWrapper> {
        let mut steps: Vec<NormalizerWrapper> = Vec::new();
        if !self.precompiled_charsmap.is_empty() {
            steps.push(Precompiled::from(&self.precompiled_charsmap)?.into());
        }
        if self.remove_extra_whitespaces {
            steps.push(Replace::new(ReplacePattern::Regex("^ +| +$".into()), "")?.into());
            steps.push(Replace::new(ReplacePattern::Regex(" {2,}".into()), " ")?.into());
        }
        if self.add_dummy_prefix {
            // The dummy prefix goes before the whole text only. `tokenizers` also normalizes
            // the added tokens' own text with these steps, so a user-defined symbol on its own
            // must not get it, or it would only be matched after a space.
            let whole = self.escaped_pieces(PieceType::UserDefined);
            if whole.is_empty() {
                steps.push(Prepend::new(" ".into()).into());
            } else {
                let start = format!("^(?!(?:{})$)", whole.join("|"));
                steps.push(Replace::new(ReplacePattern::Regex(start), " ")?.into());
            }
        }
        if self.escape_whitespaces {
            steps.push(Replace::new(" ", "▁")?.into());
        }
        Ok(NormalizerSequence::new(steps).into())
    }

    fn decoder(&self) -> tokenizers::Result<DecoderWrapper> {
        let mut steps: Vec<DecoderWrapper> = Vec::new();
        // Control pieces decode to nothing; `<unk>` to sentencepiece's " ⁇ ".
        let controls = self.escaped_pieces(PieceType::Control);
        if !controls.is_empty() {
            let whole = format!("^(?:{})$", controls.join("|"));
            steps.push(Replace::new(ReplacePattern::Regex(whole), "")?.into());
        }
        if let Some(unk) = self.unk_id {
            let whole = format!("^{}$", escape_regex(&self.pieces[unk as usize].piece));
            steps.push(Replace::new(ReplacePattern::Regex(whole), " \u{2047} ")?.into());
        }
        if self.escape_whitespaces {
            steps.push(Replace::new("▁", " ")?.into());
        }
        steps.push(ByteFallback::new().into());
        steps.push(Fuse::new().into());
        if self.add_dummy_prefix {
            steps.push(Strip::new(' ', 1, 0).into());
        }
        Ok(DecoderSequence::new(steps).into())
    }
}

/// `text` with the characters a regular expression gives a meaning escaped.
fn escape_regex(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    for c in text.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    fn field(number: u64, payload: &[u8], out: &mut Vec<u8>) {
        varint(number << 3 | 2, out);
        varint(payload.len() as u64, out);
        out.extend_from_slice(payload);
    }

    fn piece(text: &str, score: f32, kind: u64) -> Vec<u8> {
        let mut p = Vec::new();
        field(1, text.as_bytes(), &mut p);
        varint(2 << 3 | 5, &mut p);
        p.extend_from_slice(&score.to_le_bytes());
        varint(3 << 3, &mut p);
        varint(kind, &mut p);
        p
    }

    /// A tiny BPE model: <unk>, <s>, </s>, the characters of "▁ab" and the merges "ab", "▁ab".
    fn tiny_bpe() -> Vec<u8> {
        let mut m = Vec::new();
        for (text, score, kind) in [
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("</s>", 0.0, 3),
            ("ab", -1.0, 1),
            ("▁ab", -2.0, 1),
            ("▁", -3.0, 1),
            ("a", -4.0, 1),
            ("b", -5.0, 1),
        ] {
            field(1, &piece(text, score, kind), &mut m);
        }
        let mut trainer = Vec::new();
        varint(3 << 3, &mut trainer);
        varint(2, &mut trainer);
        field(2, &trainer, &mut m);
        let mut normalizer = Vec::new();
        varint(4 << 3, &mut normalizer);
        varint(0, &mut normalizer);
        field(3, &normalizer, &mut m);
        m
    }

    #[test]
    fn a_small_bpe_model_segments_and_decodes() {
        let model = SentencePiece::parse(&tiny_bpe()).expect("parse");
        assert_eq!(model.model_type, ModelType::Bpe);
        assert_eq!(
            (model.bos_id, model.eos_id, model.unk_id),
            (Some(1), Some(2), Some(0))
        );
        let tok = model.tokenizer().expect("tokenizer");
        let ids = tok
            .encode("ab abc", false)
            .expect("encode")
            .get_ids()
            .to_vec();
        // "▁ab" "▁ab" then "c", outside the vocabulary and without byte fallback: <unk>.
        assert_eq!(ids, [4, 4, 0]);
        assert_eq!(tok.decode(&[1, 4, 4, 2], true).expect("decode"), "ab ab");
        assert_eq!(tok.decode(&[4, 0], false).expect("decode"), "ab \u{2047} ");
    }

    #[test]
    fn hostile_models_are_clear_errors() {
        let good = tiny_bpe();
        for (bytes, says) in [
            (Vec::new(), "no pieces"),
            (good[..good.len() - 1].to_vec(), "ends inside"),
            (vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f], "ends inside"),
            (
                vec![0x08; 1].into_iter().chain([0xff; 11]).collect(),
                "longer than 10",
            ),
            (vec![0x0b], "wire type 3"),
        ] {
            let e = SentencePiece::parse(&bytes).expect_err("refused");
            assert!(e.contains(says), "{e}");
        }
        let mut twice = good.clone();
        field(1, &piece("ab", -9.0, 1), &mut twice);
        assert!(SentencePiece::parse(&twice)
            .expect_err("dup")
            .contains("twice"));
        let mut bad_type = good.clone();
        field(1, &piece("zz", -9.0, 9), &mut bad_type);
        assert!(SentencePiece::parse(&bad_type)
            .expect_err("type")
            .contains("type 9"));
        let mut bad_bos = good;
        let mut trainer = Vec::new();
        varint(41 << 3, &mut trainer);
        varint(3, &mut trainer);
        field(2, &trainer, &mut bad_bos);
        assert!(SentencePiece::parse(&bad_bos)
            .expect_err("bos")
            .contains("`bos_id` 3"));
    }
}
