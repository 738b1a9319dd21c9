"""transformers `generate()` on the GPU bench's checkpoint, greedy, as issue 16 measures it:
eager at 1, 8 and 32 streams (a batch of that many prompts, the aggregate tokens/s), and with a
static cache and `torch.compile` at one stream; time to first token (a generate of one token).
Prompts of 10 tokens, `NEW` new tokens each (EOS ignored: min_new_tokens).

Usage: gpu_llm_transformers.py CHECKPOINT_DIR NEW_TOKENS. Prints JSON.
"""

import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def prompts(n, vocab):
    """`n` prompts of 10 token ids, different per stream, as the Cresset clients send."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(10, vocab, (n, 10), generator=g).cuda()


def timed(fn):
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main():
    path, new = sys.argv[1], int(sys.argv[2])
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    vocab = model.config.vocab_size
    result = {"transformers": __import__("transformers").__version__, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(0)}

    def generate(ids, tokens, **kw):
        mask = torch.ones_like(ids)
        return model.generate(ids, attention_mask=mask, max_new_tokens=tokens,
                              min_new_tokens=tokens, do_sample=False, pad_token_id=0, **kw)

    with torch.inference_mode():
        for n in (1, 8, 32):
            ids = prompts(n, vocab)
            generate(ids, 4)  # warm-up at this batch size
            _, first = timed(lambda: generate(ids, 1))
            _, took = timed(lambda: generate(ids, new))
            result[f"eager_{n}"] = {"tokens_per_s": n * new / took, "ttft_s": first}
        # gpt-fast's recipe in transformers: a static cache and a compiled forward.
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        ids = prompts(1, vocab)
        for _ in range(3):  # compile and capture
            generate(ids, new)
        _, first = timed(lambda: generate(ids, 1))
        _, took = timed(lambda: generate(ids, new))
        result["compiled_1"] = {"tokens_per_s": new / took, "ttft_s": first}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
