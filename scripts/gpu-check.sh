#!/usr/bin/env bash
# The one prepared command for a rented GPU machine (no Rust there), run from the repo root with
# target/cuda/dpo-sam.gz carried along (scripts/build-cuda.sh makes it; see docs/gpu.md). Sized for
# a 15-minute machine: finishes within DPO_SAM_GPU_BUDGET_S seconds (default 480), steps that no
# longer fit are recorded as skipped rather than cut off mid-way, and it returns two files under
# $OUT (./ without OUT): gpu-check.json (everything measured) and gpu-check.log (each step's
# stderr tail). Intermediate files live in a temporary folder outside $OUT.
#
# Order, most important first: each CUDA kernel against its CPU twin (seconds, the fused
# attention's and the tiled output layer's cases included, with the logits-SAM pass's parity and
# its lm_head GEMM count); the fused attention's time beside PyTorch SDPA's at Pythia-2.8B and
# Mistral-7B head shapes; the Pythia-2.8B bf16 step (4 pairs × 512 tokens, activation
# checkpointing), plain and logits-SAM (their ratio: issue 19's ≤ 1.035), beside PyTorch's; whole-model parity; then smaller shapes while time remains.
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET=${DPO_SAM_GPU_BUDGET_S:-480}
OUTDIR=${OUT:-.}
mkdir -p "$OUTDIR"
WORK=$(mktemp -d)
PARTS="$WORK/parts"
mkdir -p "$PARTS"
LOG="$OUTDIR/gpu-check.log"
: >"$LOG"
log() { echo "gpu-check [$(( $(date +%s) - START ))s] $*" | tee -a "$LOG" >&2; }

# Runs a step with a time limit cut to what is left of the budget (steps needing more than is
# left are skipped); its stdout (JSON) goes to $PARTS/NAME.json, stderr to $PARTS/NAME.err (its
# tail also to the log), the exit status to $PARTS/NAME.rc.
step() {
  local name=$1 limit=$2 need=$3; shift 3
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < need )); then
    log "$name: skipped ($left s left, needs $need)"
    echo skipped >"$PARTS/$name.rc"
    return
  fi
  (( limit > left )) && limit=$left
  log "$name (limit ${limit}s)"
  timeout "$limit" "$@" >"$PARTS/$name.json" 2>"$PARTS/$name.err"
  echo $? >"$PARTS/$name.rc"
  { echo "--- $name: exit $(cat "$PARTS/$name.rc"), stderr tail:"; tail -n 15 "$PARTS/$name.err"; } >>"$LOG"
  log "$name: exit $(cat "$PARTS/$name.rc")"
}

