#!/usr/bin/env bash
# Builds the CUDA binary into its own target dir (target/cuda), so the CPU
# build's artefacts are never invalidated, and gzips it for carrying to a GPU
# machine (target/cuda/dpo-sam.gz, see docs/gpu.md).
#   CUDA_COMPUTE_CAP  kernels' SM target (default 90: H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."

# cudarc's sources must be on disk before the toolchain script lists the driver
# symbols its libcuda stub needs (a fresh machine has no registry sources yet).
cargo fetch
if ! exports=$(bash scripts/cuda-toolchain.sh --quiet); then
  echo "build-cuda: scripts/cuda-toolchain.sh failed; run it without --quiet to see why" >&2
  exit 1
fi
eval "$exports"
export CARGO_TARGET_DIR="$PWD/target/cuda"

start=$(date +%s)
cargo build --release --features cuda
echo "build-cuda: cargo build took $(( $(date +%s) - start ))s" >&2

bin="$CARGO_TARGET_DIR/release/dpo-sam"
gzip -c "$bin" >"$CARGO_TARGET_DIR/dpo-sam.gz"
ls -l "$bin" "$CARGO_TARGET_DIR/dpo-sam.gz" >&2
