"""The baseline of `cresset-bench-nlp`: sentence embeddings with HuggingFace transformers (eager
PyTorch, the default attention implementation), exactly as the nlp handler computes them:
tokenize (pad to the longest, truncate at max_length), forward, mean-pool over the mask,
L2-normalise. Prints JSON with sentences per second at batch 1 and batch 8.

Usage: python bench/transformers_baseline.py MODEL_DIR THREADS SECONDS SENTENCES_JSON
"""

import json
import sys
import time

import torch
import transformers
from transformers import AutoModel, AutoTokenizer


def embed(model, tok, texts):
    batch = tok(texts, padding="longest", truncation=True, max_length=256, return_tensors="pt")
    with torch.inference_mode():
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(mean, dim=-1)


def rate(model, tok, sentences, batch, seconds):
    """Sentences per second, embedding `batch` sentences per call, for about `seconds`."""
    groups = [sentences[i : i + batch] for i in range(0, len(sentences), batch)]
    for g in groups:
        embed(model, tok, g)  # warm-up
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for g in groups:
            embed(model, tok, g)
            done += len(g)
    return done / (time.perf_counter() - start)


def main():
    model_dir, threads, seconds, sentences = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), json.loads(sys.argv[4])
    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    print(json.dumps({
        "batch1": rate(model, tok, sentences, 1, seconds),
        "batch8": rate(model, tok, sentences, 8, seconds),
        "attention": model.config._attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
