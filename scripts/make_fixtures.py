#!/usr/bin/env python3
"""Writes the parity fixtures that `tests/parity.rs` compares dpo-sam's models against.

Each fixture is a tiny, seeded, random model built and saved by `transformers` into
`tests/fixtures/<name>/` (config.json + safetensors, no tokenizer: token ids are fixed in
expected.json), plus `expected.json` with what `transformers` computes for a 2x7 batch:
all-position logits, their log-sum-exp, and per-sequence log-prob sums over response masks.
Expected values always come from reloading the saved directory, so they describe the files on
disk (for the bf16 fixture: its bf16 weights upcast to f32).

For the pretrained models in ../shared/models (never copied into this repository), only
`tests/fixtures/shared-<name>-expected.json` is written; for large vocabularies it keeps a
sample of logit columns plus the log-sum-exp, which still pins down every position's
distribution.

Needs torch and transformers; Rust tests and CI only read the files it writes.
Usage: python3 scripts/make_fixtures.py [--shared ../shared/models]
"""

import argparse
import json
import os
import shutil

import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
BATCH, SEQ = 2, 7
# Large-vocabulary models keep this many logit columns in expected.json (plus log-sum-exp).
MAX_COLUMNS = 512


def spread_weights(model, seed):
    """Re-initialises with larger weights than HF's std 0.02 so that logits differ clearly
    between tokens and every parameter (norm gains and biases included) matters."""
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


def fixed_ids(vocab, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=gen)


# Response masks: position t marks that token t is part of the response (never t = 0, which
# has no prediction). Row 0 has a 4-token response, row 1 a 2-token one.
RESPONSE_MASK = [[0, 0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1, 1]]


def fmt(x):
    return float(f"{x:.8g}")


def expected(model_dir, ids, columns=None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    lse = torch.logsumexp(logits, dim=-1)
    mask = torch.tensor(RESPONSE_MASK, dtype=torch.float32)
    # Token t is predicted at position t - 1.
    token_logp = logp[:, :-1, :].gather(2, ids[:, 1:, None]).squeeze(2)
    sums = (token_logp * mask[:, 1:]).sum(dim=1)
    kept = logits if columns is None else logits[:, :, columns]
    return {
        "model_type": model.config.model_type,
        "input_ids": ids.tolist(),
        "columns": columns,
        "logits": [[[fmt(v) for v in pos] for pos in row] for row in kept.tolist()],
        "logsumexp": [[fmt(v) for v in row] for row in lse.tolist()],
        "response_mask": RESPONSE_MASK,
        "logp_sums": [fmt(v) for v in sums.tolist()],
    }


def write_json(path, value):
    with open(path, "w") as f:
        json.dump(value, f, separators=(",", ":"))
        f.write("\n")


def save_fixture(name, model, seed, dtype=torch.float32, shard=None, edit_config=None):
    out = os.path.join(FIXTURES, name)
    shutil.rmtree(out, ignore_errors=True)
    spread_weights(model, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kwargs)
    gen_cfg = os.path.join(out, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)
    if edit_config:
        path = os.path.join(out, "config.json")
        with open(path) as f:
            cfg = json.load(f)
        edit_config(cfg)
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2)
    ids = fixed_ids(model.config.vocab_size, seed + 1)
    write_json(os.path.join(out, "expected.json"), expected(out, ids))
    print(f"{name}: {sorted(os.listdir(out))}")


def legacy_neox_rope(cfg):
    """Pythia's config.json spells the rotary settings `rotary_pct` / `rotary_emb_base`."""
    rope = cfg.pop("rope_parameters")
    cfg["rotary_pct"] = rope["partial_rotary_factor"]
    cfg["rotary_emb_base"] = rope["rope_theta"]


def fixtures():
    torch.manual_seed(0)
    small = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, intermediate_size=48, max_position_embeddings=64)

    save_fixture(
        "gpt2-random",
        GPT2LMHeadModel(GPT2Config(vocab_size=96, bos_token_id=0, eos_token_id=0, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=48)),
        seed=10,
    )
    neox = dict(small, num_attention_heads=2, attention_bias=True, tie_word_embeddings=False)
    save_fixture(
        "gpt-neox-parallel",
        GPTNeoXForCausalLM(GPTNeoXConfig(**neox, rotary_pct=0.25, rotary_emb_base=10000, use_parallel_residual=True)),
        seed=20,
    )
    save_fixture(
        "gpt-neox-sequential",
        GPTNeoXForCausalLM(GPTNeoXConfig(**neox, rotary_pct=0.5, rotary_emb_base=500, use_parallel_residual=False)),
        seed=30,
        edit_config=legacy_neox_rope,
    )
    save_fixture(
        "gpt-neox-bf16",
        GPTNeoXForCausalLM(GPTNeoXConfig(**neox, rotary_pct=0.25, use_parallel_residual=True)),
        seed=40,
        dtype=torch.bfloat16,
    )
    mistral = dict(small, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)
    save_fixture(
        "mistral-window-untied",
        MistralForCausalLM(MistralConfig(**mistral, sliding_window=3, tie_word_embeddings=False)),
        seed=50,
    )
    save_fixture(
        "mistral-window-tied",
        MistralForCausalLM(MistralConfig(**mistral, sliding_window=4, tie_word_embeddings=True)),
        seed=60,
    )
    save_fixture(
        "mistral-sharded",
        MistralForCausalLM(MistralConfig(**mistral, sliding_window=None, tie_word_embeddings=False)),
        seed=70,
        shard="20KB",
    )
    save_fixture(
        "llama-bias-headdim",
        LlamaForCausalLM(
            LlamaConfig(
                **dict(small, num_attention_heads=4, num_key_value_heads=1, head_dim=12),
                rope_theta=500.0,
                attention_bias=True,
                mlp_bias=True,
                tie_word_embeddings=True,
            )
        ),
        seed=80,
    )


def shared(models_dir):
    for name in ["gpt2-fake-tiny", "stories260K"]:
        src = os.path.join(models_dir, name)
        if not os.path.isdir(src):
            print(f"skipping {name}: {src} not found")
            continue
        with open(os.path.join(src, "config.json")) as f:
            vocab = json.load(f)["vocab_size"]
        columns = None
        if vocab > MAX_COLUMNS:
            gen = torch.Generator().manual_seed(5)
            columns = sorted(torch.randperm(vocab, generator=gen)[:MAX_COLUMNS].tolist())
        ids = fixed_ids(vocab, 99)
        write_json(os.path.join(FIXTURES, f"shared-{name}-expected.json"), expected(src, ids, columns))
        print(f"shared-{name}-expected.json")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", default=os.path.join(ROOT, "..", "shared", "models"))
    args = parser.parse_args()
    os.makedirs(FIXTURES, exist_ok=True)
    fixtures()
    shared(args.shared)
