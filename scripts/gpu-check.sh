#!/usr/bin/env bash
# The one prepared command for a rented GPU machine (no Rust there), run from the repo root with
# target/cuda/dpo-sam.gz carried along (scripts/build-cuda.sh makes it; see docs/gpu.md).
# Writes $OUT/gpu-check.json (./gpu-check.json without OUT): the device, CUDA-vs-CPU parity,
# data parallelism's NCCL path in a world of one process,
# `dpo-sam bench` at Pythia shapes and the same step in PyTorch, within DPO_SAM_GPU_BUDGET_S
# seconds (default 450) so it fits an 8-minute device slot; steps that no longer fit are
# recorded as skipped rather than cut off mid-way.
set -uo pipefail
cd "$(dirname "$0")/.."

START=$(date +%s)
BUDGET=${DPO_SAM_GPU_BUDGET_S:-450}
OUTDIR=${OUT:-.}
# Each step's output, packed into $OUTDIR/gpu-check-parts.tgz at the end (two files come back).
PARTS=$(mktemp -d)/gpu-check-parts
mkdir -p "$PARTS"
log() { echo "gpu-check [$(( $(date +%s) - START ))s] $*" >&2; }

# Runs a step with a time limit cut to what is left of the budget; its stdout (JSON) goes to
# $PARTS/NAME.json, stderr to $PARTS/NAME.log, and the exit status to $PARTS/NAME.rc.
step() {
  local name=$1 limit=$2; shift 2
  local left=$(( BUDGET - ($(date +%s) - START) ))
  if (( left < 20 )); then
    log "$name: skipped (budget spent)"
    echo skipped >"$PARTS/$name.rc"
    return
  fi
  (( limit > left )) && limit=$left
  log "$name (limit ${limit}s)"
  timeout "$limit" "$@" >"$PARTS/$name.json" 2>"$PARTS/$name.log"
  echo $? >"$PARTS/$name.rc"
  log "$name: exit $(cat "$PARTS/$name.rc")"
}

# The binary links libcudart/cublas/curand 13 dynamically; PyTorch's cu13 wheels carry them.
# Any wheels put in .whl/ (e.g. nvidia-curand, which some torch installs lack) are unpacked too.
LIBS=$(python3 - <<'PY'
import glob, os, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
dirs = []
for r in roots:
    dirs += glob.glob(os.path.join(r, "nvidia", "cu13", "lib")) + glob.glob(os.path.join(r, "nvidia", "*", "lib"))
print(":".join(d for d in dirs if os.path.isdir(d)))
PY
)
WORK=$(mktemp -d)
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
  echo "target/cuda/dpo-sam.gz missing: build it with scripts/build-cuda.sh and carry it" >&2
  exit 1
fi
chmod +x "$BIN"
ldd "$BIN" >"$PARTS/ldd.txt" 2>&1

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$PARTS/nvidia-smi.txt" 2>&1

step parity 150 "$BIN" gpu-check --device cuda:0
# Data parallelism: NCCL initialised in a world of one process, an all-reduce, and two training
# steps through the data-parallel loop against plain ones (the same weights).
step nccl 90 "$BIN" gpu-check --nccl --device cuda:0
SHAPES=(pythia-160m pythia-410m pythia-1.4b pythia-2.8b)
for shape in "${SHAPES[@]}"; do
  step "bench-$shape-f32" 120 "$BIN" bench --shape "$shape" --device cuda --json --variants none,logits --steps 3
  step "torch-$shape-f32" 90 python3 scripts/torch_step.py --shape "$shape" --steps 3
done
for shape in pythia-1.4b pythia-2.8b; do
  step "bench-$shape-bf16" 120 "$BIN" bench --shape "$shape" --device cuda --json --variants none,logits --steps 3 --mixed-precision bf16
  step "torch-$shape-bf16" 90 python3 scripts/torch_step.py --shape "$shape" --steps 3 --dtype bf16
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
        out["stderr_tail"] = (read(name + ".log") or "")[-2000:]
    return out

smi = (read("nvidia-smi.txt") or "").split(", ")
report = {
    "gpu": {"name": smi[0] if smi else None, "memory": smi[1] if len(smi) > 1 else None,
            "driver": smi[2] if len(smi) > 2 else None},
    "missing_libs": [l.strip() for l in (read("ldd.txt") or "").splitlines() if "not found" in l],
    "parity": result("parity"),
    "nccl": result("nccl"),
    "bench": [],
    "wall_s": wall,
}
for dtype, shapes in (("f32", ["pythia-160m", "pythia-410m", "pythia-1.4b", "pythia-2.8b"]),
                      ("bf16", ["pythia-1.4b", "pythia-2.8b"])):
    for shape in shapes:
        ours, torch = result(f"bench-{shape}-{dtype}"), result(f"torch-{shape}-{dtype}")
        row = {"shape": shape, "dtype": dtype, "dpo_sam": ours, "torch": torch}
        try:
            plain = next(v for v in ours["result"]["variants"] if v["variant"] == "none")["median_s"]
            row["ratio_dpo_sam_to_torch"] = plain / torch["result"]["median_s"]
        except (KeyError, StopIteration, TypeError):
            pass
        report["bench"].append(row)
json.dump(report, open(dest, "w"), indent=2)
print(json.dumps({"gpu": report["gpu"], "parity_pass": (report["parity"].get("result") or {}).get("pass"),
                  "nccl_pass": (report["nccl"].get("result") or {}).get("pass"),
                  "ratios": {f'{r["shape"]}/{r["dtype"]}': r.get("ratio_dpo_sam_to_torch") for r in report["bench"]}}))
PY
tar czf "$OUTDIR/gpu-check-parts.tgz" -C "$(dirname "$PARTS")" gpu-check-parts
rm -rf "$WORK" "$(dirname "$PARTS")"
log "wrote $OUTDIR/gpu-check.json and gpu-check-parts.tgz"
