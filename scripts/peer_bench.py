#!/usr/bin/env python3
"""The peer side of `dpo-sam bench` on CPU: the same training steps in PyTorch with
`transformers`' GPT-NeoX (and TRL's DPOTrainer, when installed), same shape and batch.

Random weights of the Pythia-70M/160M shapes, f32, `pairs` chosen/rejected pairs of `seq_len`
random tokens whose first token is the prompt. One step = the policy's forward and backward, a
frozen reference's forward, the sigmoid DPO loss (beta 0.1), global-norm clipping and an AdamW
step. Variants, interleaved as in `dpo-sam bench`:
  none    plain DPO;
  logits  logits-SAM as the paper's Algorithm 1: from the final hidden states H, with H and W
          detached, loss_pre and g = grad(loss_pre, W); e = rho g/||g||; logits from
          linear(H, W + e); loss_post; one backward;
  full    SAM on every weight: forward and backward at W, every weight moved by
          rho g/||g|| (global norm), forward and backward there, weights restored.
Prints a table (or `--json`) of median step times. With `--trl`, also times TRL's DPOTrainer
(plain DPO; TRL has no logits-SAM) on the same batch through a word-level tokenizer whose
tokens map one-to-one to ids, so that it sees exactly `seq_len` tokens per sequence.

  python3 scripts/peer_bench.py --shape pythia-70m --steps 3 [--trl]
"""
import argparse
import copy
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

SHAPES = {"pythia-70m": (512, 6, 8, 2048), "pythia-160m": (768, 12, 12, 3072)}
VOCAB = 50304
BETA = 0.1


def config(shape):
    hidden, layers, heads, inter = SHAPES[shape]
    return GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        intermediate_size=inter, rotary_pct=0.25, rotary_emb_base=10000, max_position_embeddings=2048,
        layer_norm_eps=1e-5, use_parallel_residual=True, hidden_act="gelu", tie_word_embeddings=False,
        bos_token_id=0, eos_token_id=0,
    )


def seq_logps(logits, ids):
    """Sum of log p(response tokens): every token after the one-token prompt."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def dpo_loss(pol, ref, pairs):
    margin = (pol[:pairs] - ref[:pairs]) - (pol[pairs:] - ref[pairs:])
    return -F.logsigmoid(BETA * margin).mean()


def torch_steps(args):
    torch.manual_seed(0)
    policy = GPTNeoXForCausalLM(config(args.shape)).float()
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    ids = torch.randint(0, VOCAB, (2 * args.pairs, args.seq_len))
    head = policy.get_output_embeddings().weight

    def step(variant):
        with torch.no_grad():
            ref = seq_logps(reference(ids).logits, ids)
        if variant == "none":
            loss = dpo_loss(seq_logps(policy(ids).logits, ids), ref, args.pairs)
        elif variant == "full":
            dpo_loss(seq_logps(policy(ids).logits, ids), ref, args.pairs).backward()
            params = [p for p in policy.parameters() if p.grad is not None]
            scale = args.rho / torch.norm(torch.stack([p.grad.norm() for p in params])).clamp_min(1e-12)
            with torch.no_grad():
                shifts = [p.grad * scale for p in params]
                torch._foreach_add_(params, shifts)
            opt.zero_grad(set_to_none=True)
            loss = dpo_loss(seq_logps(policy(ids).logits, ids), ref, args.pairs)
        else:
            h = policy.base_model(ids).last_hidden_state
            # Algorithm 1, lines 1-4: the gradient at W from H and W detached.
            w = head.detach().requires_grad_(True)
            loss_pre = dpo_loss(seq_logps(F.linear(h.detach(), w), ids), ref, args.pairs)
            (g,) = torch.autograd.grad(loss_pre, w)
            e = args.rho * g / g.norm().clamp_min(1e-12)
            # Lines 5-7: the perturbed logits, e constant, and the single backward.
            loss = dpo_loss(seq_logps(F.linear(h, head + e), ids), ref, args.pairs)
        loss.backward()
        if variant == "full":
            with torch.no_grad():
                torch._foreach_sub_(params, shifts)
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = {v: [] for v in args.variants}
    for rnd in range(args.steps + 1):
        for v in args.variants:
            t0 = time.perf_counter()
            step(v)
            if rnd > 0:
                times[v].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def trl_step(args):
    """Median seconds per DPOTrainer optimiser step (plain DPO), or None without TRL."""
    try:
        import trl
        from datasets import Dataset
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast, TrainerCallback
    except ImportError:
        return None
    vocab = {f"t{i}": i for i in range(VOCAB)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="t0", eos_token="t0", unk_token="t1")
    gen = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(f"t{i}" for i in torch.randint(2, VOCAB, (n,), generator=gen).tolist())
    # Completions start with a space so that the prompt's one token stays a prefix.
    rows = [{"prompt": words(1), "chosen": " " + words(args.seq_len - 1), "rejected": " " + words(args.seq_len - 1)}
            for _ in range(args.pairs)]
    steps = args.steps + 1
    data = Dataset.from_list(rows * steps)

    class Clock(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], None

        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.t0)

    clock = Clock()
    cfg = trl.DPOConfig(
        output_dir="/tmp/peer_bench_trl", per_device_train_batch_size=args.pairs, max_steps=steps,
        learning_rate=1e-6, beta=BETA, max_grad_norm=1.0, logging_steps=10**6, save_strategy="no",
        report_to=[], use_cpu=True, max_length=None, dataloader_num_workers=0,
    )
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config(args.shape)).float()
    # Passed explicitly: TRL would otherwise reload the reference from the (absent) Hub name.
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=cfg,
                             train_dataset=data, processing_class=tok, callbacks=[clock])
    trainer.train()
    return {"median_s": statistics.median(clock.times[1:]), "version": trl.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="pythia-70m", choices=sorted(SHAPES))
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant, after one warm-up")
    ap.add_argument("--variants", default="none,logits")
    ap.add_argument("--rho", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--trl", action="store_true", help="also time TRL's DPOTrainer (plain DPO)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.variants = args.variants.split(",")
    unknown = sorted(set(args.variants) - {"none", "logits", "full"})
    if unknown:
        ap.error(f"--variants: unknown {', '.join(unknown)} (expected none, logits, full)")
    torch.set_num_threads(args.threads)

    medians = torch_steps(args)
    report = {
        "shape": args.shape, "pairs": args.pairs, "seq_len": args.seq_len, "steps": args.steps,
        "threads": args.threads, "torch": torch.__version__,
        "variants": [{"variant": v, "median_s": m, "ratio_to_plain": m / medians["none"] if "none" in medians else None}
                     for v, m in medians.items()],
        "trl": trl_step(args) if args.trl else None,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"shape {args.shape} ({args.pairs} pairs x {args.seq_len} tokens, f32, {args.threads} threads, torch {torch.__version__})")
    print(f"{'variant':<12} {'median s':>10} {'ratio':>8}")
    for row in report["variants"]:
        ratio = row["ratio_to_plain"]
        print(f"{'torch ' + row['variant']:<12} {row['median_s']:>10.4f} {ratio if ratio is None else f'{ratio:.3f}':>8}")
    if args.trl:
        trl_row = report["trl"]
        print("trl none: not installed" if trl_row is None else f"{'trl none':<12} {trl_row['median_s']:>10.4f}   (TRL {trl_row['version']})")


if __name__ == "__main__":
    main()
