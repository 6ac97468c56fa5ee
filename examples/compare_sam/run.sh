#!/usr/bin/env bash
# DPO vs DPO + logits-SAM on the built-in task, same data, seed and schedule; then one chart per
# metric with both runs. Usage: bash examples/compare_sam/run.sh [OUT_DIR] [extra --set KEY=VALUE ...]
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-runs/compare_sam}
shift || true
# DPO_SAM_BIN: an already-built binary (default: build the release one)
bin=${DPO_SAM_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=target/release/dpo-sam
fi
common=(--config configs/tiny_gpt2.toml --quiet --set training.max_steps=300 --set training.eval_steps=25 "$@")
"$bin" train "${common[@]}" --set sam.kind=none --output-dir "$out/dpo"
"$bin" train "${common[@]}" --set sam.kind=logits --set sam.rho=0.05 --output-dir "$out/logits-sam"
"$bin" plot "$out/dpo" "$out/logits-sam" --label DPO --label "DPO + logits-SAM" --out "$out/charts"
echo "charts in $out/charts"
