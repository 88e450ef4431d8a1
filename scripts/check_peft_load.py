#!/usr/bin/env python3
"""Check that an adapter written by Starling loads in HuggingFace PEFT and gives Starling's logits.

Usage: python3 scripts/check_peft_load.py <hf-model-dir> <adapter-dir> <ids comma-separated> <starling logits.json>
where logits.json is the output of
`starling-coordinator model logits <hf-model-dir> --ids ... --adapter <adapter-dir> --all --json`.
Prints the max |Δlogit| and exits non-zero above 1e-4.
"""
import json
import sys

import torch
from peft import PeftModel
from transformers import LlamaForCausalLM


def main() -> None:
    model_dir, adapter_dir, ids, ours = sys.argv[1:5]
    base = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    ids = torch.tensor([[int(x) for x in ids.split(",")]])
    with torch.no_grad():
        theirs = model(input_ids=ids).logits[0]
    mine = torch.tensor(json.load(open(ours))["logits"])
    d = (theirs - mine).abs().max().item()
    print(json.dumps({"check": "peft_load", "max_abs_diff": d}))
    sys.exit(0 if d <= 1e-4 else 1)


if __name__ == "__main__":
    main()
