#!/usr/bin/env python3
"""Make the parity fixtures in shared/model/fixtures/ with HuggingFace transformers + PEFT.

Each model fixture is a tiny, randomly initialised `LlamaForCausalLM` saved as an HF checkpoint
(config.json + model.safetensors) together with `expected.safetensors`, which holds fixed
`input_ids` (i64, [batch, seq]) and the f32 `logits` ([batch, seq, vocab]) that transformers computes
for them. The Rust tests load the checkpoint with starling-model and require max |Δlogit| <= 1e-4.

The configs cover: grouped-query attention at several ratios (MHA, GQA 2:1, MQA), tied and untied
embeddings, several rope thetas, an explicit head_dim, both config styles (top-level `rope_theta`
and the newer `rope_parameters`), and f32 / f16 / bf16 tensor storage.

`peft_gqa/` adds a LoRA adapter written by PEFT (random non-zero A and B on all seven projections)
and the logits of base+adapter. `tokenizer/` holds a small byte-level BPE tokenizer.json trained on
the shipped corpus and the ids the HF tokenizers library gives for a few strings.

Usage: pip install torch transformers peft safetensors; python3 scripts/make_fixtures.py
"""
import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "shared" / "model" / "fixtures"

CONFIGS = {
    # name: (config kwargs, storage dtype, config style)
    "gqa_untied_f32": (dict(vocab_size=97, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                            tie_word_embeddings=False, rms_norm_eps=1e-6), torch.float32, "rope_theta"),
    "mha_tied_f16": (dict(vocab_size=80, hidden_size=48, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=4, rope_theta=500000.0,
                          tie_word_embeddings=True, rms_norm_eps=1e-5), torch.float16, "rope_parameters"),
    "mqa_headdim_bf16": (dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=32, rope_theta=1e6,
                              tie_word_embeddings=False, rms_norm_eps=1e-6), torch.bfloat16, "rope_parameters"),
    "gqa3_tied_f32": (dict(vocab_size=128, hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=6, num_key_value_heads=2, rope_theta=100000.0,
                           tie_word_embeddings=True, rms_norm_eps=1e-6), torch.float32, "rope_theta"),
}


def write_config(path: pathlib.Path, kw: dict, dtype: torch.dtype, style: str) -> None:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "max_position_embeddings": 256, "attention_bias": False, "mlp_bias": False,
        "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[dtype],
    }
    cfg.update({k: v for k, v in kw.items() if k != "rope_theta"})
    if style == "rope_theta":
        cfg["rope_theta"] = kw["rope_theta"]
    else:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": kw["rope_theta"]}
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def build(name: str, kw: dict, dtype: torch.dtype, style: str, seed: int):
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=256, **kw)).eval()
    # Larger-than-default init so that every block matters for the logits.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    # Round the parameters (not the buffers: RoPE's inv_freq stays f32, as when HF loads a bf16
    # checkpoint in f32) through the storage dtype, so the f32 reference uses exactly what is stored.
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if kw["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    write_config(d / "config.json", kw, dtype, style)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, kw["vocab_size"], (2, 11), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits.contiguous()},
              str(d / "expected.safetensors"))
    return model, ids


def build_peft(base, ids) -> None:
    from peft import LoraConfig, get_peft_model
    torch.manual_seed(7)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                     target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    peft_model = get_peft_model(base, cfg).eval()
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_" in n:
                p.normal_(0.0, 0.2)
    d = OUT / "peft_gqa"
    peft_model.save_pretrained(str(d))
    (d / "README.md").unlink(missing_ok=True)  # PEFT writes a model-card template we do not need
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits.float()
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits.contiguous()},
              str(d / "expected.safetensors"))


def build_tokenizer() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    text = (ROOT / "assets" / "shakespeare" / "hamlet.txt").read_text(encoding="utf-8")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([text], trainer=trainer)
    d = OUT / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    samples = ["To be, or not to be: that is the question.", "Ophelia!  Nymph, in thy orisons",
               "naïve café — ünïcödé ✓"]
    (d / "expected.json").write_text(json.dumps(
        [{"text": s, "ids": tok.encode(s).ids} for s in samples], indent=1, ensure_ascii=False) + "\n")


def main() -> None:
    torch.set_num_threads(2)
    models = {}
    for i, (name, (kw, dtype, style)) in enumerate(CONFIGS.items()):
        models[name] = build(name, kw, dtype, style, seed=100 + i)
    build_peft(*models["gqa_untied_f32"])
    build_tokenizer()
    print("fixtures written to", OUT)


if __name__ == "__main__":
    main()
