#!/usr/bin/env python3
"""Writes adapters made by `peft` for `tests/lora.rs` to load: PEFT's format, read by dpo-sam.

For three parity fixtures (GPT-2, GPT-NeoX, Mistral), builds a LoRA adapter with
`peft.get_peft_model` under a different `target_modules` form each (names with a dotted suffix
and rsLoRA; "all-linear"; a regular expression), gives both factors seeded random values (PEFT
starts B at zero, which would make the adapter a no-op), saves it with `save_pretrained` into
`tests/fixtures/peft-<name>/` and writes `expected.json`: PeftModel's logits on the base
fixture's input ids.

Needs torch, transformers and peft; Rust tests and CI only read the files it writes.
Usage: python3 scripts/make_peft_fixtures.py
"""

import json
import os
import shutil

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
CASES = [
    ("gpt2-random", dict(r=4, lora_alpha=16, use_rslora=True, target_modules=["c_attn", "mlp.c_proj"])),
    ("gpt-neox-sequential", dict(r=3, lora_alpha=6, target_modules="all-linear")),
    ("mistral-window-untied", dict(r=2, lora_alpha=5, target_modules=r".*\.(q_proj|v_proj|down_proj)")),
]


def main():
    for i, (base, settings) in enumerate(CASES):
        base_dir = os.path.join(FIXTURES, base)
        out = os.path.join(FIXTURES, f"peft-{base}")
        shutil.rmtree(out, ignore_errors=True)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
        gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        peft_model.save_pretrained(out)
        os.remove(os.path.join(out, "README.md"))  # a model card template
        # A path relative to the repository, not the machine that made it.
        path = os.path.join(out, "adapter_config.json")
        with open(path) as f:
            cfg = json.load(f)
        cfg["base_model_name_or_path"] = f"tests/fixtures/{base}"
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
        with open(os.path.join(base_dir, "expected.json")) as f:
            ids = torch.tensor(json.load(f)["input_ids"])
        with torch.no_grad():
            logits = peft_model(input_ids=ids).logits.float()
        expected = {
            "base": base,
            "input_ids": ids.tolist(),
            "logits": [[[float(f"{v:.8g}") for v in pos] for pos in row] for row in logits.tolist()],
        }
        with open(os.path.join(out, "expected.json"), "w") as f:
            json.dump(expected, f, separators=(",", ":"))
            f.write("\n")
        print(f"peft-{base}: {sorted(os.listdir(out))}")


if __name__ == "__main__":
    main()
