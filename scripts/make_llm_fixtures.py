"""Build tiny randomly initialised Llama checkpoints, write GGUF files from one of them the way
llama.cpp's converter does, and record what transformers gives for fixed prompts (and for the
real SmolLM2-135M-Instruct GGUF), so that Cresset's Rust Llama, GGUF reader, dequantization and
GGUF tokenizer can be checked against them (float32).

Usage: python scripts/make_llm_fixtures.py REPO_ROOT SMOLLM_GGUF
Writes (git-ignored, recreated from scratch) REPO_ROOT/tests/fixtures/generated/llm/:
  llama-gqa-tied     LlamaForCausalLM: hidden 64, 2 layers, 4 heads, 2 KV heads, tied embeddings,
                     rope_theta 1e4
  llama-gqa-untied   LlamaForCausalLM: hidden 64, 3 layers, 8 heads, 2 KV heads, untied lm_head,
                     rope_theta 5e5 with llama3 rope scaling
                     (each: config.json, model.safetensors, generation_config.json,
                     tokenizer.json, tokenizer_config.json)
  llama-gqa-tied.Q8_0.gguf, llama-gqa-tied.Q4_1.gguf
                     llama-gqa-tied as GGUF (arch "llama", q/k rows permuted like llama.cpp's
                     LlamaModel.permute, norms F32, every 2-D weight quantized)
  expected.json      inputs and reference outputs; written last, atomically
Both checkpoints share a byte-level BPE tokenizer (vocab 512) trained here on a small corpus, with
<|endoftext|>=0, <|im_start|>=1, <|im_end|>=2; its post-processor adds no tokens.

expected.json:
  "llama-gqa-tied", "llama-gqa-untied": {dir, seed, prompt, prompt_ids, logits [seq][vocab],
      greedy_ids (32 new), batch: {prompt, prompt_ids, greedy_ids (32 new)}}
  "gguf": [{file, type, source, dequantized: {"blk.0.attn_q.weight": [out][in], in HF row order},
      max_abs_error: {HF tensor name: max |dequantized GGUF - HF float|},
      logits: what transformers gives for the prompt when it loads this GGUF file}]
  "smollm2": {file, chat_prompt, prompt_ids, eos_id, greedy_ids (up to 24 new, stops after
      <|im_end|>), greedy_text, logits_last, tokenize_checks: [{text, ids}]}

Weights are drawn with std 0.2 (not 0.02) so that outputs really depend on the input; generation
never stops early (generation_config has no eos, and seeds are drawn until no greedy output is a
special token) and each greedy step's top two logits differ by more than 1e-3.
config.json holds transformers 5's `rope_parameters` (rope_theta, rope_type, llama3 factors).
transformers needs `accelerate` (and `gguf`) installed to load a GGUF file.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF loading draws raw tqdm bars

import json
import pathlib
import shutil
import sys

import gguf
import numpy as np
import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from tokenizers import Tokenizer
from fixture_common import CORPUS, train_byte_level_bpe
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, BloomConfig, BloomForCausalLM, LlamaConfig,
    PreTrainedTokenizerFast,
)


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512
INIT_STD = 0.2  # 10x the usual 0.02, so attention really mixes tokens and outputs differ by input
NEW_TOKENS = 32
PROMPT = "<|im_start|>user\nWhere does the river flow?<|im_end|>\n<|im_start|>assistant\n"
BATCH_PROMPT = "The weather in London is"
MAX_SEEDS = 50

LLAMAS = {
    "llama-gqa-tied": dict(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=True,
    ),
    "llama-gqa-untied": dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
        intermediate_size=96, max_position_embeddings=512, rms_norm_eps=1e-5,
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
        },
    ),
}

GGUF_TYPES = {
    "Q8_0": (GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q4_1": (GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
}
GGUF_SOURCE = "llama-gqa-tied"
DEQUANTIZED_TENSOR = "blk.0.attn_q.weight"

SMOLLM_QUESTION = "What is the capital of France?"
SMOLLM_NEW_TOKENS = 24
TOKENIZE_CHECKS = [
    "Hello world! How are you today?",
    "Order 12345 shipped on 2024-06-01, costing $99.95 (incl. tax).",
    "Café naïve résumé — déjà vu in Zürich, São Paulo & Kraków.",
    "multiple    spaces   here,\tand a tab",
    "first line\nsecond line\n\n  indented third",
    "<|im_start|>user\nHi there!<|im_end|>",
]


def llama_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=train_byte_level_bpe(SPECIALS, VOCAB_SIZE),
        bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>",
        pad_token="<|endoftext|>", model_max_length=256,
    )
    assert tok.convert_tokens_to_ids(SPECIALS) == list(range(len(SPECIALS)))
    assert len(tok) == VOCAB_SIZE, len(tok)
    return tok


def check_tokenizer(model_dir: pathlib.Path, tok, texts: list[str]) -> None:
    """The raw tokenizer.json must give the ids transformers gives."""
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    for text in texts:
        assert raw.encode(text).ids == tok(text)["input_ids"], (model_dir.name, text)


def greedy(model, ids: list[int]) -> tuple[list[int], float]:
    """NEW_TOKENS greedy ids after `ids`, and the smallest top-1/top-2 logit gap on the way
    (0 if a special token was generated, so that no eos policy can stop generation early)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False, max_new_tokens=NEW_TOKENS, output_logits=True,
            return_dict_in_generate=True,
        )
    new_ids = out.sequences[0, len(ids):].tolist()
    assert len(new_ids) == NEW_TOKENS
    top2 = torch.cat(out.logits).topk(2, -1).values
    if set(new_ids) & set(range(len(SPECIALS))):
        return new_ids, 0.0
    return new_ids, (top2[:, 0] - top2[:, 1]).min().item()


