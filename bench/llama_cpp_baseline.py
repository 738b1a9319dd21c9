"""llama.cpp's numbers for `cresset-bench-llm`, through llama-cpp-python, on the same GGUF as it is
(quantized kernels, no dequantization): time to first token and decode tokens/s, greedy.

Usage: python bench/llama_cpp_baseline.py GGUF_PATH THREADS PROMPT NEW_TOKENS
"""

import json
import sys
import time

import llama_cpp


def main():
    path, threads, prompt, new_tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_ctx=512, verbose=False)
    tokens = llm.tokenize(prompt.encode(), add_bos=False)

    def run(n):
        llm.reset()
        start = time.perf_counter()
        first = None
        count = 0
        for _ in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
            count += 1
            if first is None:
                first = time.perf_counter() - start
            if count >= n:
                break
        return first, time.perf_counter() - start, count

    run(4)  # warm-up
    first, total, count = run(new_tokens)
    print(json.dumps({
        "ttft_s": first, "decode_tps": (count - 1) / max(total - first, 1e-9),
        "version": llama_cpp.__version__,
    }))


if __name__ == "__main__":
    main()
