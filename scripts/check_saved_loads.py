#!/usr/bin/env python3
"""Checks that `transformers` loads what `dpo-sam train` saves and computes what dpo-sam does.

Trains the small GPT-2 of tests/fixtures/score/ for a few steps with `dpo-sam train`, saving
in bf16 and in f32, sharded (a tiny `max_shard_size`) and whole; then, for each saved model,
loads it with `AutoModelForCausalLM` / `AutoTokenizer` and compares the per-pair chosen and
rejected log-probs that transformers computes (tokenised as TRL does) with `dpo-sam score` on
the same directory. Prints one line per case and exits non-zero on any mismatch.

Not part of `cargo test` (tests must not need Python); run by hand after changing saving:
    cargo build --release && python3 scripts/check_saved_loads.py
Needs torch and transformers.
"""

import json
import os
import subprocess
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "score")
BIN = os.environ.get("DPO_SAM", os.path.join(ROOT, "target", "release", "dpo-sam"))
TOL = 1e-4
CASES = [("bfloat16", "bf16", "4KB"), ("float32", "f32", "8KB"), ("float32", "f32", "5GB")]


def train(out, save_dtype, shard):
    data = os.path.join(FIXTURE, "data.jsonl")
    config = f"""
output_dir = {json.dumps(out)}
seed = 3
[model]
name_or_path = {json.dumps(os.path.join(FIXTURE, "policy"))}
[data]
train = {json.dumps(data)}
max_length = 64
[training]
beta = 0.1
learning_rate = 1e-2
batch_size = 3
max_steps = 3
save_dtype = "{save_dtype}"
max_shard_size = "{shard}"
[sam]
kind = "logits"
rho = 0.05
"""
    path = out + ".toml"
    with open(path, "w") as f:
        f.write(config)
    subprocess.run([BIN, "train", "--config", path], check=True, capture_output=True)


def transformers_logps(model_dir, pairs):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    for p in pairs:
        prompt_ids = tok(p["prompt"], add_special_tokens=False)["input_ids"]
        row = {}
        for side in ("chosen", "rejected"):
            ids = tok(p["prompt"] + p[side], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            start = 0
            while start < min(len(ids), len(prompt_ids)) and ids[start] == prompt_ids[start]:
                start += 1
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
            row[side] = sum(logp[j - 1, ids[j]].item() for j in range(max(start, 1), len(ids)))
        rows.append(row)
    return model, rows


def main():
    with open(os.path.join(FIXTURE, "data.jsonl")) as f:
        pairs = [json.loads(line) for line in f if line.strip()]
    failed = False
    with tempfile.TemporaryDirectory() as tmp:
        for torch_dtype, save_dtype, shard in CASES:
            out = os.path.join(tmp, f"{save_dtype}-{shard}")
            train(out, save_dtype, shard)
            files = sorted(n for n in os.listdir(out) if n.endswith(".safetensors"))
            with open(os.path.join(out, "config.json")) as f:
                cfg = json.load(f)
            recorded = cfg.get("dtype") or cfg.get("torch_dtype")
            model, theirs = transformers_logps(out, pairs)
            scores = os.path.join(tmp, "scores.jsonl")
            subprocess.run([BIN, "score", "--model", out, "--data", os.path.join(FIXTURE, "data.jsonl"),
                            "--max-length", "64", "--out", scores], check=True, capture_output=True)
            with open(scores) as f:
                ours = [json.loads(line) for line in f if line.strip()]
            diff = max(abs(o[f"{s}_logps"] - t[s]) for o, t in zip(ours, theirs) for s in ("chosen", "rejected"))
            ok = diff <= TOL and recorded == torch_dtype and len(ours) == len(pairs)
            failed |= not ok
            print(f"{'ok ' if ok else 'BAD'} save_dtype={save_dtype} max_shard_size={shard}: {len(files)} file(s), "
                  f"config dtype {recorded}, transformers loaded {sum(p.numel() for p in model.parameters())} "
                  f"params, max |logp diff| vs dpo-sam score {diff:.2e}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
