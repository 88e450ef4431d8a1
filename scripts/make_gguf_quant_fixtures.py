#!/usr/bin/env python3
"""Reference dequantizations for every GGUF tensor type Starling imports.

For each type: random blocks (random bytes, with every f16 scale field set to a finite value so no
block decodes to inf/NaN), and their values as llama.cpp's own Python reference decodes them
(`gguf.quants.dequantize` from the gguf package, the numpy port of ggml's dequantize_row_* that
llama.cpp's converters use). Written to shared/model/fixtures/gguf/quants.json; the model crate's
test decodes the same bytes and must give the same values.

    python3 -m venv /tmp/v && /tmp/v/bin/pip install gguf==0.19.0 numpy
    /tmp/v/bin/python scripts/make_gguf_quant_fixtures.py
"""
import json
import os

import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import quants

rng = np.random.default_rng(20261206)

# (type, values per block, bytes per block, offsets of f16 scale fields)
TYPES = [
    (T.Q4_0, 32, 18, [0]),
    (T.Q4_1, 32, 20, [0, 2]),
    (T.Q5_0, 32, 22, [0]),
    (T.Q5_1, 32, 24, [0, 2]),
    (T.Q8_0, 32, 34, [0]),
    (T.Q2_K, 256, 84, [80, 82]),
    (T.Q3_K, 256, 110, [108]),
    (T.Q4_K, 256, 144, [0, 2]),
    (T.Q5_K, 256, 176, [0, 2]),
    (T.Q6_K, 256, 210, [208]),
]


def f16_bytes(x):
    return np.asarray(x, dtype=np.float16).tobytes()


out = {}
for kind, per_block, block_bytes, scales in TYPES:
    blocks = 512 // per_block
    raw = bytearray(rng.integers(0, 256, size=blocks * block_bytes, dtype=np.uint8).tobytes())
    for b in range(blocks):
        for off in scales:
            v = rng.uniform(-0.05, 0.05)
            raw[b * block_bytes + off: b * block_bytes + off + 2] = f16_bytes(v)
    data = np.frombuffer(bytes(raw), dtype=np.uint8).reshape(1, -1)
    values = quants.dequantize(data, kind).reshape(-1).astype(np.float32)
    assert values.size == 512 and np.isfinite(values).all(), kind.name
    out[kind.name] = {"bytes": bytes(raw).hex(), "values": [float(v) for v in values]}

# Plain floats: f16 and bf16 of normal draws (bf16: the high half of an f32).
x = rng.normal(0, 1, size=512).astype(np.float32)
out["F16"] = {"bytes": x.astype(np.float16).tobytes().hex(),
              "values": [float(v) for v in x.astype(np.float16).astype(np.float32)]}
bf = (x.view(np.uint32) >> 16).astype(np.uint16)
out["BF16"] = {"bytes": bf.tobytes().hex(),
               "values": [float(v) for v in quants.dequantize(
                   np.frombuffer(bf.tobytes(), dtype=np.uint8).reshape(1, -1), T.BF16).reshape(-1)]}

path = os.path.join(os.path.dirname(__file__), "..", "shared", "model", "fixtures", "gguf", "quants.json")
with open(path, "w") as f:
    json.dump({"generator": "gguf 0.19.0 quants.dequantize", "types": out}, f)
print(f"wrote {path}: {', '.join(out)}")