def check_left_padded_batch(model, prompts: list[list[int]], expected: list[list[int]]) -> None:
    """Both prompts in one left-padded batch must generate what each does alone."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS)
    assert out[:, width:].tolist() == expected, "left-padded batch differs from single prompts"


def check_llama3_scaling(model, config: LlamaConfig) -> None:
    """The llama3 rope scaling must really change some (not all) frequencies."""
    inv_freq = model.model.rotary_emb.inv_freq
    head_dim = config.hidden_size // config.num_attention_heads
    exponents = torch.arange(0, head_dim, 2).float() / head_dim
    plain = 1.0 / config.rope_parameters["rope_theta"] ** exponents
    changed = ~torch.isclose(inv_freq, plain)
    assert changed.any() and not changed.all(), (inv_freq, plain)


def make_llama(out: pathlib.Path, name: str, tok, first_seed: int):
    model_dir = out / name
    tok.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    check_tokenizer(model_dir, tok, [PROMPT, BATCH_PROMPT] + CORPUS[:5])
    prompt_ids = tok(PROMPT)["input_ids"]
    batch_ids = tok(BATCH_PROMPT)["input_ids"]
    assert len(batch_ids) < len(prompt_ids)
    assert prompt_ids[0] == 1 and 2 in prompt_ids, prompt_ids  # specials kept whole

    for seed in range(first_seed, first_seed + MAX_SEEDS):
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=len(tok), initializer_range=INIT_STD, bos_token_id=1, eos_token_id=2,
            pad_token_id=0, dtype="float32", **LLAMAS[name],
        )
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        model.generation_config.eos_token_id = None  # never stop early
        model.generation_config.pad_token_id = 0
        model.generation_config.bos_token_id = 1
        greedy_ids, gap = greedy(model, prompt_ids)
        batch_greedy_ids, batch_gap = greedy(model, batch_ids)
        if min(gap, batch_gap) > 1e-3:
            break
    else:
        raise AssertionError(f"{name}: no seed without a near tie or special in greedy decoding")
    if "rope_scaling" in LLAMAS[name]:
        check_llama3_scaling(model, config)
    check_left_padded_batch(model, [prompt_ids, batch_ids], [greedy_ids, batch_greedy_ids])
    model.save_pretrained(model_dir)

    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0]
    entry = {
        "dir": name,
        "seed": seed,
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "logits": logits.tolist(),
        "greedy_ids": greedy_ids,
        "batch": {"prompt": BATCH_PROMPT, "prompt_ids": batch_ids, "greedy_ids": batch_greedy_ids},
    }
    return entry, model


def make_bloom(out: pathlib.Path, tok, first_seed: int) -> dict:
    """A tiny random BloomForCausalLM (ALiBi positions, fused per-head QKV, tied head), the
    accelerate handler's reference architecture."""
    name = "bloom-tiny"
    model_dir = out / name
    tok.save_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt_ids = tok(PROMPT)["input_ids"]
    for seed in range(first_seed, first_seed + MAX_SEEDS):
        torch.manual_seed(seed)
        config = BloomConfig(
            vocab_size=len(tok), hidden_size=64, n_layer=2, n_head=4, initializer_range=INIT_STD,
            layer_norm_epsilon=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
        model = BloomForCausalLM(config).eval()
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        greedy_ids, gap = greedy(model, prompt_ids)
        if gap > 1e-3:
            break
    else:
        raise AssertionError("bloom: no seed without a near tie in greedy decoding")
    model.save_pretrained(model_dir)
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0]
    return {"dir": name, "seed": seed, "prompt": PROMPT, "prompt_ids": prompt_ids,
            "logits": logits.tolist(), "greedy_ids": greedy_ids}


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (n_head already the KV head count for k): each head's
    rotary halves interleaved, as GGML's rope expects."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def unpermute(weights: np.ndarray, n_head: int) -> np.ndarray:
    return (weights.reshape(n_head, weights.shape[0] // n_head // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def gguf_tensor_names(config: LlamaConfig) -> dict[str, str]:
    """GGUF tensor name -> HF name, in the order they are written."""
    names = {"token_embd.weight": "model.embed_tokens.weight"}
    for i in range(config.num_hidden_layers):
        hf = f"model.layers.{i}."
        names |= {
            f"blk.{i}.attn_norm.weight": hf + "input_layernorm.weight",
            f"blk.{i}.attn_q.weight": hf + "self_attn.q_proj.weight",
            f"blk.{i}.attn_k.weight": hf + "self_attn.k_proj.weight",
            f"blk.{i}.attn_v.weight": hf + "self_attn.v_proj.weight",
            f"blk.{i}.attn_output.weight": hf + "self_attn.o_proj.weight",
            f"blk.{i}.ffn_norm.weight": hf + "post_attention_layernorm.weight",
            f"blk.{i}.ffn_gate.weight": hf + "mlp.gate_proj.weight",
            f"blk.{i}.ffn_up.weight": hf + "mlp.up_proj.weight",
            f"blk.{i}.ffn_down.weight": hf + "mlp.down_proj.weight",
        }
    names["output_norm.weight"] = "model.norm.weight"
    if not config.tie_word_embeddings:
        names["output.weight"] = "lm_head.weight"
    return names


def head_count_for(gguf_name: str, config: LlamaConfig) -> int | None:
    if ".attn_q." in gguf_name:
        return config.num_attention_heads
    if ".attn_k." in gguf_name:
        return config.num_key_value_heads
    return None


def add_gguf_tokenizer(writer: GGUFWriter, model_dir: pathlib.Path) -> None:
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([
        gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens
    ])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(SPECIALS.index("<|im_start|>"))
    writer.add_eos_token_id(SPECIALS.index("<|im_end|>"))
    writer.add_add_bos_token(False)


def write_gguf(path: pathlib.Path, model, model_dir: pathlib.Path, type_name: str) -> None:
    config = model.config
    qtype, ftype = GGUF_TYPES[type_name]
    head_dim = config.hidden_size // config.num_attention_heads
    writer = GGUFWriter(path, "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(ftype)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_gguf_tokenizer(writer, model_dir)

    state = model.state_dict()
    for gguf_name, hf_name in gguf_tensor_names(config).items():
        data = state[hf_name].numpy().astype(np.float32)
        n_head = head_count_for(gguf_name, config)
        if n_head is not None:
            data = permute(data, n_head)
            assert np.array_equal(unpermute(data, n_head), state[hf_name].numpy())
        if data.ndim == 1:
            writer.add_tensor(gguf_name, data)
        else:
            writer.add_tensor(gguf_name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf_weights(path: pathlib.Path, config: LlamaConfig) -> dict[str, np.ndarray]:
    """HF name -> the file's tensor, dequantized by the gguf package and un-permuted."""
    names = gguf_tensor_names(config)
    reader = GGUFReader(path)
    assert [t.name for t in reader.tensors] == list(names)
    weights = {}
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        n_head = head_count_for(t.name, config)
        if n_head is not None:
            values = unpermute(values, n_head)
        weights[names[t.name]] = values
    return weights


def gguf_logits(out: pathlib.Path, file: str, prompt: str, prompt_ids: list[int]) -> list:
    """transformers' own reading of the file: its tokenizer and the dequantized model."""
    tok = AutoTokenizer.from_pretrained(out, gguf_file=file)
    assert tok(prompt, add_special_tokens=False)["input_ids"] == prompt_ids, file
    model = AutoModelForCausalLM.from_pretrained(
        out, gguf_file=file, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt_ids])).logits[0].tolist()


def make_ggufs(out: pathlib.Path, model, prompt_ids: list[int]) -> list:
    model_dir = out / GGUF_SOURCE
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    hf_q = gguf_tensor_names(model.config)[DEQUANTIZED_TENSOR]
    entries = []
    for type_name in GGUF_TYPES:
        file = f"{GGUF_SOURCE}.{type_name}.gguf"
        write_gguf(out / file, model, model_dir, type_name)
        weights = read_gguf_weights(out / file, model.config)
        errors = {name: float(np.abs(w - state[name]).max()) for name, w in weights.items()}
        assert 0 < errors[hf_q] < 0.2, errors
        entries.append({
            "file": file,
            "type": type_name,
            "source": GGUF_SOURCE,
            "dequantized": {DEQUANTIZED_TENSOR: weights[hf_q].tolist()},
            "max_abs_error": errors,
            "logits": gguf_logits(out, file, PROMPT, prompt_ids),
        })
    return entries


def make_smollm2(gguf_path: pathlib.Path) -> dict:
    directory, file = gguf_path.parent, gguf_path.name
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=file, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    chat_prompt = tok.apply_chat_template(
        [{"role": "user", "content": SMOLLM_QUESTION}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tok(chat_prompt, add_special_tokens=False)["input_ids"]
    eos_id = tok.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        logits_last = model(ids).logits[0, -1]
        generated = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False,
            max_new_tokens=SMOLLM_NEW_TOKENS, eos_token_id=eos_id, pad_token_id=eos_id,
        )
    greedy_ids = generated[0, len(prompt_ids):].tolist()
    assert eos_id not in greedy_ids[:-1], greedy_ids
    return {
        "file": file,
        "chat_prompt": chat_prompt,
        "prompt_ids": prompt_ids,
        "eos_id": eos_id,
        "greedy_ids": greedy_ids,
        "greedy_text": tok.decode(greedy_ids, skip_special_tokens=True),
        "logits_last": logits_last.tolist(),
        "tokenize_checks": [
            {"text": text, "ids": tok(text, add_special_tokens=False)["input_ids"]}
            for text in TOKENIZE_CHECKS
        ],
    }


def main(root: pathlib.Path, smollm_gguf: pathlib.Path) -> None:
    out = root / "tests" / "fixtures" / "generated" / "llm"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    tok = llama_tokenizer()
    expected = {}
    models_by_name = {}
    for i, name in enumerate(LLAMAS):
        expected[name], models_by_name[name] = make_llama(out, name, tok, 1000 * i)
    expected["gguf"] = make_ggufs(
        out, models_by_name[GGUF_SOURCE], expected[GGUF_SOURCE]["prompt_ids"]
    )
    expected["bloom-tiny"] = make_bloom(out, tok, 5000)
    expected["smollm2"] = make_smollm2(smollm_gguf)
    tmp = out / "expected.json.tmp"
    tmp.write_text(json.dumps(expected))
    os.replace(tmp, out / "expected.json")
    print(f"make_llm_fixtures: wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main(pathlib.Path(sys.argv[1]).resolve(), pathlib.Path(sys.argv[2]).resolve())
