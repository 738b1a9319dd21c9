"""The GPU LLM bench's checkpoint (issue 16): a random-weight Llama with Llama-3.2-1B's body
(hidden 2048, 16 layers, 32 heads, 8 key/value heads, FFN 8192), a 32,000-token vocabulary and an
untied head, in bf16 safetensors (1.10 B parameters, 2.21 GB), with a byte-level BPE tokenizer of
that size trained here on the Python standard library's source (no network on a GPU machine).

Usage: gpu_llm_checkpoint.py OUT_DIR. Does nothing when OUT_DIR/.complete exists.
"""

import json
import os
import pathlib
import sys
import sysconfig

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 32000


def corpus():
    """Text to train the tokenizer on: the standard library's Python sources (about 10 MB)."""
    total = 0
    for path in sorted(pathlib.Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text)
        yield text
        if total > 12_000_000:
            return


def main():
    out = pathlib.Path(sys.argv[1])
    if (out / ".complete").exists():
        return
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<|end|>", "<|begin|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus(), trainer)
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|end|>", "bos_token": "<|begin|>", "add_bos_token": False})
    )
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=0,
        torch_dtype="bfloat16",
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="8GB")
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"parameters": params, "dir": str(out)}), file=sys.stderr)
    (out / ".complete").touch()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
