#!/usr/bin/env python3
"""Check Starling's GGUF export and import the way users run them: in llama.cpp, comparing logits.

1. Q8_0 export: the shipped model exported at Q8_0 runs in llama.cpp with Starling's logits.
2. Merged adapter: `model export --adapter DIR --merge` (the adapter is a seeded random PEFT adapter on
   q/v/down, committed as shared/model/fixtures/gguf/tiny_adapter/) gives llama.cpp the logits Starling
   computes with the adapter applied at run time.
4. Vocabularies: a small checkpoint with the byte-level BPE tokenizer fixture
   (shared/model/fixtures/tokenizer), exported to GGUF, is tokenized by llama.cpp exactly as by HF
   tokenizers (fixtures/gguf/llamacpp_tokens.json).
3. K-quants: the shipped model exported in f32 and quantized by llama.cpp itself to Q4_K_M (Q4_K and Q6_K
   tensors, Q5_0/Q8_0 where a row is not a multiple of 256) is committed with llama.cpp's logits on it, so
   `cargo test` checks Starling's import of the file against llama.cpp.

Exports the shipped base model (imported at Q8_0) with `starling-coordinator model export --gguf`, runs
the same token ids through llama.cpp (llama-cpp-python) and through Starling (`model logits --all`),
prints the largest difference, and writes llama.cpp's logits as a fixture
(shared/model/fixtures/gguf/llamacpp_logits.json) that `cargo test` compares against without Python.

Usage: pip install llama-cpp-python numpy; python3 scripts/check_gguf_llamacpp.py
"""
import json
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from llama_cpp import Llama

ROOT = pathlib.Path(__file__).resolve().parent.parent
IDS = [72, 65, 77, 76, 69, 84, 46, 10, 84, 111, 32, 98, 101, 44, 32, 111, 114, 32, 110, 111, 116]  # "HAMLET.\nTo be, or not"


def coordinator(*args):
    cmd = ["cargo", "run", "-q", "--release", "-p", "starling-coordinator", "--", *args]
    return subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout


def main() -> None:
    fixtures = ROOT / "shared/model/fixtures/gguf"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        vocabulary(tmp, fixtures)
        merged_and_kquants(tmp, fixtures)
        coordinator("model", "import", str(ROOT / "assets/models/starling-tiny"), "--out", str(tmp / "q8"), "--quant", "q8_0")
        coordinator("model", "export", str(tmp / "q8"), "--gguf", str(tmp / "tiny-q8.gguf"))
        ours = json.loads(coordinator("model", "logits", str(tmp / "q8"), "--ids", ",".join(map(str, IDS)), "--all", "--json"))
        ours = np.array(ours["logits"], dtype=np.float64)
        llm = Llama(model_path=str(tmp / "tiny-q8.gguf"), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
        llm.eval(IDS)
        theirs = np.array(llm.scores[: len(IDS)], dtype=np.float64)
    diff = np.abs(ours - theirs)
    print(json.dumps({"positions": len(IDS), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                      "argmax_agree": float((ours.argmax(1) == theirs.argmax(1)).mean())}))
    out = ROOT / "shared/model/fixtures/gguf/llamacpp_logits.json"
    out.write_text(json.dumps({"ids": IDS, "llama_cpp_version": __import__("llama_cpp").__version__,
                               "logits": [[round(float(x), 5) for x in row] for row in theirs]}) + "\n")
    print("wrote", out)
    # llama.cpp multiplies Q8_0 weights with activations quantized to 8 bits (vec_dot_q8_0_q8_0), Starling
    # with f32 activations: the logits differ by that quantization (measured: max 0.093, mean 0.019).
    if diff.max() > 0.15 or (ours.argmax(1) != theirs.argmax(1)).any():
        sys.exit("llama.cpp and Starling disagree")


def llama_logits(path: pathlib.Path) -> np.ndarray:
    llm = Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=2, verbose=False)
    llm.eval(IDS)
    return np.array(llm.scores[: len(IDS)], dtype=np.float64)


def write_adapter(out: pathlib.Path) -> None:
    """A seeded PEFT adapter (r = 4, alpha = 8) on q, v and down of the shipped model's 4 layers."""
    from safetensors.numpy import save_file
    cfg = json.loads((ROOT / "assets/models/starling-tiny/config.json").read_text())
    h, i, hd, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"], cfg["num_key_value_heads"]
    shapes = {"self_attn.q_proj": (h, h), "self_attn.v_proj": (h, hd * kv), "mlp.down_proj": (i, h)}
    rng = np.random.default_rng(16)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (fan_in, fan_out) in shapes.items():
            base = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{base}.lora_A.weight"] = (rng.standard_normal((4, fan_in)) / np.sqrt(fan_in)).astype(np.float32)
            tensors[f"{base}.lora_B.weight"] = (rng.standard_normal((fan_out, 4)) * 0.05).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "target_modules": ["q_proj", "v_proj", "down_proj"], "task_type": "CAUSAL_LM", "use_rslora": False,
        "use_dora": False}, indent=1) + "\n")


