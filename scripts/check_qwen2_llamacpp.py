#!/usr/bin/env python3
"""Check that llama.cpp runs Starling's Qwen2 GGUF export, and record what it computes.

Exports the Qwen2 fixture shared/model/fixtures/qwen2_tied_f32 (a random Qwen2ForCausalLM made by
scripts/make_qwen2_fixtures.py: q/k/v biases, rope θ 1e6, tied embeddings, f32) with
`starling-coordinator model export --gguf` (architecture `qwen2`), runs its first input sequence
through llama.cpp (llama-cpp-python), compares llama.cpp's logits with transformers' (the fixture's
expected.safetensors), and writes shared/model/fixtures/gguf/qwen2_llamacpp_logits.json: the SHA-256
of the exported file, the ids and llama.cpp's logits. `tests/gguf_llamacpp.rs` exports the same file,
checks it is byte for byte the one llama.cpp ran, and compares Starling's logits with llama.cpp's.

Usage: cargo build -p starling-coordinator; pip install llama-cpp-python numpy safetensors torch;
python3 scripts/check_qwen2_llamacpp.py
"""
import hashlib
import json
import pathlib
import subprocess
import tempfile

import numpy as np
from llama_cpp import Llama
from safetensors.numpy import load_file

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "shared/model/fixtures/qwen2_tied_f32"
BIN = ROOT / "target/debug/starling-coordinator"


def main() -> None:
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    ids = [int(x) for x in expected["input_ids"][0]]
    want = expected["logits"][0].astype(np.float64)
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "qwen2.gguf"
        subprocess.run([str(BIN), "model", "export", str(FIXTURE), "--gguf", str(path)], check=True)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)], dtype=np.float64)
    diff = np.abs(theirs - want)
    report = {"positions": len(ids), "max_abs_vs_transformers": float(diff.max()),
              "mean_abs_vs_transformers": float(diff.mean()),
              "argmax_agree": int((theirs.argmax(1) == want.argmax(1)).sum())}
    print(json.dumps(report))
    out = ROOT / "shared/model/fixtures/gguf/qwen2_llamacpp_logits.json"
    out.write_text(json.dumps({"generator": "scripts/check_qwen2_llamacpp.py",
                               "llama_cpp_version": __import__("llama_cpp").__version__,
                               "gguf_sha256": digest, "ids": ids, "vs_transformers": report,
                               "logits": [[round(float(x), 6) for x in row] for row in theirs]}) + "\n")
    print("wrote", out)


if __name__ == "__main__":
    main()
