#!/usr/bin/env python3
"""Starling's native inference path beside llama.cpp on the very same weights, in interleaved pairs.

For each quantization, `starling-bench decode --gguf-out` writes the random M-shaped model (SmolLM2-135M's
shape) it benchmarks as GGUF; then, `--pairs` times, one Starling run and one llama.cpp run
(llama-cpp-python), each in its own process, alternate: the same prompt length, the same number of greedily
decoded tokens, the same thread count. Prints one JSON line per run and one summary line per quantization
with the median ratio (Starling / llama.cpp) of decode and prefill tokens/s.

Usage: pip install llama-cpp-python numpy
       cargo build --release -p starling-simulations --bin starling-bench
       python3 scripts/bench_llamacpp.py [--quants q8_0,q4_0,f32] [--pairs 5] [--threads 2]
"""
import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
BENCH = ROOT / "target/release/starling-bench"


def llama_worker(path: str, prompt: int, tokens: int, threads: int) -> None:
    """Runs in its own process: load, warm up, time a prefill and greedy decoding."""
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=max(256, prompt + tokens + 8), n_batch=512, n_threads=threads,
                n_threads_batch=threads, logits_all=False, verbose=False)
    vocab = llm.n_vocab()
    ids = [(i * 31) % vocab for i in range(prompt)]
    llm.eval(ids[:1])  # warm-up: weights paged in, threads started
    llm.reset()
    t = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - t
    nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(tokens):
        llm.eval([nxt])
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode = time.perf_counter() - t
    import resource
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"bench": "decode", "path": "llama.cpp", "threads": threads, "prompt_tokens": prompt,
                      "new_tokens": tokens, "prefill_tokens_per_s": prompt / prefill,
                      "decode_tokens_per_s": tokens / decode, "peak_rss_bytes": rss}))


def run_json(cmd) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quants", default="q8_0,q4_0")
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--config", default="M")
    ap.add_argument("--worker", nargs=1, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        llama_worker(a.worker[0], a.prompt, a.tokens, a.threads)
        return
    if not BENCH.exists():
        sys.exit(f"build it first: cargo build --release -p starling-simulations --bin starling-bench ({BENCH})")
    common = ["--config", a.config, "--prompt", str(a.prompt), "--threads", str(a.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        for quant in a.quants.split(","):
            gguf = pathlib.Path(tmp) / f"{a.config}-{quant}.gguf"
            run_json([str(BENCH), "decode", "--quant", quant, *common, "--tokens", "1", "--gguf-out", str(gguf)])
            ours, theirs = [], []
            for _ in range(a.pairs):
                o = run_json([str(BENCH), "decode", "--quant", quant, *common, "--tokens", str(a.tokens)])
                t = run_json([sys.executable, __file__, "--worker", str(gguf), "--prompt", str(a.prompt),
                              "--tokens", str(a.tokens), "--threads", str(a.threads)])
                t["quant"] = quant
                print(json.dumps(o), flush=True)
                print(json.dumps(t), flush=True)
                ours.append(o)
                theirs.append(t)
            med = lambda runs, k: statistics.median(r[k] for r in runs)
            print(json.dumps({
                "bench": "decode_vs_llamacpp", "config": a.config, "quant": quant, "threads": a.threads, "pairs": a.pairs,
                "starling_decode_tokens_per_s": med(ours, "decode_tokens_per_s"),
                "llamacpp_decode_tokens_per_s": med(theirs, "decode_tokens_per_s"),
                "decode_ratio": med(ours, "decode_tokens_per_s") / med(theirs, "decode_tokens_per_s"),
                "starling_prefill_tokens_per_s": med(ours, "prefill_tokens_per_s"),
                "llamacpp_prefill_tokens_per_s": med(theirs, "prefill_tokens_per_s"),
                "prefill_ratio": med(ours, "prefill_tokens_per_s") / med(theirs, "prefill_tokens_per_s"),
                "starling_peak_rss_bytes": med(ours, "peak_rss_bytes"),
                "llamacpp_peak_rss_bytes": med(theirs, "peak_rss_bytes"),
            }), flush=True)


if __name__ == "__main__":
    main()
