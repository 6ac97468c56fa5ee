#!/usr/bin/env python3
"""Checks that `peft` loads the LoRA adapters `dpo-sam train` saves and computes what dpo-sam does.

For a GPT-2, a GPT-NeoX, a Mistral and a Llama model (the test fixtures; stories260K too when
../shared is there), trains LoRA adapters on every dense layer for a few steps with
`dpo-sam train` (dropout on, so that the adapters move), then:
  - loads base + adapter with `peft.PeftModel.from_pretrained` and compares the per-pair chosen
    and rejected log-probs it computes (tokenised as dpo-sam does) with `dpo-sam score --model
    ADAPTER_DIR`, which loads the base and the adapter itself;
  - merges the adapter with `dpo-sam merge` and compares the logits `transformers` computes on
    the merged model with PeftModel's, on the same token ids.
Prints one line per model and exits non-zero if a difference exceeds 1e-4.

Not part of `cargo test` (tests must not need Python); run by hand after changing LoRA:
    cargo build && DPO_SAM=target/debug/dpo-sam python3 scripts/check_peft.py
Needs torch, transformers and peft.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from peft import PeftModel
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
STORIES = os.path.join(os.path.dirname(ROOT), "shared", "models", "stories260K")
BIN = os.environ.get("DPO_SAM", os.path.join(ROOT, "target", "release", "dpo-sam"))
TOL = 1e-4
# Pairs in the built-in task's alphabet, which every tokenizer here covers.
PAIRS = [
    {"prompt": "12+35=", "chosen": "47", "rejected": "48"},
    {"prompt": "sort dbca=", "chosen": "abcd", "rejected": "abdc"},
    {"prompt": "rev abc=", "chosen": "cba", "rejected": "abc"},
]


def train(base, out, data):
    config = f"""
output_dir = {json.dumps(out)}
seed = 5
[model]
name_or_path = {json.dumps(base)}
[data]
train = {json.dumps(data)}
builtin_pairs = 64
max_length = 32
[training]
beta = 0.1
learning_rate = 3e-2
batch_size = 8
max_steps = 4
[lora]
r = 4
alpha = 8
dropout = 0.1
target_modules = "all-linear"
[sam]
kind = "logits"
rho = 0.05
"""
    path = out + ".toml"
    with open(path, "w") as f:
        f.write(config)
    subprocess.run([BIN, "train", "--config", path, "--quiet"], check=True, capture_output=True)


def peft_logps(model, tokenizer_json, pairs):
    """Chosen and rejected log-probs as dpo-sam scores them: prompt + response + EOS, the
    response tokens being those after the prompt's encoding."""
    tok = Tokenizer.from_file(tokenizer_json)
    with open(os.path.join(os.path.dirname(tokenizer_json), "tokenizer_config.json")) as f:
        eos = tok.token_to_id(json.load(f)["eos_token"])
    rows = []
    for p in pairs:
        prompt_ids = tok.encode(p["prompt"]).ids
        row = {}
        for side in ("chosen", "rejected"):
            ids = tok.encode(p["prompt"] + p[side]).ids + [eos]
            start = 0
            while start < min(len(ids), len(prompt_ids)) and ids[start] == prompt_ids[start]:
                start += 1
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            row[side] = sum(logp[j - 1, ids[j]].item() for j in range(max(start, 1), len(ids)))
        rows.append(row)
    return rows


def check(name, base, tmp):
    out = os.path.join(tmp, name)
    data = os.path.join(tmp, "pairs.jsonl")
    train(base, out, "builtin:arith")
    base_model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base_model, out).eval()
    moved = max(
        p.abs().max().item() for n, p in peft_model.named_parameters() if "lora_B" in n
    )

    scores = os.path.join(tmp, name + "-scores.jsonl")
    subprocess.run([BIN, "score", "--model", out, "--data", data, "--max-length", "32",
                    "--out", scores], check=True, capture_output=True)
    with open(scores) as f:
        ours = [json.loads(line) for line in f if line.strip()]
    theirs = peft_logps(peft_model, os.path.join(out, "tokenizer.json"), PAIRS)
    logp_diff = max(abs(o[f"{s}_logps"] - t[s]) for o, t in zip(ours, theirs)
                    for s in ("chosen", "rejected"))

    merged_dir = os.path.join(tmp, name + "-merged")
    subprocess.run([BIN, "merge", "--base", base, "--adapter", out, "--out", merged_dir],
                   check=True, capture_output=True)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[(7 * i + 3) % 40 + 1 for i in range(24)]])
    with torch.no_grad():
        logits_diff = (peft_model(ids).logits - merged(ids).logits).abs().max().item()
    ok = logp_diff <= TOL and logits_diff <= TOL and len(ours) == len(PAIRS) and moved > 0
    print(f"{'ok ' if ok else 'BAD'} {name}: max |lora_B| {moved:.3g}; max |log-prob diff| "
          f"PeftModel vs dpo-sam score {logp_diff:.2e}; max |logit diff| PeftModel vs "
          f"dpo-sam merge (transformers) {logits_diff:.2e}")
    return ok


def main():
    cases = [("gpt2", "gpt2-random"), ("gpt_neox", "gpt-neox-sequential"),
             ("mistral", "mistral-window-untied"), ("llama", "llama-bias-headdim")]
    bases = [(name, os.path.join(FIXTURES, d)) for name, d in cases]
    if os.path.isdir(STORIES):
        bases.append(("stories260K", STORIES))
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, "pairs.jsonl"), "w") as f:
            f.writelines(json.dumps(p) + "\n" for p in PAIRS)
        for name, base in bases:
            ok &= check(name, base, tmp)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
