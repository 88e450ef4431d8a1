#!/usr/bin/env python3
"""Pretrain Starling's small default base model ("starling-tiny") on the shipped corpus.

Starling never downloads models at run time, so the default base model is made here, once, and
committed as an ordinary HuggingFace Llama checkpoint in assets/models/starling-tiny/ (config.json +
model.safetensors in f16). It is a byte-level model (vocab 259: bytes 0-255, <s>=256, </s>=257,
<pad>=258 -- the same ids as starling-model's ByteTokenizer), trained on every work of the corpus
except the held-out ones listed in assets/shakespeare/HELD_OUT (one list, shared with starling-sim's
Shakespeare clients), which stay unseen for evaluation, the federated simulations and the fine-tuning demo.

Usage: pip install torch transformers safetensors; python3 scripts/pretrain_base.py [--steps N]
"""
import argparse
import json
import math
import pathlib
import time

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = pathlib.Path(__file__).resolve().parent.parent
HELD_OUT = {line.strip() for line in (ROOT / "assets" / "shakespeare" / "HELD_OUT").read_text().splitlines()
            if line.strip() and not line.startswith("#")}
BOS, EOS, PAD, VOCAB = 256, 257, 258, 259


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--out", default=str(ROOT / "assets" / "models" / "starling-tiny"))
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    corpus = ROOT / "assets" / "shakespeare"
    train = b"".join((corpus / p).read_bytes() for p in sorted(p.name for p in corpus.iterdir())
                     if p.endswith(".txt") and p not in HELD_OUT)
    held = (corpus / "hamlet.txt").read_bytes()
    data = torch.tensor(list(train), dtype=torch.long)
    val = torch.tensor(list(held), dtype=torch.long)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=512,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model = LlamaForCausalLM(cfg)
    seq, batch = 128, 24
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05, betas=(0.9, 0.95))
    warm = 100
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    t0 = time.time()
    for step in range(args.steps):
        ix = torch.randint(0, len(data) - seq - 1, (batch,))
        x = torch.stack([data[i:i + seq] for i in ix])
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 100 == 0 or step == args.steps - 1:
            model.eval()
            with torch.no_grad():
                vx = torch.stack([val[i:i + seq] for i in range(0, 64 * seq, seq)])
                vloss = model(input_ids=vx, labels=vx).loss.item()
            model.train()
            print(f"step {step} loss {loss.item():.3f} held-out {vloss:.3f} ({time.time() - t0:.0f}s)", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    conf = json.loads(cfg.to_json_string())
    conf["torch_dtype"] = "float16"
    conf["architectures"] = ["LlamaForCausalLM"]
    (out / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    print("saved", out)


if __name__ == "__main__":
    main()
