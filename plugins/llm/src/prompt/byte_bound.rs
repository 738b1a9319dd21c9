//! How many tokens a prompt of B bytes has at least, without tokenizing it: each token stands
//! for at most L bytes of the prompt, so B bytes are at least ceil(B / L) tokens, and a prompt
//! longer than (context − 1) × L bytes cannot fit. L is measured once, from the vocabulary.
//!
//! A token stands for the bytes its vocabulary string spells: for byte-level BPE (GPT-2,
//! SmolLM2, Llama 3) each character of the string is one byte of the text (`Ġ` is a space, so
//! `Ġthe` is 4 bytes, not 5); for others (SentencePiece's `▁`, byte fallback's `<0x41>`) the
//! string is at least as long as the text it stands for, so its UTF-8 length is a safe bound.
//! Added tokens stand for their content. A normalizer that may shrink the text multiplies the
//! bound, and a tokenizer that can fold an unbounded run of text into one token (a normalizer
//! that deletes characters, unknown characters fused into one token, an added token that takes
//! in the whitespace beside it, word-level models) has no bound at all: there, only the token
//! count decides.

use cresset_torch::tokenizers::models::ModelWrapper;
use cresset_torch::tokenizers::normalizers::NormalizerWrapper;
use cresset_torch::tokenizers::pre_tokenizers::byte_level::ByteLevel;
use cresset_torch::tokenizers::pre_tokenizers::PreTokenizerWrapper;
use cresset_torch::tokenizers::Tokenizer;

/// The most bytes of prompt text one token of `tokenizer` stands for, or why there is no such
/// bound.
pub fn bytes_per_token(tokenizer: &Tokenizer) -> Result<usize, String> {
    let shrink = match tokenizer.get_normalizer() {
        Some(normalizer) => shrink_factor(normalizer)?,
        None => 1,
    };
    // An unknown character is one token of at most 4 bytes, unless runs of them are fused.
    let unknown = match tokenizer.get_model() {
        ModelWrapper::BPE(bpe) if bpe.unk_token.is_some() && bpe.fuse_unk && !bpe.byte_fallback => {
            return Err("its BPE model fuses runs of unknown characters into one token".into())
        }
        ModelWrapper::BPE(bpe) if bpe.unk_token.is_some() && !bpe.byte_fallback => 4,
        ModelWrapper::BPE(_) => 0,
        ModelWrapper::Unigram(_) => {
            return Err("its Unigram model fuses runs of unknown characters into one token".into())
        }
        ModelWrapper::WordPiece(_) | ModelWrapper::WordLevel(_) => {
            return Err("its word-level model makes one token of a whole unknown word".into())
        }
    };
    let added = tokenizer.get_added_tokens_decoder();
    if let Some(token) = added.values().find(|t| t.lstrip || t.rstrip) {
        return Err(format!(
            "its added token {:?} takes in the whitespace beside it",
            token.content
        ));
    }
    let byte_level = tokenizer.get_pre_tokenizer().is_some_and(is_byte_level);
    let alphabet = ByteLevel::alphabet();
    let spelled = |token: &str| {
        if byte_level && token.chars().all(|c| alphabet.contains(&c)) {
            token.chars().count()
        } else {
            token.len()
        }
    };
    let longest = tokenizer
        .get_vocab(false)
        .keys()
        .map(|token| spelled(token))
        .chain(added.values().map(|t| t.content.len()))
        .chain([unknown, 1])
        .max()
        .unwrap_or(1);
    Ok(longest * shrink)
}

/// Whether the pre-tokenizer maps bytes to characters (GPT-2's byte-level alphabet).
fn is_byte_level(pre: &PreTokenizerWrapper) -> bool {
    match pre {
        PreTokenizerWrapper::ByteLevel(_) => true,
        PreTokenizerWrapper::Sequence(steps) => steps.as_ref().iter().any(is_byte_level),
        _ => false,
    }
}

