#!/usr/bin/env python3
"""The PyTorch + PEFT side of `starling-bench train`: same shapes, LoRA r=8 on q,k,v,o, frozen
f32 base, AdamW, random tokens; prints one JSON line with tokens/s (2 threads, like CI's machine).

Usage: python3 scripts/bench_torch_peft.py --config S|M [--steps 5] [--autocast bf16]
(`--autocast bf16`: the forward under `torch.autocast("cpu", torch.bfloat16)`, PyTorch's mixed
precision, the counterpart of `starling-bench train --engine native-bf16`.)
"""
import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

SHAPES = {
    "S": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=688, vocab_size=512, tie_word_embeddings=False, seq=128, batch=8),
    "M": dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
              intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True, seq=256, batch=4),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="S", choices=SHAPES)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--autocast", choices=["bf16"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    s = dict(SHAPES[args.config])
    seq, batch = s.pop("seq"), s.pop("batch")
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=2048, **s))
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ids = torch.randint(0, s["vocab_size"], (batch, seq))

    def step():
        if args.autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    t = time.time()
    for _ in range(args.steps):
        step()
    secs = time.time() - t
    print(json.dumps({"bench": "train", "impl": "pytorch+peft", "torch": torch.__version__,
                      "config": args.config, "quant": "f32",
                      "products": args.autocast or "f32", "threads": 2, "steps": args.steps,
                      "seconds": secs, "tokens_per_s": args.steps * batch * seq / secs}))


if __name__ == "__main__":
    main()
