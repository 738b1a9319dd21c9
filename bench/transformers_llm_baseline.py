"""The baseline of `cresset-bench-llm`: greedy generation with HuggingFace transformers
`generate()` on the same SmolLM2 GGUF (dequantized to f32 by transformers), the same threads.
Prints JSON: time to first token, decode tokens/s at batch 1, aggregate tokens/s for 8
sequences in one batch.

Usage: python bench/transformers_llm_baseline.py GGUF_PATH THREADS PROMPT NEW_TOKENS
"""

import json
import os
import sys
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main():
    path, threads, prompt, new_tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(threads)
    folder, name = os.path.split(path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    ids = tok(prompt, return_tensors="pt").input_ids

    def generate(batch, n):
        inputs = ids.repeat(batch, 1)
        return model.generate(
            inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=tok.eos_token_id,
        )

    with torch.inference_mode():
        generate(1, 4)  # warm-up
        _, ttft = timed(lambda: generate(1, 1))
        out, total = timed(lambda: generate(1, new_tokens))
        produced = out.shape[1] - ids.shape[1]
        decode = (produced - 1) / max(total - ttft, 1e-9)
        out8, total8 = timed(lambda: generate(8, new_tokens))
        produced8 = (out8.shape[1] - ids.shape[1]) * 8
    print(json.dumps({
        "ttft_s": ttft, "decode_tps": decode, "aggregate8_tps": produced8 / total8,
        "prompt_tokens": ids.shape[1], "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
