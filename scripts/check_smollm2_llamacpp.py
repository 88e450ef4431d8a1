#!/usr/bin/env python3
"""llama.cpp on the real SmolLM2-135M-Instruct Q4_1 GGUF (llama-cpp-python 0.3.36): its logits on the chat
prompt of shared/model/fixtures/gguf/smollm2_transformers.json (same token ids, same 512 columns and the
top ten), the envelope between transformers and llama.cpp there, and its greedy continuations (32 tokens)
of a few chat prompts with the margin between its two best logits at every step, so that a comparison can
stop at the first near-tie. Written to shared/model/fixtures/gguf/smollm2_llamacpp.json, which
coordinator/tests/smollm2.rs compares Starling's quantized path against.

    /tmp/tv/bin/pip install llama-cpp-python==0.3.36 numpy
    /tmp/tv/bin/python scripts/check_smollm2_llamacpp.py ~/.cache/starling/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import os
import sys

import numpy as np
from llama_cpp import Llama

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
FIX = os.path.join(ROOT, "shared", "model", "fixtures", "gguf")
path = sys.argv[1]
ref = json.load(open(os.path.join(FIX, "smollm2_transformers.json")))
ids = ref["ids"]
columns = ref["columns"]

llm = Llama(model_path=path, n_ctx=512, logits_all=True, n_threads=2, verbose=False, seed=0)
llm.reset()
llm.eval(ids)
logits = np.array(llm.scores[: len(ids)], dtype=np.float64)

positions = []
diffs, agree = [], 0
for row, want in zip(logits, ref["positions"]):
    cols = columns + want["top_ids"]
    theirs = np.array(want["logits"] + want["top_logits"])
    diffs.extend(np.abs(row[cols] - theirs).tolist())
    agree += int(int(np.argmax(row)) == want["argmax"])
    top = np.argsort(-row)[:10]
    positions.append({
        "argmax": int(top[0]),
        "top_ids": [int(i) for i in top],
        "top_logits": [float(row[i]) for i in top],
        "logits": [float(row[c]) for c in columns],
    })
envelope = {"positions": len(ids), "argmax_agree": agree, "mean_abs": float(np.mean(diffs)),
            "max_abs": float(np.max(diffs))}
print("transformers vs llama.cpp on the sampled logits:", envelope)

PROMPTS = [
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a haiku about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
greedy = []
for prompt in PROMPTS:
    toks = llm.tokenize(prompt.encode(), add_bos=False, special=True)
    llm.reset()
    llm.eval(toks)
    out, margins = [], []
    for _ in range(32):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        best = np.argsort(-row)[:2]
        margins.append(float(row[best[0]] - row[best[1]]))
        t = int(best[0])
        out.append(t)
        if t == llm.token_eos():
            break
        llm.eval([t])
    text = llm.detokenize(out).decode("utf-8", errors="replace")
    greedy.append({"prompt": prompt, "prompt_ids": toks, "ids": out, "margins": margins, "text": text})
    print(repr(prompt[:40]), "->", repr(text), "min margin", min(margins))

fixture = {
    "generator": "llama-cpp-python 0.3.36 (llama.cpp), 2 threads",
    "file": os.path.basename(path),
    "ids": ids,
    "columns": columns,
    "positions": positions,
    "envelope_vs_transformers": envelope,
    "greedy": greedy,
}
with open(os.path.join(FIX, "smollm2_llamacpp.json"), "w") as f:
    json.dump(fixture, f)
