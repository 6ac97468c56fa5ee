#!/usr/bin/env python3
"""Writes tests/fixtures/score/, which `tests/score.rs` compares `dpo-sam score` against.

Two tiny, seeded, random GPT-2 models saved by `transformers` (policy/ and ref/) with the
character-level tokenizer of dpo-sam's built-in model, a few explicit preference pairs
(data.jsonl), and expected.json: each pair's chosen/rejected sequence log-probs under both
models as transformers computes them, tokenised as TRL's DPOTrainer does (prompt + response +
EOS; the response is what follows the common prefix with the tokenised prompt).

Needs torch, transformers and tokenizers; Rust tests only read the files it writes.
Usage: python3 scripts/make_score_fixture.py
"""

import json
import os
import shutil

import torch
from tokenizers import Tokenizer
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "score")
# Must match BUILTIN_CHARS in src/tokenizer.rs; id 0 is <|endoftext|>.
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-=:?.,\n"
EOS = "<|endoftext|>"
PAIRS = [
    {"prompt": "1+2=", "chosen": "3", "rejected": "12"},
    {"prompt": "what is 7-5?", "chosen": " 2.", "rejected": " it is 12, i think."},
    {"prompt": "q: 9+9\na:", "chosen": " 18", "rejected": " 99"},
]


def tokenizer_json():
    vocab = {EOS: 0}
    for i, c in enumerate(CHARS):
        vocab[c] = i + 1
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": 0, "content": EOS, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": {"type": "Fuse"},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                  "ignore_merges": False, "vocab": vocab, "merges": []},
    }


def make_model(seed):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(CHARS) + 1, bos_token_id=0, eos_token_id=0, n_embd=16, n_layer=2,
                     n_head=2, n_positions=64, n_inner=32)
    model = GPT2LMHeadModel(cfg).eval()
    # Larger than HF's std 0.02, so that log-probs differ clearly between models and tokens.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                p.copy_(noise * 0.15)
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            else:
                p.copy_(1.0 + noise * 0.2)
    return model


def save(model, name):
    out = os.path.join(OUT, name)
    model.save_pretrained(out)
    gen_cfg = os.path.join(out, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)
    return out


def sequence_logps(model, ids, prompt_len):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    first = max(prompt_len, 1)
    return sum(logp[j - 1, ids[j]].item() for j in range(first, len(ids))), len(ids) - first


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    policy, ref = make_model(1), make_model(2)
    policy_dir = save(policy, "policy")
    save(ref, "ref")
    with open(os.path.join(policy_dir, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(), f)
    with open(os.path.join(policy_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
                   "unk_token": EOS, "model_max_length": 64}, f, indent=2)
    tok = Tokenizer.from_file(os.path.join(policy_dir, "tokenizer.json"))
    with open(os.path.join(OUT, "data.jsonl"), "w") as f:
        for p in PAIRS:
            f.write(json.dumps(p) + "\n")
    expected = []
    for p in PAIRS:
        prompt_ids = tok.encode(p["prompt"]).ids
        row = {}
        for side in ("chosen", "rejected"):
            ids = tok.encode(p["prompt"] + p[side]).ids + [0]
            prompt_len = 0
            while prompt_len < min(len(ids), len(prompt_ids)) and ids[prompt_len] == prompt_ids[prompt_len]:
                prompt_len += 1
            row[f"{side}_logps"], row[f"{side}_tokens"] = sequence_logps(policy, ids, prompt_len)
            row[f"ref_{side}_logps"], _ = sequence_logps(ref, ids, prompt_len)
        expected.append(row)
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump({"pairs": expected}, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {sorted(os.listdir(OUT))}")


if __name__ == "__main__":
    main()
