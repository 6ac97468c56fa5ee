#!/usr/bin/env python3
"""Writes tests/fixtures/score/ches.json: CHES and length-normalised CHES (Razin et al. 2024,
"Unintentional Unalignment", Definition 2) of the score fixture's pairs under its policy model,
computed with `transformers` the way the authors' ches/ches.py does: from the last hidden layer
(`hidden_states[-1]`) of prompt + response, summed over the positions from the last prompt token
through the second-to-last token (those that predict the response tokens; the response ends with
the EOS that TRL appends).

Run after scripts/make_score_fixture.py (it reads the models and data that script wrote).
Needs torch, transformers and tokenizers; Rust tests only read the file it writes.
Usage: python3 scripts/make_ches_fixture.py
"""

import json
import os

import torch
from tokenizers import Tokenizer
from transformers import GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "score")


def response_hidden(model, ids, prompt_len):
    """Last-layer hidden states at positions prompt_len - 1 .. len(ids) - 2, in float64."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0][prompt_len - 1:len(ids) - 1].double()


def main():
    model = GPT2LMHeadModel.from_pretrained(os.path.join(FIXTURE, "policy")).eval()
    tok = Tokenizer.from_file(os.path.join(FIXTURE, "policy", "tokenizer.json"))
    pairs = [json.loads(line) for line in open(os.path.join(FIXTURE, "data.jsonl"))]
    out = []
    for p in pairs:
        prompt_ids = tok.encode(p["prompt"]).ids
        sums, lens = {}, {}
        for side in ("chosen", "rejected"):
            ids = tok.encode(p["prompt"] + p[side]).ids + [0]
            prompt_len = 0
            while prompt_len < min(len(ids), len(prompt_ids)) and ids[prompt_len] == prompt_ids[prompt_len]:
                prompt_len += 1
            h = response_hidden(model, ids, prompt_len)
            sums[side], lens[side] = h.sum(dim=0), h.shape[0]
        w, l = sums["chosen"], sums["rejected"]
        ches = (w * l).sum() - torch.norm(w) ** 2
        mw, ml = w / lens["chosen"], l / lens["rejected"]
        ln_ches = (mw * ml).sum() - torch.norm(mw) ** 2
        out.append({"ches": ches.item(), "ln_ches": ln_ches.item()})
    path = os.path.join(FIXTURE, "ches.json")
    with open(path, "w") as f:
        json.dump({"pairs": out}, f, indent=1)
        f.write("\n")
    print(f"wrote {path}: {out}")


if __name__ == "__main__":
    main()
