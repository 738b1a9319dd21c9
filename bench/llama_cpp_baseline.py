"""llama.cpp's numbers for `cresset-bench-llm`, through llama-cpp-python, on the same GGUF as it is
(quantized kernels, no dequantization): time to first token and decode tokens/s, greedy; each the
median of RUNS runs (3), as Cresset's rows are.

Usage: python bench/llama_cpp_baseline.py GGUF_PATH THREADS PROMPT NEW_TOKENS [RUNS]
"""

import json
import statistics
import sys
import time

import llama_cpp


def main():
    path, threads, prompt, new_tokens = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    runs = int(sys.argv[5]) if len(sys.argv) > 5 else 3
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
    measured = [run(new_tokens) for _ in range(runs)]
    print(json.dumps({
        "ttft_s": statistics.median(first for first, _, _ in measured),
        "decode_tps": statistics.median(
            (count - 1) / max(total - first, 1e-9) for first, total, count in measured
        ),
        "version": llama_cpp.__version__,
    }))


if __name__ == "__main__":
    main()
