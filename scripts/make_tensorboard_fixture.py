#!/usr/bin/env python3
"""Writes tests/fixtures/tensorboard/events.out.tfevents.fixture with PyTorch's SummaryWriter
(what `transformers`' TensorBoardCallback uses): scalars under TRL's tags at two steps and a
text, as a TRL run logs them. `src/tensorboard.rs`'s tests read it back with dpo-sam's reader
(both CRCs of every record) and re-encode every record byte for byte, so dpo-sam's framing,
checksums and protobuf encoding are those of the reference writer.

Needs torch and tensorboard; Rust tests only read the file it writes.
Usage: python3 scripts/make_tensorboard_fixture.py
"""

import glob
import os
import shutil
import tempfile

from torch.utils.tensorboard import SummaryWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tensorboard", "events.out.tfevents.fixture")


def main():
    with tempfile.TemporaryDirectory() as tmp:
        w = SummaryWriter(log_dir=tmp)
        w.add_text("args", "    learning_rate = 0.005\n    beta = 0.1", 0)
        for step, (loss, acc) in [(1, (0.6925, 0.5)), (2, (0.6123, 0.75))]:
            w.add_scalar("train/loss", loss, step)
            w.add_scalar("train/rewards/accuracies", acc, step)
        w.add_scalar("eval/loss", 0.65, 2)
        w.close()
        (path,) = glob.glob(os.path.join(tmp, "events.out.tfevents.*"))
        os.makedirs(os.path.dirname(OUT), exist_ok=True)
        shutil.copyfile(path, OUT)
    print(OUT, os.path.getsize(OUT), "bytes")


if __name__ == "__main__":
    main()
