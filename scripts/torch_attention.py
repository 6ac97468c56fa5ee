#!/usr/bin/env python3
"""PyTorch's side of `dpo-sam gpu-check --checks attention`: the median time of
torch.nn.functional.scaled_dot_product_attention, forward alone and forward + backward (of
sum(y * r)), in bf16 at the same shapes as src/gpucheck/attention.rs (keep the lists alike):
Pythia-2.8B (8 sequences x 512 tokens, 32 heads of 80, causal) and Mistral-7B (32 query heads,
8 kv heads of 128, causal; its 4096-token window is longer than the sequence). Prints one JSON
object. PyTorch picks its own backend (FlashAttention-2 or memory-efficient attention on an H100).
"""
import json
import statistics
import time

import torch
import torch.nn.functional as F

SHAPES = [
    ("pythia-2.8b", 8, 32, 32, 512, 80),
    ("mistral-7b", 8, 32, 8, 512, 128),
]


def median_s(f, reps):
    for _ in range(2):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        f()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def sdpa(q, k, v):
    if k.shape[1] != q.shape[1]:
        try:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        except TypeError:  # torch < 2.5: repeat the kv heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def main():
    reps, rows = 10, []
    dev = torch.device("cuda")
    for name, b, h, kvh, t, d in SHAPES:
        mk = lambda heads: torch.randn(b, heads, t, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
        q, k, v = mk(h), mk(kvh), mk(kvh)
        r = torch.randn(b, h, t, d, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            fwd = median_s(lambda: sdpa(q, k, v), reps)
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fwd_bwd = median_s(lambda: (sdpa(q, k, v) * r).sum().backward(), reps)
        rows.append({
            "shape": name, "b": b, "heads": h, "kv_heads": kvh, "t": t, "head_dim": d,
            "forward_ms": 1e3 * fwd, "forward_backward_ms": 1e3 * fwd_bwd,
            "peak_over_inputs_mib": (torch.cuda.max_memory_allocated() - before) / 2**20,
        })
    print(json.dumps({"torch": torch.__version__, "dtype": "bf16", "reps": reps, "shapes": rows}))


if __name__ == "__main__":
    main()
