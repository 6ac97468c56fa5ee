#!/usr/bin/env python3
"""Writes tests/fixtures/trl_step/, which `tests/trl_parity.rs` compares `dpo-sam train` against.

Runs real TRL (`trl.DPOTrainer`, TRL 1.x) on CPU for one epoch of a tiny, seeded, random GPT-2
saved by `transformers` with the character-level tokenizer of dpo-sam's built-in model:

- six explicit preference pairs (data.jsonl), of which one has a prompt of `max_length` tokens
  (TRL drops it, dpo-sam skips it as `prompt_too_long`) and two are cut at `max_length`
  (TRL's `keep_start`: the first `max_length` tokens of prompt + response + EOS);
- micro-batches of 2 pairs, 2 accumulated per step, in file order (`train_sampling_strategy =
  "sequential"`): 5 pairs make micro-batches of 2, 2 and 1, so step 1 has two micro-batches
  and step 2 the one pair left, as HF's Trainer cuts an epoch;
- loss `sigmoid` + 0.3 × `sft` (TRL's token-mean NLL), AdamW with weight decay, a linear
  schedule and clipping at a norm the gradients exceed.

expected.json holds TRL's config, the tokenised pairs as TRL's DPOTrainer made them, each
pair's log-probs under the initial policy as `DPOTrainer.compute_ref_log_probs` computes
them, and the metrics TRL logged at each step; step1.safetensors and step2.safetensors hold
the weights after each optimiser step.

Needs torch, transformers and trl; Rust tests only read the files it writes.
Usage: python3 scripts/make_trl_fixture.py
"""

import json
import os
import shutil
import tempfile

import torch
import transformers
import trl
from datasets import Dataset
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback
from trl import DPOConfig, DPOTrainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "trl_step")
# Must match BUILTIN_CHARS in src/tokenizer.rs; id 0 is <|endoftext|>.
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-=:?.,\n"
EOS = "<|endoftext|>"
MAX_LENGTH = 16
PAIRS = [
    {"prompt": "1+2=", "chosen": "3", "rejected": "12"},
    # prompt 12 + rejected 19 + EOS: cut to 16 tokens
    {"prompt": "what is 7-5?", "chosen": " 2.", "rejected": " it is 12, i think."},
    {"prompt": "q: 9+9\na:", "chosen": " 18", "rejected": " 99"},
    # a prompt of 16 tokens leaves no room: dropped
    {"prompt": "a long prompt, x", "chosen": " y", "rejected": " z"},
    {"prompt": "sort dcba=", "chosen": "abcd", "rejected": "dcba"},
    # chosen cut at 16
    {"prompt": "rev abc=", "chosen": "cba, yes it is cba", "rejected": "abc"},
]
ARGS = dict(
    beta=0.1,
    learning_rate=1e-2,
    per_device_train_batch_size=2,
    gradient_accumulation_steps=2,
    num_train_epochs=1,
    lr_scheduler_type="linear",
    warmup_steps=0,
    weight_decay=0.01,
    max_grad_norm=0.05,
    max_length=MAX_LENGTH,
    loss_type=["sigmoid", "sft"],
    loss_weights=[1.0, 0.3],
    logging_steps=1,
    seed=7,
)


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


def make_model(out):
    torch.manual_seed(3)
    cfg = GPT2Config(vocab_size=len(CHARS) + 1, bos_token_id=0, eos_token_id=0, n_embd=16, n_layer=2,
                     n_head=2, n_positions=32, n_inner=32)
    model = GPT2LMHeadModel(cfg).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() >= 2:
                p.copy_(noise * 0.15)
            elif name.endswith("bias"):
                p.copy_(noise * 0.1)
            else:
                p.copy_(1.0 + noise * 0.2)
    model.save_pretrained(out)
    gen_cfg = os.path.join(out, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)
    with open(os.path.join(out, "tokenizer.json"), "w") as f:
        json.dump(tokenizer_json(), f)
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
                   "unk_token": EOS, "model_max_length": 32}, f, indent=2)


def weights(model):
    # Tied: lm_head.weight is transformer.wte.weight, which dpo-sam saves once, as the source does.
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if not k.startswith("lm_head")}


class SaveWeights(TrainerCallback):
    def on_step_end(self, args, state, control, model=None, **kwargs):
        save_file(weights(model), os.path.join(OUT, f"step{state.global_step}.safetensors"))


def main():
    shutil.rmtree(OUT, ignore_errors=True)
    os.makedirs(OUT)
    model_dir = os.path.join(OUT, "model")
    make_model(model_dir)
    with open(os.path.join(OUT, "data.jsonl"), "w") as f:
        for p in PAIRS:
            f.write(json.dumps(p) + "\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(output_dir=tmp, report_to=[], bf16=False, use_cpu=True, gradient_checkpointing=False,
                         train_sampling_strategy="sequential", save_strategy="no", dataloader_drop_last=False,
                         **ARGS)
        trainer = DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(PAIRS),
                             processing_class=tokenizer, callbacks=[SaveWeights()])
        pairs = []
        for ex in trainer.train_dataset:
            batch = trainer.data_collator([ex])
            chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
            pairs.append({"prompt_ids": ex["prompt_ids"], "chosen_ids": ex["chosen_ids"],
                          "rejected_ids": ex["rejected_ids"], "chosen_logps": chosen.item(),
                          "rejected_logps": rejected.item()})
        trainer.train()
        steps = [h for h in trainer.state.log_history if "loss" in h]
    expected = {
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "args": ARGS,
        "pairs": pairs,
        "steps": steps,
    }
    with open(os.path.join(OUT, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {sorted(os.listdir(OUT))}; {len(pairs)} pairs kept, {len(steps)} steps")


if __name__ == "__main__":
    main()
