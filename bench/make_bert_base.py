"""A BERT-base-shaped sequence classifier with random weights, for `cresset-bench-nlp`: 12 layers,
hidden 768, 12 heads, intermediate 3072, the bert-base-uncased vocabulary (30522; the tokenizer of
all-MiniLM-L6-v2, which uses it), two labels. Seeded, so every machine builds the same weights.

Usage: python bench/make_bert_base.py OUT_DIR TOKENIZER_DIR
Writes OUT_DIR/{config.json, model.safetensors, tokenizer.json, tokenizer_config.json} (once:
an OUT_DIR/.complete marker is written last).
"""

import pathlib
import shutil
import sys

import torch
from transformers import BertConfig, BertForSequenceClassification


def main():
    out, tokenizer_dir = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    if (out / ".complete").is_file():
        return
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = BertConfig(num_labels=2, id2label={0: "NEGATIVE", 1: "POSITIVE"},
                        label2id={"NEGATIVE": 0, "POSITIVE": 1})
    model = BertForSequenceClassification(config).eval()
    model.save_pretrained(out, safe_serialization=True)
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(tokenizer_dir / f, out / f)
    (out / ".complete").write_text("")


if __name__ == "__main__":
    main()
