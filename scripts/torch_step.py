#!/usr/bin/env python3
"""The PyTorch counterpart of `dpo-sam bench`'s plain step, for a side-by-side ratio on one GPU.

Same work as the Rust bench's `none` variant: a random-weight GPT-NeoX (Pythia shapes) policy's
forward and backward on `pairs` chosen/rejected pairs of `seq_len` random tokens, a frozen
reference's forward, the sigmoid DPO loss, global-norm clipping and an AdamW step. Prints one
JSON object with the median step time. Needs only torch (no transformers), so it runs on any
machine with PyTorch's CUDA wheels. Weights are initialised on the device (a 2.8B model built
on the host takes a minute); `--gradient-checkpointing` recomputes each block in the backward
(torch.utils.checkpoint), as `dpo-sam bench --gradient-checkpointing`.
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

SHAPES = {
    "pythia-70m": (512, 6, 8),
    "pythia-160m": (768, 12, 12),
    "pythia-410m": (1024, 24, 16),
    "pythia-1.4b": (2048, 24, 16),
    "pythia-2.8b": (2560, 32, 32),
}
VOCAB = 50304


class Layer(torch.nn.Module):
    """GPT-NeoX block with parallel residual and rotary on a quarter of each head."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads, self.hd = heads, d // heads
        self.rot = self.hd // 4
        self.ln1, self.ln2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv, self.out = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.up, self.down = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def rope(self, x):
        t = x.shape[2]
        inv = 1.0 / (10000 ** (torch.arange(0, self.rot, 2, device=x.device, dtype=torch.float32) / self.rot))
        ang = torch.outer(torch.arange(t, device=x.device, dtype=torch.float32), inv)
        cos, sin = torch.cat([ang.cos()] * 2, -1).to(x.dtype), torch.cat([ang.sin()] * 2, -1).to(x.dtype)
        r, p = x[..., : self.rot], x[..., self.rot :]
        r1, r2 = r[..., : self.rot // 2], r[..., self.rot // 2 :]
        return torch.cat([r * cos + torch.cat([-r2, r1], -1) * sin, p], -1)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, self.heads, 3 * self.hd).transpose(1, 2).chunk(3, -1)
        a = F.scaled_dot_product_attention(self.rope(q), self.rope(k), v, is_causal=True)
        a = self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + a + self.down(F.gelu(self.up(self.ln2(x))))


class Model(torch.nn.Module):
    def __init__(self, d, layers, heads, checkpointing=False):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, d)
        self.layers = torch.nn.ModuleList(Layer(d, heads) for _ in range(layers))
        self.ln = torch.nn.LayerNorm(d)
        self.head = torch.nn.Linear(d, VOCAB, bias=False)
        self.checkpointing = checkpointing

    def forward(self, ids):
        x = self.emb(ids)
        for layer in self.layers:
            if self.checkpointing and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return self.head(self.ln(x)).float()


def seq_logps(model, ids):
    logp = torch.log_softmax(model(ids[:, :-1]), -1)
    return logp.gather(-1, ids[:, 1:, None]).squeeze(-1).sum(-1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="pythia-160m", choices=sorted(SHAPES))
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--dtype", default="f32", choices=["f32", "bf16"], help="bf16: autocast matmuls")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()

    torch.manual_seed(0)
    # Match candle: plain f32 matmuls, no TF32.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device(args.device)
    with dev:
        policy = Model(*SHAPES[args.shape], checkpointing=args.gradient_checkpointing)
        reference = Model(*SHAPES[args.shape]).requires_grad_(False)
    reference.load_state_dict(policy.state_dict())
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6)
    ids = torch.randint(0, VOCAB, (2 * args.pairs, args.seq_len), device=dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def step():
        with autocast:
            with torch.no_grad():
                ref = seq_logps(reference, ids)
            pol = seq_logps(policy, ids)
        margin = (pol[: args.pairs] - ref[: args.pairs]) - (pol[args.pairs :] - ref[args.pairs :])
        loss = -F.logsigmoid(0.1 * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for i in range(args.steps + 1):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    print(json.dumps({
        "shape": args.shape,
        "pairs": args.pairs,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "torch": torch.__version__,
        "params": sum(p.numel() for p in policy.parameters()),
        "median_s": median,
        "tokens_per_second": 2 * args.pairs * args.seq_len / median,
        "peak_mem_mib": math.ceil(torch.cuda.max_memory_allocated() / 2**20) if dev.type == "cuda" else None,
    }))


if __name__ == "__main__":
    main()
