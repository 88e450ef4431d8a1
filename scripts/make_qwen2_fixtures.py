#!/usr/bin/env python3
"""Make the Qwen2 parity fixtures in shared/model/fixtures/qwen2_* with HuggingFace transformers.

Each is a tiny, randomly initialised `Qwen2ForCausalLM` (biases on the query, key and value
projections, none on the output one; large rope θ) saved as an HF checkpoint (config.json +
model.safetensors) with `expected.safetensors`: fixed `input_ids` (i64, [batch, seq]) and the f32
`logits` transformers computes for them. The configs are written as Qwen2.5's own are: a
`sliding_window` named but `use_sliding_window: false`, `max_window_layers`, `rope_scaling: null`.
`tests/parity.rs` loads them with starling-model and requires max |Δlogit| <= 1e-4.

- qwen2_tied_f32: grouped-query attention (6 query heads on 2 kv heads), tied embeddings, θ = 1e6.
- qwen2_untied_bf16: multi-head attention, untied head, θ = 1e6, bf16 storage.

Usage: pip install torch transformers safetensors; python3 scripts/make_qwen2_fixtures.py
"""
import json
import pathlib

import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "shared" / "model" / "fixtures"

CONFIGS = {
    "qwen2_tied_f32": (dict(vocab_size=259, hidden_size=96, intermediate_size=224, num_hidden_layers=2,
                            num_attention_heads=6, num_key_value_heads=2, rope_theta=1000000.0,
                            tie_word_embeddings=True, rms_norm_eps=1e-6), torch.float32),
    "qwen2_untied_bf16": (dict(vocab_size=259, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=4, rope_theta=1000000.0,
                               tie_word_embeddings=False, rms_norm_eps=1e-6), torch.bfloat16),
}
DTYPE = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def build(name: str, kw: dict, dtype: torch.dtype, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = Qwen2Config(max_position_embeddings=256, sliding_window=4096, use_sliding_window=False,
                      max_window_layers=kw["num_hidden_layers"], bos_token_id=256, eos_token_id=257, **kw)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            if n.endswith(".bias"):
                p.normal_(0.0, 0.3)  # large enough that a dropped bias shows in every logit
        for p in model.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    d = OUT / name
    d.mkdir(parents=True, exist_ok=True)
    state = {k: v.to(dtype).contiguous() for k, v in model.state_dict().items()}
    if kw["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    assert any(k.endswith("q_proj.bias") for k in state) and not any(k.endswith("o_proj.bias") for k in state)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu",
        "max_position_embeddings": 256, "sliding_window": 4096, "use_sliding_window": False,
        "max_window_layers": kw["num_hidden_layers"], "rope_scaling": None, "attention_dropout": 0.0,
        "bos_token_id": 256, "eos_token_id": 257, "torch_dtype": DTYPE[dtype],
    }
    config.update(kw)
    (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, kw["vocab_size"], (2, 13), generator=g)
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    save_file({"input_ids": ids.to(torch.int64).contiguous(), "logits": logits.contiguous()},
              str(d / "expected.safetensors"))
    print(name, "logits", tuple(logits.shape))


def main() -> None:
    torch.set_num_threads(2)
    for i, (name, (kw, dtype)) in enumerate(CONFIGS.items()):
        build(name, kw, dtype, seed=300 + i)


if __name__ == "__main__":
    main()
