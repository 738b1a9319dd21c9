"""The baseline of `cresset-bench-offload`: HuggingFace transformers with Accelerate's
`device_map` on the same SmolLM2 checkpoint (f32 safetensors) and threads.

Usage:
  python bench/accelerate_baseline.py convert GGUF_PATH OUT_DIR
      Write the GGUF, dequantized to f32 by transformers, as a safetensors checkpoint with its
      tokenizer (the checkpoint both sides load).
  python bench/accelerate_baseline.py run CHECKPOINT PLACEMENT LOW_CPU_MEM_USAGE THREADS PROMPT NEW_TOKENS
      PLACEMENT is memory, half_disk or disk. Prints JSON: load seconds, the resident set before
      loading and its peak (MiB), time to first token and decode tokens/s (greedy).
"""

import json
import os
import resource
import sys
import tempfile
import time

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TQDM_DISABLE"] = "1"

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer


def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def convert(gguf, out):
    folder, name = os.path.split(gguf)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; its weights are plain f32 tensors, so
    # they are written directly (the tied head once, as the embeddings).
    from safetensors.torch import save_file

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    os.makedirs(out, exist_ok=True)
    config.save_pretrained(out)
    state = {
        k: v.contiguous()
        for k, v in model.state_dict().items()
        if not (config.tie_word_embeddings and k == "lm_head.weight")
    }
    save_file(state, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    tok.save_pretrained(out)


def device_map(config, placement):
    layers = config.num_hidden_layers
    first_on_disk = {"memory": layers, "half_disk": layers // 2, "disk": 0}[placement]
    m = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    for i in range(layers):
        m[f"model.layers.{i}"] = "disk" if i >= first_on_disk else "cpu"
    return m


def run(checkpoint, placement, low_cpu, threads, prompt, new_tokens):
    torch.set_num_threads(threads)
    before = rss_mib()
    config = AutoConfig.from_pretrained(checkpoint)
    offload = tempfile.mkdtemp(prefix="hf-offload-")
    started = time.perf_counter()
    kwargs = {"dtype": torch.float32, "low_cpu_mem_usage": low_cpu}
    if placement != "memory" or low_cpu:
        kwargs.update(device_map=device_map(config, placement), offload_folder=offload)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kwargs).eval()
    load_s = time.perf_counter() - started
    load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    tok = AutoTokenizer.from_pretrained(checkpoint)
    ids = tok(prompt, return_tensors="pt").input_ids

    def generate(n):
        return model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=tok.eos_token_id,
        )

    with torch.inference_mode():
        generate(2)  # warm-up
        t = time.perf_counter()
        generate(1)
        ttft = time.perf_counter() - t
        t = time.perf_counter()
        out = generate(new_tokens)
        total = time.perf_counter() - t
    produced = out.shape[1] - ids.shape[1]
    print(json.dumps({
        "load_s": load_s, "rss_before_mib": before, "load_peak_mib": load_peak,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "ttft_s": ttft, "decode_tps": (produced - 1) / max(total - ttft, 1e-9),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "accelerate": __import__("accelerate").__version__,
    }))


if __name__ == "__main__":
    if sys.argv[1] == "convert":
        convert(sys.argv[2], sys.argv[3])
    else:
        run(sys.argv[2], sys.argv[3], sys.argv[4] == "true", int(sys.argv[5]), sys.argv[6], int(sys.argv[7]))