/// How many bytes of input can become one byte of normalized text.
fn shrink_factor(normalizer: &NormalizerWrapper) -> Result<usize, String> {
    use NormalizerWrapper as N;
    match normalizer {
        N::Prepend(_) | N::ByteLevel(_) => Ok(1),
        N::Replace(replace) => {
            // A literal pattern replaced by content at least as long never shrinks the text
            // (Llama 2's space → `▁`); a regular expression may match any run.
            let value = serde_json::to_value(replace).unwrap_or_default();
            match value["pattern"]["String"].as_str() {
                Some(pattern) if replace.content.len() >= pattern.len() => Ok(1),
                _ => Err(format!(
                    "its normalizer may replace text with less ({value})"
                )),
            }
        }
        // Normal forms and lower-casing never delete a character; the most they shrink is a
        // 4-byte character becoming a 1-byte one (NFKC: U+1D400 `𝐀` → `A`).
        N::NFC(_) | N::NFD(_) | N::NFKC(_) | N::NFKD(_) | N::Lowercase(_) => Ok(4),
        N::Sequence(steps) => steps
            .as_ref()
            .iter()
            .try_fold(1, |factor, step| Ok(factor * shrink_factor(step)?)),
        N::StripNormalizer(_)
        | N::StripAccents(_)
        | N::BertNormalizer(_)
        | N::Nmt(_)
        | N::Precompiled(_) => Err("its normalizer deletes characters".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cresset_torch::tokenizers::models::bpe::{Vocab, BPE};
    use cresset_torch::tokenizers::normalizers::{Prepend, Replace, Strip, NFKC};
    use cresset_torch::tokenizers::pre_tokenizers::metaspace::Metaspace;
    use cresset_torch::tokenizers::AddedToken;
    use std::path::Path;

    /// A BPE tokenizer with this vocabulary and no merges.
    fn bpe(tokens: &[&str]) -> Tokenizer {
        let vocab: Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_owned(), i as u32))
            .collect();
        let model = BPE::builder()
            .vocab_and_merges(vocab, Vec::new())
            .build()
            .expect("BPE");
        Tokenizer::new(model)
    }

    fn fixture(name: &str) -> Tokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/generated")
            .join(name);
        cresset_torch::load_tokenizer(&dir).expect("run `make models`")
    }

    #[test]
    fn byte_level_tokens_stand_for_one_byte_per_character() {
        // `Ġ` is 2 bytes of UTF-8 but one byte (a space) of the text: `Ġthe` stands for 4
        // bytes, and so does `ÃĤÃĤ` (8 bytes of UTF-8; the text "ÂÂ" in 4).
        let mut tokenizer = bpe(&["Ġthe", "ÃĤÃĤ", "a"]);
        tokenizer.with_pre_tokenizer(Some(ByteLevel::default()));
        assert_eq!(bytes_per_token(&tokenizer), Ok(4));
        // Added tokens stand for their content, as written.
        tokenizer
            .add_special_tokens([AddedToken::from("<|im_start|>", true)])
            .expect("tokenizer");
        assert_eq!(bytes_per_token(&tokenizer), Ok(12));
    }

    #[test]
    fn other_tokens_stand_for_at_most_their_utf8_length() {
        // SentencePiece: `▁the` (6 bytes) stands for " the" (4).
        let mut tokenizer = bpe(&["▁the", "a"]);
        tokenizer.with_pre_tokenizer(Some(Metaspace::default()));
        assert_eq!(bytes_per_token(&tokenizer), Ok(6));
        // Llama 2's normalizer only makes the text longer.
        tokenizer
            .with_normalizer(Some(cresset_torch::tokenizers::normalizers::Sequence::new(
                vec![
                    Prepend::new("▁".into()).into(),
                    Replace::new(" ", "▁").expect("replace").into(),
                ],
            )))
            .expect("tokenizer");
        assert_eq!(bytes_per_token(&tokenizer), Ok(6));
        // A normal form may turn 4 bytes into 1.
        tokenizer.with_normalizer(Some(NFKC)).expect("tokenizer");
        assert_eq!(bytes_per_token(&tokenizer), Ok(24));
    }

    #[test]
    fn tokenizers_that_fold_unbounded_text_into_one_token_have_no_bound() {
        let mut strip = bpe(&["a"]);
        strip
            .with_normalizer(Some(Strip::new(true, true)))
            .expect("tokenizer");
        assert!(bytes_per_token(&strip).is_err_and(|why| why.contains("deletes")));
        let mut shorter = bpe(&["a"]);
        shorter
            .with_normalizer(Some(Replace::new("  ", " ").expect("replace")))
            .expect("tokenizer");
        assert!(bytes_per_token(&shorter).is_err());
        let fused = BPE::builder()
            .vocab_and_merges(
                [("<unk>".to_owned(), 0), ("a".to_owned(), 1)]
                    .into_iter()
                    .collect::<Vocab>(),
                Vec::new(),
            )
            .unk_token("<unk>".into())
            .fuse_unk(true)
            .build()
            .expect("BPE");
        assert!(bytes_per_token(&Tokenizer::new(fused)).is_err_and(|why| why.contains("unknown")));
        let mut stripping = bpe(&["a"]);
        stripping
            .add_special_tokens([AddedToken::from("<mask>", true).lstrip(true)])
            .expect("tokenizer");
        assert!(bytes_per_token(&stripping).is_err_and(|why| why.contains("<mask>")));
    }

    #[test]
    fn the_fixture_tokenizers_are_bounded_by_their_longest_special_token() {
        // Byte-level BPEs of 512 and 800 tokens: `<|endoftext|>` is the longest.
        for name in ["llm/llama-gqa-tied", "llm/bloom-tiny", "nlp/gpt2"] {
            assert_eq!(bytes_per_token(&fixture(name)), Ok(13), "{name}");
        }
    }

    #[test]
    fn smollm2_s_longest_token_is_81_bytes_half_its_utf8_length() {
        // A newline and 80 spaces, `ĊĠĠ…` (162 bytes of UTF-8).
        let cache = std::env::var("CRESSET_CACHE").expect("CRESSET_CACHE is set by scripts/env.sh");
        let path = Path::new(&cache).join("assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        let gguf = cresset_torch::gguf::Gguf::open(&path).expect("run `make models`");
        let tokenizer = gguf.tokenizer().expect("tokenizer");
        assert_eq!(bytes_per_token(&tokenizer), Ok(81));
    }
}
