"""SentencePiece `tokenizer.model` files and what the `sentencepiece` package gives for them, and
a GPT-fast-style target/draft pair of tiny Llama checkpoints that use one of them, with what
transformers generates greedily; so that Cresset's SentencePiece reader and the GPT-fast seed
configuration (`tokenizer_path`, `speculative`, `draft_model_path`) are checked on real files.

Usage: python scripts/make_spm_fixtures.py REPO_ROOT MISTRAL_TOKENIZER_MODEL
Writes (git-ignored, recreated from scratch) REPO_ROOT/tests/fixtures/generated/spm/:
  mistral.model   the real Mistral-7B v0.1 tokenizer (BPE, 32000 pieces, byte fallback), as the
                  `mistral-common` package ships it
  bpe.model       BPE trained here on the fixture corpus: byte fallback, a user-defined symbol
  unigram.model   Unigram trained here: nmt_nfkc normalization (a precompiled charsmap), no
                  byte fallback, so unknown characters are <unk>
  mistral.gguf    mistral.model's vocabulary as llama.cpp's converter writes it into a GGUF file
                  (tokenizer.ggml.model "llama": pieces, scores, types, special ids; no tensors)
  gpt-fast/target, gpt-fast/draft
                  LlamaForCausalLM checkpoints (config.json, model.safetensors,
                  generation_config.json; no tokenizer: bpe.model is the tokenizer) over
                  bpe.model's vocabulary. The draft is the target cut to its first layer; the
                  target's later layers are scaled down so that the draft agrees with it often
                  but not always.
  expected.json   written last:
    "tokenizers": {name: {file, model_type, vocab_size, bos_id, eos_id, unk_id,
                   cases: [{text, ids, decoded}]}}   ids without BOS/EOS, as sp.encode gives
    "gpt-fast": {prompt, prompt_ids (BOS first), greedy_ids (NEW_TOKENS, target alone; no
                 special or byte piece), greedy_text (sp.decode), draft_agreement (share of greedy steps where the
                 draft's top token is the target's)}
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import json
import pathlib
import random
import shutil
import sys

import sentencepiece as spm
from gguf import GGUFWriter
import torch
from fixture_common import CORPUS
from transformers import AutoModelForCausalLM, LlamaConfig

CASES = CORPUS + [
    "",
    " ",
    "   leading and trailing spaces   ",
    "multiple    spaces   here,\tand a tab",
    "first line\nsecond line\n\n  indented third",
    "Café naïve résumé — déjà vu in Zürich, São Paulo & Kraków.",
    "Ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ and ﬁ ligatures, ½ and ①",
    "日本語のテキストと한국어 텍스트",
    "emoji 🎉🦀 and a rare 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "Order 12345 shipped on 2024-06-01, costing $99.95 (incl. tax).",
    "a <s> and </s> and <unk> in plain text",
    "the [SEP] symbol is user-defined [SEP][SEP]",
    "[SEP] leads, then [SEP]",
    "tokenizer_path = \"path/to/tokenizer.model\"",
    "\u00a0non-breaking\u2009thin\u3000ideographic spaces",
]



def mixed_texts(count: int, words: int) -> list[str]:
    """Long texts of corpus words, punctuation, digits, runs of spaces and rarer characters in
    a fixed pseudo-random order: where ties in merge order would show."""
    rng = random.Random(1234)
    vocab = " ".join(CORPUS).split() + [
        "  ", "   ", "\n", "\t", "1234", "00", "é", "ß", "日本", "🦀", "ｆｕｌｌ", "—", "...", "::",
        "aaaa", "the the", "▁", "<0x41>", "[SEP]", "'s",
    ]
    return ["".join(rng.choice(vocab) + rng.choice(["", " ", " "]) for _ in range(words))
            for _ in range(count)]


CASES += mixed_texts(6, 400)
PROMPT = "The weather in London is"
NEW_TOKENS = 24
INIT_STD = 0.2
MAX_SEEDS = 50
LATER_LAYERS_SCALE = 0.1
TARGET = dict(
    hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
    rope_theta=10000.0, tie_word_embeddings=False,
)


def train(out: pathlib.Path, name: str, **options) -> pathlib.Path:
    corpus = out / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 4) + "\n")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(out / name), num_threads=1,
        minloglevel=2, **options,
    )
    corpus.unlink()
    (out / f"{name}.vocab").unlink()
    return out / f"{name}.model"


def describe(name: str, path: pathlib.Path) -> dict:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    cases = []
    for text in CASES:
        ids = sp.encode(text)
        cases.append({"text": text, "ids": ids, "decoded": sp.decode(ids)})
    return {
        "file": path.name, "vocab_size": sp.get_piece_size(), "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(), "unk_id": sp.unk_id(), "cases": cases,
    }


def write_vocab_gguf(path: pathlib.Path, model_file: pathlib.Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    n = sp.get_piece_size()

    def piece_type(i: int) -> int:  # sentencepiece's (and llama.cpp's) numbering
        for kind, test in ((2, sp.is_unknown), (3, sp.is_control), (5, sp.is_unused),
                           (6, sp.is_byte)):
            if test(i):
                return kind
        return 1

    writer = GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(n)])
    writer.add_token_scores([sp.get_score(i) for i in range(n)])
    writer.add_token_types([piece_type(i) for i in range(n)])
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
    writer.add_unk_token_id(sp.unk_id())
    writer.add_add_space_prefix(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def greedy(model, ids: list[int]) -> tuple[list[int], float]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=NEW_TOKENS, output_logits=True,
            return_dict_in_generate=True,
        )
    new_ids = out.sequences[0, len(ids):].tolist()
    top2 = torch.cat(out.logits).topk(2, -1).values
    return new_ids, (top2[:, 0] - top2[:, 1]).min().item()


def gpt_fast(out: pathlib.Path, tokenizer: pathlib.Path) -> dict:
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer))
    prompt_ids = [sp.bos_id()] + sp.encode(PROMPT)
    specials = {sp.bos_id(), sp.eos_id(), sp.unk_id()}
    bytes_ids = [i for i in range(sp.get_piece_size()) if sp.is_byte(i)]
    specials |= set(bytes_ids)
    for seed in range(MAX_SEEDS):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=sp.get_piece_size(), initializer_range=INIT_STD,
            bos_token_id=sp.bos_id(), eos_token_id=sp.eos_id(), dtype="float32", **TARGET,
        )
        target = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        # Layers after the first add little to the residual stream, so that the draft (the
        # first layer alone) often, but not always, predicts what the target does. Byte pieces
        # get no logit of their own, so that greedy text is whole characters.
        with torch.no_grad():
            target.lm_head.weight[bytes_ids] = 0.0
            for layer in target.model.layers[1:]:
                layer.self_attn.o_proj.weight.mul_(LATER_LAYERS_SCALE)
                layer.mlp.down_proj.weight.mul_(LATER_LAYERS_SCALE)
        target.generation_config.eos_token_id = None  # never stop early
        greedy_ids, gap = greedy(target, prompt_ids)
        if gap > 1e-3 and not specials & set(greedy_ids):
            break
    else:
        raise AssertionError("gpt-fast: no seed without a near tie or special in greedy decoding")
    target.save_pretrained(out / "target")

    # The draft: the target's embeddings, first layer, norm and head.
    draft_config = LlamaConfig(**{**config.to_dict(), "num_hidden_layers": 1})
    draft = AutoModelForCausalLM.from_config(draft_config, attn_implementation="eager").eval()
    missing = draft.load_state_dict(target.state_dict(), strict=False)
    assert not missing.missing_keys, missing.missing_keys
    draft.generation_config.eos_token_id = None
    draft.save_pretrained(out / "draft")

    # How often the draft's top token is the target's along the target's greedy path.
    with torch.no_grad():
        path = torch.tensor([prompt_ids + greedy_ids])
        start = len(prompt_ids) - 1
        want = target(path).logits[0, start:-1].argmax(-1)
        got = draft(path).logits[0, start:-1].argmax(-1)
    agreement = (want == got).float().mean().item()
    assert agreement > 0, "the draft never agrees with the target: speculation would not show"
    return {
        "prompt": PROMPT, "prompt_ids": prompt_ids, "greedy_ids": greedy_ids,
        "greedy_text": sp.decode(greedy_ids), "draft_agreement": agreement, "seed": seed,
    }


def main(root: pathlib.Path, mistral: pathlib.Path) -> None:
    out = root / "tests/fixtures/generated/spm"
    shutil.rmtree(out, ignore_errors=True)
    (out / "gpt-fast").mkdir(parents=True)
    shutil.copyfile(mistral, out / "mistral.model")
    write_vocab_gguf(out / "mistral.gguf", out / "mistral.model")
    bpe = train(
        out, "bpe", model_type="bpe", vocab_size=400, byte_fallback=True,
        user_defined_symbols=["[SEP]"], character_coverage=1.0,
    )
    unigram = train(
        out, "unigram", model_type="unigram", vocab_size=300,
        normalization_rule_name="nmt_nfkc", character_coverage=0.99,
    )
    expected = {
        "tokenizers": {
            "mistral": describe("mistral", out / "mistral.model"),
            "bpe": describe("bpe", bpe),
            "unigram": describe("unigram", unigram),
        },
        "gpt-fast": gpt_fast(out / "gpt-fast", bpe),
    }
    tmp = out / "expected.json.tmp"
    tmp.write_text(json.dumps(expected, ensure_ascii=False, indent=1))
    tmp.replace(out / "expected.json")
    print(f"make_spm_fixtures: draft agreement {expected['gpt-fast']['draft_agreement']:.2f}")


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]))