def vocabulary(tmp: pathlib.Path, fixtures: pathlib.Path) -> None:
    """llama.cpp tokenizes Starling's export of a byte-level BPE vocabulary as HF tokenizers does."""
    import llama_cpp
    from safetensors.numpy import save_file
    tok_dir = ROOT / "shared/model/fixtures/tokenizer"
    expected = json.loads((tok_dir / "expected.json").read_text())
    hf = tmp / "bpe-model"
    hf.mkdir()
    h, layers, vocab = 64, 1, 400
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu", "vocab_size": vocab,
           "hidden_size": h, "intermediate_size": 128, "num_hidden_layers": layers, "num_attention_heads": 4,
           "num_key_value_heads": 2, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 1, "torch_dtype": "float32"}
    (hf / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(3)
    w = lambda *s: (rng.standard_normal(s) * 0.02).astype(np.float32)
    t = {"model.embed_tokens.weight": w(vocab, h), "model.norm.weight": np.ones(h, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t.update({p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(32, h),
                  p + "self_attn.v_proj.weight": w(32, h), p + "self_attn.o_proj.weight": w(h, h),
                  p + "mlp.gate_proj.weight": w(128, h), p + "mlp.up_proj.weight": w(128, h),
                  p + "mlp.down_proj.weight": w(h, 128), p + "input_layernorm.weight": np.ones(h, np.float32),
                  p + "post_attention_layernorm.weight": np.ones(h, np.float32)})
    save_file(t, str(hf / "model.safetensors"))
    (hf / "tokenizer.json").write_text((tok_dir / "tokenizer.json").read_text())
    coordinator("model", "import", str(hf), "--out", str(tmp / "bpe-q8"), "--quant", "q8_0")
    coordinator("model", "export", str(tmp / "bpe-q8"), "--gguf", str(tmp / "bpe.gguf"))
    llm = Llama(model_path=str(tmp / "bpe.gguf"), vocab_only=True, verbose=False)
    cases = []
    for case in expected:
        ids = llm.tokenize(case["text"].encode(), add_bos=False, special=False)
        cases.append({"text": case["text"], "ids": ids})
        if ids != case["ids"]:
            sys.exit(f"llama.cpp tokenizes {case['text']!r} as {ids}, HF as {case['ids']}")
    (fixtures / "llamacpp_tokens.json").write_text(json.dumps({
        "llama_cpp_version": llama_cpp.__version__, "cases": cases}, ensure_ascii=False, indent=1) + "\n")
    print(json.dumps({"check": "vocabulary", "texts": len(cases), "all_equal": True}))


def merged_and_kquants(tmp: pathlib.Path, fixtures: pathlib.Path) -> None:
    import llama_cpp
    tiny = ROOT / "assets/models/starling-tiny"
    ids = ",".join(map(str, IDS))
    # 2. A merged adapter.
    adapter = fixtures / "tiny_adapter"
    write_adapter(adapter)
    coordinator("model", "import", str(tiny), "--out", str(tmp / "q8m"), "--quant", "q8_0")
    coordinator("model", "export", str(tmp / "q8m"), "--gguf", str(tmp / "merged.gguf"), "--adapter", str(adapter), "--merge")
    theirs = llama_logits(tmp / "merged.gguf")
    ours = np.array(json.loads(coordinator("model", "logits", str(tmp / "q8m"), "--ids", ids, "--all", "--adapter", str(adapter)))["logits"])
    diff = np.abs(ours - theirs)
    print(json.dumps({"check": "merged adapter", "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                      "argmax_agree": float((ours.argmax(1) == theirs.argmax(1)).mean())}))
    (fixtures / "llamacpp_merged_logits.json").write_text(json.dumps({
        "ids": IDS, "llama_cpp_version": llama_cpp.__version__,
        "logits": [[round(float(x), 5) for x in row] for row in theirs]}) + "\n")
    # 3. llama.cpp's own Q4_K_M of the shipped model.
    coordinator("model", "import", str(tiny), "--out", str(tmp / "f32"), "--quant", "f32")
    coordinator("model", "export", str(tmp / "f32"), "--gguf", str(tmp / "tiny-f32.gguf"))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    kq = fixtures / "starling-tiny-q4_k_m.gguf"
    rc = llama_cpp.llama_model_quantize(str(tmp / "tiny-f32.gguf").encode(), str(kq).encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize failed: {rc}")
    theirs = llama_logits(kq)
    (fixtures / "llamacpp_q4_k_m_logits.json").write_text(json.dumps({
        "ids": IDS, "llama_cpp_version": llama_cpp.__version__,
        "logits": [[round(float(x), 5) for x in row] for row in theirs]}) + "\n")
    print("wrote", kq, kq.stat().st_size, "bytes")


if __name__ == "__main__":
    main()
