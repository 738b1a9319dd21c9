//! SentencePiece `tokenizer.model` files read into `tokenizers` pipelines give the ids and text
//! the `sentencepiece` package gives on the same files (scripts/make_spm_fixtures.py): the real
//! Mistral-7B tokenizer (BPE, byte fallback, no normalization) and two models trained there
//! (BPE with nmt_nfkc, byte fallback and a user-defined symbol; Unigram with nmt_nfkc and
//! `<unk>`), over the fixture corpus and hostile text (spaces, tabs, CJK, emoji, full-width).

mod common;

use cresset_torch::sentencepiece::{ModelType, SentencePiece};

fn check(name: &str, model_type: ModelType) {
    let dir = common::fixtures("spm");
    let expected = &common::expected("spm")["tokenizers"][name];
    let model = SentencePiece::open(&dir.join(expected["file"].as_str().expect("file")))
        .expect("the model reads");
    assert_eq!(model.model_type, model_type, "{name}");
    assert_eq!(
        model.pieces.len() as u64,
        expected["vocab_size"].as_u64().expect("size")
    );
    for (ours, key) in [
        (model.bos_id, "bos_id"),
        (model.eos_id, "eos_id"),
        (model.unk_id, "unk_id"),
    ] {
        assert_eq!(
            ours.map(i64::from).unwrap_or(-1),
            expected[key].as_i64().expect("id"),
            "{key}"
        );
    }
    let tokenizer = model.tokenizer().expect("tokenizer");
    let cases = expected["cases"].as_array().expect("cases");
    let mut checked = 0;
    for case in cases {
        let text = case["text"].as_str().expect("text");
        let want: Vec<u32> = common::ids(&case["ids"])
            .iter()
            .map(|&i| i as u32)
            .collect();
        // A Unigram model reads a control symbol spelled in the text as that symbol (module
        // docs): sentencepiece does not.
        let spells_control = model.model_type == ModelType::Unigram
            && model.pieces.iter().any(|p| {
                p.kind == cresset_torch::sentencepiece::PieceType::Control
                    && text.contains(&p.piece)
            });
        if spells_control {
            continue;
        }
        let got = tokenizer.encode(text, false).expect("encode");
        assert_eq!(got.get_ids(), want.as_slice(), "{name}: ids of {text:?}");
        let decoded = tokenizer.decode(&want, true).expect("decode");
        assert_eq!(
            decoded,
            case["decoded"].as_str().expect("decoded"),
            "{name}: text of {want:?}"
        );
        checked += 1;
    }
    assert!(
        checked + 1 >= cases.len(),
        "{name}: {checked} of {} cases",
        cases.len()
    );
}

#[test]
fn the_real_mistral_tokenizer_model_gives_sentencepieces_ids() {
    check("mistral", ModelType::Bpe);
}

#[test]
fn a_bpe_model_with_normalization_and_a_user_defined_symbol_gives_sentencepieces_ids() {
    check("bpe", ModelType::Bpe);
}

#[test]
fn a_unigram_model_with_unknown_characters_gives_sentencepieces_ids() {
    check("unigram", ModelType::Unigram);
}

#[test]
fn a_file_that_is_not_a_sentencepiece_model_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("tokenizer.model");
    // A tokenizer.json where a tokenizer.model was named.
    std::fs::write(&path, br#"{"version": "1.0", "model": {}}"#).expect("write");
    let e = SentencePiece::open(&path).expect_err("refused").to_string();
    assert!(
        e.contains("tokenizer.model") && e.contains("not a valid SentencePiece"),
        "{e}"
    );
}

#[test]
fn a_gguf_files_sentencepiece_vocabulary_gives_the_same_ids() {
    // mistral.model's pieces, scores and types in a GGUF file, as llama.cpp's converter writes
    // them. Control symbols spelled in the text are read as those symbols there (llama.cpp
    // renders chat templates so); every other case must give sentencepiece's ids.
    let dir = common::fixtures("spm");
    let expected = &common::expected("spm")["tokenizers"]["mistral"];
    let gguf = cresset_torch::gguf::Gguf::open(&dir.join("mistral.gguf")).expect("gguf");
    let tokenizer = gguf.tokenizer().expect("tokenizer");
    let mut checked = 0;
    for case in expected["cases"].as_array().expect("cases") {
        let text = case["text"].as_str().expect("text");
        if text.contains("<s>") || text.contains("</s>") {
            assert_eq!(
                tokenizer.encode(text, false).expect("encode").get_ids()[2],
                1,
                "<s> is read whole in {text:?}"
            );
            continue;
        }
        let want: Vec<u32> = common::ids(&case["ids"])
            .iter()
            .map(|&i| i as u32)
            .collect();
        let got = tokenizer.encode(text, false).expect("encode");
        assert_eq!(got.get_ids(), want.as_slice(), "ids of {text:?}");
        assert_eq!(
            tokenizer.decode(&want, true).expect("decode"),
            case["decoded"].as_str().expect("decoded")
        );
        checked += 1;
    }
    assert!(checked > 50, "{checked}");
}
