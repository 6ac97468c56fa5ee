#!/usr/bin/env python3
"""Reads a dpo-sam run's TensorBoard event files with TensorBoard's own reader and checks them
against the run's metrics.jsonl and samples.jsonl.

    pip install tensorboard
    python3 scripts/check_tensorboard.py runs/tiny_gpt2 [--run-dir runs/tiny_gpt2/runs/<name>]

Checks, per run directory under OUTPUT_DIR/runs/ (or the one given):
  - every record parses (TensorBoard's record reader verifies both masked CRC32Cs);
  - every numeric field of every metrics.jsonl line with a `step` is a scalar under
    transformers' TensorBoardCallback tag (`train/<key>`, `eval/<key>` for `eval_<key>`) at
    that step, equal as float32, and nothing else is;
  - no tag has two values for one step (a resumed run appends, never repeats);
  - the texts `args` (the config) and `model_config` exist, and each samples.jsonl line is the
    text `samples/<index>` at its step.
Exits 1 with the differences otherwise. Without `tensorboard` installed it says so and exits 2.
"""

import argparse
import json
import math
import struct
import sys
from collections import defaultdict
from pathlib import Path


def f32(x):
    return struct.unpack("f", struct.pack("f", x))[0]


def tag_of(key):
    return "eval/" + key[len("eval_"):] if key.startswith("eval_") else "train/" + key


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output_dir", type=Path)
    ap.add_argument("--run-dir", type=Path, help="one directory of event files (default: the only one under runs/)")
    args = ap.parse_args()
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError:
        print("tensorboard is not installed (pip install tensorboard); nothing checked")
        return 2

    run_dir = args.run_dir
    if run_dir is None:
        dirs = sorted(p for p in (args.output_dir / "runs").iterdir() if p.is_dir())
        if len(dirs) != 1:
            print(f"expected one run directory under {args.output_dir / 'runs'}, found {len(dirs)}: pass --run-dir")
            return 1
        run_dir = dirs[0]

    acc = event_accumulator.EventAccumulator(
        str(run_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0}
    )
    acc.Reload()
    tags = acc.Tags()
    problems = []

    # Scalars: what TensorBoard holds, per tag and step.
    seen = defaultdict(dict)
    for tag in tags["scalars"]:
        for ev in acc.Scalars(tag):
            if ev.step in seen[tag]:
                problems.append(f"{tag}: two values at step {ev.step}")
            seen[tag][ev.step] = ev.value

    want = defaultdict(dict)
    for i, line in enumerate((args.output_dir / "metrics.jsonl").read_text().splitlines()):
        row = json.loads(line)
        if "step" not in row:
            continue
        for k, v in row.items():
            if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                continue
            want[tag_of(k)][row["step"]] = f32(float(v))

    n = 0
    for tag in sorted(set(want) | set(seen)):
        w, s = want.get(tag, {}), seen.get(tag, {})
        for step in sorted(set(w) | set(s)):
            if step not in s:
                problems.append(f"{tag} step {step}: in metrics.jsonl, not in TensorBoard")
            elif step not in w:
                problems.append(f"{tag} step {step}: in TensorBoard, not in metrics.jsonl")
            elif s[step] != w[step]:
                problems.append(f"{tag} step {step}: TensorBoard {s[step]} != metrics.jsonl {w[step]}")
            else:
                n += 1

    # Texts: the text plugin's string tensors.
    texts = defaultdict(dict)
    for tag in tags["tensors"]:
        for ev in acc.Tensors(tag):
            texts[tag][ev.step] = ev.tensor_proto.string_val[0].decode()
    for t in ("args/text_summary", "model_config/text_summary"):
        if t not in texts:
            problems.append(f"text {t} missing")
    samples = args.output_dir / "samples.jsonl"
    n_samples = 0
    if samples.exists():
        for line in samples.read_text().splitlines():
            s = json.loads(line)
            got = texts.get(f"samples/{s['index']}/text_summary", {}).get(s["step"])
            completion = "\n".join("    " + l for l in s["completion"].splitlines())
            if got is None:
                problems.append(f"sample {s['index']} at step {s['step']}: no text")
            elif completion not in got:
                problems.append(f"sample {s['index']} at step {s['step']}: the text lacks its completion")
            else:
                n_samples += 1

    for p in problems[:50]:
        print("MISMATCH", p)
    print(
        f"{run_dir}: {n} scalars over {len(seen)} tags match metrics.jsonl, "
        f"{n_samples} samples match samples.jsonl, texts: {sorted(texts)[:4]}…; {len(problems)} problems"
    )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
