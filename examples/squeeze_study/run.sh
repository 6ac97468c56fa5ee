#!/usr/bin/env bash
# The squeeze study: a ρ sweep of DPO vs DPO + logits-SAM on the real pretrained stories260K model
# with real Anthropic HH pairs (../shared), then the sharpness (`dpo-sam sharpness`) of every final
# checkpoint, a table and charts.
#
# Usage: bash examples/squeeze_study/run.sh [OUT_DIR]       (default runs/squeeze_study)
#   DPO_SAM_BIN   an already-built binary (default: build the release one)
#   RHOS          the sweep (default "0 0.03 0.1 0.3"; 0 is plain DPO)
#   SEEDS         training seeds (default "1")
#   PROBES        Hutchinson probes per checkpoint (default 12; the same probes for every
#                 checkpoint, so differences between runs are paired)
#   SHARED        the shared material (default ../shared)
# Finished runs are kept: rerunning skips them and only redoes what is missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-runs/squeeze_study}
shared=${SHARED:-../shared}
rhos=${RHOS:-"0 0.03 0.1 0.3"}
seeds=${SEEDS:-1}
probes=${PROBES:-12}
model=$shared/models/stories260K
hh=$shared/data/hh-rlhf/helpful-base-test.jsonl.gz
for need in "$model/model.safetensors" "$hh"; do
  [ -e "$need" ] || { echo "needs $need (the shared material; set SHARED=...)" >&2; exit 1; }
done
bin=${DPO_SAM_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --quiet
  bin=target/release/dpo-sam
fi

# 256 training pairs and the next 128 as held-out pairs, in file order.
mkdir -p "$out/data"
zcat "$hh" | sed -n '1,256p' > "$out/data/train.jsonl"
zcat "$hh" | sed -n '257,384p' > "$out/data/eval.jsonl"
data=(--set "data.train=\"$out/data/train.jsonl\"" --set "data.eval=\"$out/data/eval.jsonl\""
      --set "model.name_or_path=\"$model\"")
# Sharpness on the first 32 training pairs, with the same tokenisation as training.
measure=(--ref-model "$model" --data "$out/data/train.jsonl" --format hh --max-length 192
         --max-prompt-length 96 --pairs 32 --probes "$probes" --json)

runs=()
for seed in $seeds; do
  for rho in $rhos; do
    run=$out/seed${seed}_rho$rho
    kind=logits
    [ "$rho" = 0 ] && kind=none
    if [ ! -f "$run/model.safetensors" ]; then
      start=$(date +%s)
      "$bin" train --config examples/squeeze_study/study.toml --quiet "${data[@]}" \
        --set seed="$seed" --set sam.kind="$kind" --set sam.rho="$rho" --output-dir "$run" \
        > "$run.log" 2>&1 || { cat "$run.log" >&2; exit 1; }
      echo "trained $run in $(( $(date +%s) - start )) s"
    fi
    if [ ! -f "$run/sharpness.json" ]; then
      start=$(date +%s)
      "$bin" sharpness --model "$run" "${measure[@]}" > "$run/sharpness.json" 2> "$run/sharpness.log"
      echo "measured $run in $(( $(date +%s) - start )) s"
    fi
    runs+=("$run")
  done
done
if [ ! -f "$out/start_sharpness.json" ]; then
  "$bin" sharpness --model "$model" "${measure[@]}" > "$out/start_sharpness.json" 2> /dev/null
fi

# The table: held-out metrics at the last step, the last logged training loss, sharpness. The
# parameter-Hessian trace is also given as a difference from the same seed's DPO run, paired
# probe by probe (the probes are the same), which cancels most of Hutchinson's noise.
{
  echo "| run | ρ | held-out Δ log π(chosen) | held-out Δ log π(rejected) | held-out reward accuracy | held-out loss | train loss | y* prob. (held-out chosen) | tr ∇²_θ L (± s.e.) | − DPO's, paired (± s.e.) | tr ∇²_z L | Σ_t tr H_z per response |"
  echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
  jq -r '"| start (SFT) | – | 0 | 0 | – | – | \(.loss | .*1e4 | round / 1e4) | – | \(.param_hessian_trace | .*10 | round / 10) ± \(.param_hessian_trace_stderr | .*10 | round / 10) | – | \(.logit_hessian_trace | .*1e4 | round / 1e4) | \(.ce_logit_hessian_trace_per_sequence | .*100 | round / 100) |"' \
    "$out/start_sharpness.json"
  for run in "${runs[@]}"; do
    rho=${run##*_rho}
    name=${run##*/}
    base=${run%_rho*}_rho0/sharpness.json
    [ -f "$base" ] || base=$run/sharpness.json
    eval_line=$(grep '"eval_loss"' "$run/metrics.jsonl" | tail -n 1)
    train_line=$(grep '"rewards/accuracies"' "$run/metrics.jsonl" | tail -n 1)
    jq -n -r --arg name "$name" --arg rho "$rho" --argjson e "$eval_line" --argjson t "$train_line" \
      --slurpfile s "$run/sharpness.json" --slurpfile b "$base" '
      def r(n): . * n | round / n;
      ([$s[0].probes, $b[0].probes] | transpose | map(.[0] - .[1])) as $d
      | ($d | length) as $k | ($d | add / $k) as $m
      | (if $k > 1 then ($d | map(pow(. - $m; 2)) | add / ($k - 1) / $k | sqrt) else 0 end) as $se
      | "| \($name) | \($rho) | \($e["eval_squeeze/chosen_logps_delta"] | r(100)) | \($e["eval_squeeze/rejected_logps_delta"] | r(100)) | \($e["eval_rewards/accuracies"] | r(1000)) | \($e["eval_loss"] | r(10000)) | \($t["loss"] | r(10000)) | \($e["eval_squeeze/top_nontarget_prob"] | r(10000)) | \($s[0].param_hessian_trace | r(10)) ± \($s[0].param_hessian_trace_stderr | r(10)) | \($m | r(10)) ± \($se | r(10)) | \($s[0].logit_hessian_trace | r(10000)) | \($s[0].ce_logit_hessian_trace_per_sequence | r(100)) |"'
  done
} > "$out/table.md"
cat "$out/table.md"

# Charts of every metric over the steps, one line per run.
labels=()
for run in "${runs[@]}"; do labels+=(--label "${run##*/}"); done
"$bin" plot "${runs[@]}" "${labels[@]}" --out "$out/charts" > /dev/null
echo "table in $out/table.md, charts in $out/charts"
