#!/usr/bin/env python3
"""Side-by-side training throughput: `starling-bench train` against `bench_torch_peft.py`.

A shared machine's speed drifts over minutes, so single runs of the two cannot be compared. This
runs N pairs back to back, alternating which side goes first, and prints one JSON line per pair
and one summary line (median ratio, ratio of total tokens over total time, ranges).

Usage: python3 scripts/bench_vs_torch.py --config S --pairs 16 --steps 10
Builds starling-bench (release) first; needs a Python with torch, transformers and peft
(`--python` picks it).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "target", "release", "starling-bench")


def last_json(cmd: list) -> dict:
    try:
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    except OSError as e:
        sys.exit(f"cannot run {cmd[0]}: {e}")
    if run.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stderr[-2000:]}")
    lines = [line for line in run.stdout.splitlines() if line.startswith("{")]
    if not lines:
        sys.exit(f"no JSON line from {' '.join(cmd)}")
    return json.loads(lines[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="S", choices=["S", "M"])
    ap.add_argument("--quant", default="q8_0", choices=["f32", "q8_0", "q4_0"])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--python", default=sys.executable, help="interpreter with torch + peft")
    ap.add_argument("--engine", default="native", choices=["native", "native-bf16"])
    ap.add_argument("--torch-autocast", choices=["bf16"], default=None,
                    help="run PyTorch's forward under autocast (mixed precision)")
    args = ap.parse_args()
    if args.pairs < 1 or args.steps < 1:
        sys.exit("--pairs and --steps must be at least 1")
    # Always (a no-op when up to date): timing a stale binary would compare the wrong code.
    if subprocess.run(["cargo", "build", "--release", "--locked", "-p", "starling-simulations",
                       "--bin", "starling-bench"], cwd=ROOT).returncode != 0:
        sys.exit("building starling-bench failed")
    native_cmd = [BENCH, "train", "--config", args.config, "--quant", args.quant,
                  "--steps", str(args.steps), "--engine", args.engine]
    torch_cmd = [args.python, os.path.join(ROOT, "scripts", "bench_torch_peft.py"),
                 "--config", args.config, "--steps", str(args.steps)]
    if args.torch_autocast:
        torch_cmd += ["--autocast", args.torch_autocast]
    ratios, nat_tok, nat_s, tor_tok, tor_s = [], [], 0.0, [], 0.0
    for i in range(args.pairs):
        if i % 2 == 0:
            n, t = last_json(native_cmd), last_json(torch_cmd)
        else:
            t, n = last_json(torch_cmd), last_json(native_cmd)
        ratio = n["tokens_per_s"] / t["tokens_per_s"]
        ratios.append(ratio)
        nat_tok.append(n["tokens_per_s"])
        tor_tok.append(t["tokens_per_s"])
        nat_s += n["seconds"]
        tor_s += t["seconds"]
        print(json.dumps({"pair": i + 1, "config": args.config, "native_tokens_per_s": n["tokens_per_s"],
                          "torch_tokens_per_s": t["tokens_per_s"], "ratio": ratio}), flush=True)
    print(json.dumps({
        "bench": "train-vs-torch", "config": args.config, "quant": args.quant,
        "native_products": n.get("products", "f32"), "torch_products": t.get("products", "f32"),
        "pairs": args.pairs, "steps": args.steps,
        "native_median_tokens_per_s": statistics.median(nat_tok),
        "torch_median_tokens_per_s": statistics.median(tor_tok),
        "ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        # equal token counts per run, so total time is the fair aggregate
        "ratio_total": tor_s / nat_s,
    }))


if __name__ == "__main__":
    main()