# The binary links libcudart/cublas/cublasLt/curand 13 and NCCL dynamically; PyTorch's cu13 wheels carry
# them. Any wheels put in .whl/ (e.g. nvidia-curand, which some torch installs lack) are unpacked too.
LIBS=$(python3 - <<'PY'
import glob, os, site
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = []
for r in roots:
    dirs += glob.glob(os.path.join(r, "nvidia", "cu13", "lib")) + glob.glob(os.path.join(r, "nvidia", "*", "lib"))
print(":".join(d for d in dirs if os.path.isdir(d)))
PY
)
if ls .whl/*.whl >/dev/null 2>&1; then
  for w in .whl/*.whl; do python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$WORK/wheels"; done
  LIBS="$LIBS:$(find "$WORK/wheels" -name 'lib*.so*' -printf '%h\n' | sort -u | paste -sd:)"
fi
export LD_LIBRARY_PATH="$LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

BIN="$WORK/dpo-sam"
if [[ -f target/cuda/dpo-sam.gz ]]; then
  gunzip -c target/cuda/dpo-sam.gz >"$BIN"
elif [[ -x target/cuda/release/dpo-sam ]]; then
  cp target/cuda/release/dpo-sam "$BIN"
else
  log "target/cuda/dpo-sam.gz missing: build it with scripts/build-cuda.sh and carry it"
  exit 1
fi
chmod +x "$BIN"
ldd "$BIN" >"$PARTS/ldd.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader >"$PARTS/nvidia-smi.txt" 2>&1

BENCH=(bench --device cuda --json --variants none,logits --steps 3)
TORCH=(python3 scripts/torch_step.py --steps 3)
BIG=(--pairs 4 --seq-len 512)

step ops 120 20 "$BIN" gpu-check --checks ops
step attention 90 20 "$BIN" gpu-check --checks attention
step torch-attention 60 15 python3 scripts/torch_attention.py
step bench-pythia-2.8b-bf16 240 90 "$BIN" "${BENCH[@]}" --shape pythia-2.8b "${BIG[@]}" --mixed-precision bf16 --gradient-checkpointing
step torch-pythia-2.8b-bf16 150 60 "${TORCH[@]}" --shape pythia-2.8b "${BIG[@]}" --dtype bf16 --gradient-checkpointing
step models 120 30 "$BIN" gpu-check --checks models
# Data parallelism: NCCL initialised in a world of one process, an all-reduce, and two training
# steps through the data-parallel loop against plain ones (the same weights).
step nccl 90 20 "$BIN" gpu-check --checks nccl
for shape in pythia-1.4b pythia-410m pythia-160m; do
  step "bench-$shape-bf16" 120 45 "$BIN" "${BENCH[@]}" --shape "$shape" "${BIG[@]}" --mixed-precision bf16 --gradient-checkpointing
  step "torch-$shape-bf16" 90 30 "${TORCH[@]}" --shape "$shape" "${BIG[@]}" --dtype bf16 --gradient-checkpointing
done
for shape in pythia-410m pythia-160m; do
  step "bench-$shape-f32" 120 45 "$BIN" "${BENCH[@]}" --shape "$shape"
  step "torch-$shape-f32" 90 30 "${TORCH[@]}" --shape "$shape"
done

python3 - "$PARTS" "$OUTDIR/gpu-check.json" "$(( $(date +%s) - START ))" <<'PY'
import json, os, sys
parts, dest, wall = sys.argv[1], sys.argv[2], int(sys.argv[3])

def read(name):
    try:
        return open(os.path.join(parts, name)).read().strip()
    except OSError:
        return None

def result(name):
    rc = read(name + ".rc")
    out = {"exit": rc}
    text = read(name + ".json")
    try:
        out["result"] = json.loads(text)
    except (TypeError, ValueError):
        out["stdout_tail"] = (text or "")[-2000:]
        out["stderr_tail"] = (read(name + ".err") or "")[-2000:]
    return out

smi = (read("nvidia-smi.txt") or "").split(", ")
report = {
    "gpu": {k: (smi[i] if len(smi) > i else None)
            for i, k in enumerate(["name", "memory", "driver", "compute_cap"])},
    "missing_libs": [l.strip() for l in (read("ldd.txt") or "").splitlines() if "not found" in l],
    "ops": result("ops"),
    "attention": result("attention"),
    "torch_attention": result("torch-attention"),
    "models": result("models"),
    "nccl": result("nccl"),
    "bench": [],
    "wall_s": wall,
}
runs = [(s, "bf16") for s in ["pythia-2.8b", "pythia-1.4b", "pythia-410m", "pythia-160m"]]
runs += [(s, "f32") for s in ["pythia-410m", "pythia-160m"]]
for shape, dtype in runs:
    ours, torch = result(f"bench-{shape}-{dtype}"), result(f"torch-{shape}-{dtype}")
    row = {"shape": shape, "dtype": dtype, "dpo_sam": ours, "torch": torch}
    try:
        variants = {v["variant"]: v["median_s"] for v in ours["result"]["variants"]}
        row["logits_sam_to_plain"] = variants["logits"] / variants["none"]
        row["ratio_dpo_sam_to_torch"] = variants["none"] / torch["result"]["median_s"]
    except (KeyError, TypeError, ZeroDivisionError):
        pass
    report["bench"].append(row)
# Attention alone: ours over SDPA's, forward + backward, per shape.
try:
    theirs = {r["shape"]: r for r in report["torch_attention"]["result"]["shapes"]}
    report["attention_ratio_to_sdpa"] = {
        r["shape"]: r["forward_backward_ms"] / theirs[r["shape"]]["forward_backward_ms"]
        for r in report["attention"]["result"]["attention"]["shapes"]}
except (KeyError, TypeError):
    pass
json.dump(report, open(dest, "w"), indent=2)
passed = lambda r: (r.get("result") or {}).get("pass")
print(json.dumps({"gpu": report["gpu"], "ops_pass": passed(report["ops"]), "models_pass": passed(report["models"]),
                  "nccl_pass": passed(report["nccl"]),
                  "attention_ratio_to_sdpa": report.get("attention_ratio_to_sdpa"),
                  "ratios": {f'{r["shape"]}/{r["dtype"]}': r.get("ratio_dpo_sam_to_torch") for r in report["bench"]},
                  "logits_sam_to_plain": {f'{r["shape"]}/{r["dtype"]}': r.get("logits_sam_to_plain") for r in report["bench"]}}))
PY
rm -rf "$WORK"
log "wrote $OUTDIR/gpu-check.json and $LOG"
