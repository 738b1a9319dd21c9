//! Tokenizers from a GGUF file's vocabulary: byte-level BPE (`tokenizer.ggml.model = "gpt2"`)
//! with its merges and pre-tokenizer, or SentencePiece (`"llama"`) with its scores.

use super::{bad, Gguf, Value};
use crate::ModelError;

impl Gguf {
    /// Build the tokenizer a GGUF file describes (`tokenizer.ggml.*`): byte-level BPE
    /// (`tokenizer.ggml.model = "gpt2"`) with its vocabulary and merges, the pre-tokenizer its
    /// `tokenizer.ggml.pre` names, and control tokens as special tokens; or a SentencePiece
    /// vocabulary (`"llama"`: Llama 2, Mistral) with its scores, as [`crate::sentencepiece`]
    /// reads it from a `tokenizer.model`.
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer, ModelError> {
        use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
        use tokenizers::models::bpe::BPE;
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        use tokenizers::pre_tokenizers::digits::Digits;
        use tokenizers::pre_tokenizers::sequence::Sequence;
        use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
        use tokenizers::pre_tokenizers::PreTokenizerWrapper;
        use tokenizers::{AddedToken, SplitDelimiterBehavior};

        let model = self.str("tokenizer.ggml.model")?;
        if model == "llama" {
            return self.sentencepiece_tokenizer();
        }
        if model != "gpt2" {
            return Err(ModelError::Tokenizer(format!(
                "GGUF tokenizer model {model:?} is neither byte-level BPE (gpt2) nor SentencePiece (llama); put a tokenizer.json beside the file"
            )));
        }
        // The arrays are decoded here, one element at a time; the parse capped their total.
        let tokens: Vec<String> = self
            .strings("tokenizer.ggml.tokens")?
            .collect::<Result<_, _>>()?;
        let mut merges: Vec<(String, String)> = Vec::new();
        for merge in self.strings("tokenizer.ggml.merges")? {
            if let Some((a, b)) = merge?.split_once(' ') {
                merges.push((a.to_owned(), b.to_owned()));
            }
        }
        let types: Vec<u64> = match self.array("tokenizer.ggml.token_type") {
            Some(values) => values
                .map(|v| v.map(|v| v.as_u64().unwrap_or(1)))
                .collect::<Result<_, _>>()?,
            None => Vec::new(),
        };
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| ModelError::Tokenizer(format!("GGUF vocabulary: {e}")))?;
        let byte_level = ByteLevel::new(false, true, true);
        let pre: PreTokenizerWrapper = match self.get("tokenizer.ggml.pre").and_then(Value::as_str)
        {
            None | Some("gpt2") | Some("default") => byte_level.into(),
            Some("smollm") | Some("starcoder") | Some("refact") => {
                Sequence::new(vec![Digits::new(true).into(), byte_level.into()]).into()
            }
            Some("llama-bpe") | Some("llama3") => {
                let split = Split::new(
                    SplitPattern::Regex(LLAMA3_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, true, false).into(),
                ])
                .into()
            }
            Some(other) => {
                return Err(ModelError::Tokenizer(format!(
                "GGUF pre-tokenizer {other:?} is not known (gpt2, smollm, starcoder, llama-bpe); \
                     put a tokenizer.json beside the file"
            )))
            }
        };
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(pre));
        tokenizer.with_decoder(Some(ByteLevelDecoder::default()));
        // Control (3) and user-defined (4) tokens are matched whole before BPE.
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &t)| t == 3 || t == 4)
            .map(|(tok, &t)| AddedToken::from(tok.clone(), t == 3))
            .collect();
        tokenizer
            .add_special_tokens(added)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(tokenizer)
    }
}

impl Gguf {
    /// A SentencePiece (BPE) vocabulary as llama.cpp's converter writes it: pieces, scores and
    /// types (sentencepiece's numbering), the special ids, `add_space_prefix`. Control symbols
    /// are matched whole in text, as llama.cpp does when it renders chat templates.
    fn sentencepiece_tokenizer(&self) -> Result<tokenizers::Tokenizer, ModelError> {
        use crate::sentencepiece::{ModelType, Piece, PieceType, SentencePiece, MAX_PIECES};
        let tokens: Vec<String> = self
            .strings("tokenizer.ggml.tokens")?
            .take(MAX_PIECES + 1)
            .collect::<Result<_, _>>()?;
        if tokens.is_empty() || tokens.len() > MAX_PIECES {
            return Err(bad(
                &self.path,
                format!("`tokenizer.ggml.tokens` must hold 1 to {MAX_PIECES} pieces"),
            ));
        }
        let numbers = |key: &str| -> Result<Vec<Value>, ModelError> {
            match self.array(key) {
                Some(values) => values.take(tokens.len()).collect(),
                None => Ok(Vec::new()),
            }
        };
        let scores = numbers("tokenizer.ggml.scores")?;
        let types = numbers("tokenizer.ggml.token_type")?;
        let mut pieces = Vec::with_capacity(tokens.len());
        for (i, piece) in tokens.into_iter().enumerate() {
            let score = scores.get(i).and_then(Value::as_f64).unwrap_or(0.0) as f32;
            let kind = match types.get(i).and_then(Value::as_u64).unwrap_or(1) {
                2 => PieceType::Unknown,
                3 => PieceType::Control,
                4 => PieceType::UserDefined,
                5 => PieceType::Unused,
                6 => PieceType::Byte,
                _ => PieceType::Normal,
            };
            pieces.push(Piece { piece, score, kind });
        }
        let id = |key: &str| {
            self.get(key)
                .and_then(Value::as_u64)
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| (v as usize) < pieces.len())
        };
        let model = SentencePiece {
            byte_fallback: pieces.iter().any(|p| p.kind == PieceType::Byte),
            unk_id: id("tokenizer.ggml.unknown_token_id").or(Some(0)),
            bos_id: id("tokenizer.ggml.bos_token_id"),
            eos_id: id("tokenizer.ggml.eos_token_id"),
            model_type: ModelType::Bpe,
            precompiled_charsmap: Vec::new(),
            add_dummy_prefix: self.get("tokenizer.ggml.add_space_prefix")
                != Some(&Value::Bool(false)),
            remove_extra_whitespaces: false,
            escape_whitespaces: true,
            pieces,
        };
        let controls: Vec<tokenizers::AddedToken> = model
            .pieces
            .iter()
            .filter(|p| p.kind == PieceType::Control)
            .map(|p| tokenizers::AddedToken::from(p.piece.clone(), true))
            .collect();
        let mut tokenizer = model.tokenizer()?;
        tokenizer
            .add_special_tokens(controls)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(tokenizer)
    }
}

/// Llama 3's pre-tokenizer split (llama.cpp's `llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
