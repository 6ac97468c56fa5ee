#!/usr/bin/env bash
# Installs a CUDA 13.0 build toolchain from PyPI wheels, so `--features cuda`
# builds on machines without a system CUDA or a GPU (CI, laptops).
#
# Usage: bash scripts/cuda-toolchain.sh [--quiet]
#   DPO_SAM_CUDA_CACHE  install folder (default ~/.cache/dpo-sam/cuda-13.0)
# Prints the `export` lines to build with; `eval "$(bash scripts/cuda-toolchain.sh --quiet)"`.
# A second run finds the `.complete` marker and only prints the exports.
set -euo pipefail

CACHE="${DPO_SAM_CUDA_CACHE:-$HOME/.cache/dpo-sam/cuda-13.0}"
ROOT="$CACHE/nvidia/cu13"
QUIET=0
[[ "${1:-}" == "--quiet" ]] && QUIET=1
log() { [[ $QUIET == 1 ]] || echo "cuda-toolchain: $*" >&2; }

# nvcc must stay on 13.0.x: the GPUs we rent run driver 580 (CUDA 13.0), and
# PTX from a newer nvcc would not load there.
PKGS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.1.0.3
)

print_exports() {
  cat <<EOF
export CUDA_HOME="$ROOT"
export CUDA_PATH="$ROOT"
export PATH="$ROOT/bin:\$PATH"
export LIBRARY_PATH="$ROOT/lib/stubs:$ROOT/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
EOF
}

# Link-time stand-in for NCCL (candle's `nccl` feature links libnccl like cuBLAS; the real
# libnccl.so.2 comes with PyTorch's nvidia-nccl wheel on the GPU machine): one dummy per NCCL
# function that cudarc binds. Also added to an install made before it existed.
nccl_stub() {
  [[ -f "$ROOT/lib/stubs/libnccl.so" ]] && return 0
  local sys
  sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/nccl/sys 2>/dev/null | sort -V | tail -1)
  if [[ -z "$sys" ]]; then
    echo "cudarc sources not found; run 'cargo fetch' in the repo first" >&2
    exit 1
  fi
  mkdir -p "$ROOT/lib/stubs"
  grep -rhoE '\bfn nccl[A-Za-z0-9_]+' "$sys" | sed 's/^fn //' | sort -u |
    awk '{ print "void " $1 "(void) {}" }' >"$ROOT/lib/stubs/libnccl_stub.c"
  gcc -shared -fPIC -Wl,-soname,libnccl.so.2 -o "$ROOT/lib/stubs/libnccl.so" "$ROOT/lib/stubs/libnccl_stub.c"
  log "libnccl stub: $(wc -l <"$ROOT/lib/stubs/libnccl_stub.c") symbols from $sys"
}

if [[ -f "$CACHE/.complete" ]]; then
  log "already installed in $CACHE"
  nccl_stub
  print_exports
  exit 0
fi

mkdir -p "$CACHE/wheels"
log "downloading ${#PKGS[@]} wheels into $CACHE/wheels"
python3 -m pip download --no-deps --only-binary=:all: --dest "$CACHE/wheels" \
  --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --python-version 3.11 "${PKGS[@]}" >&2

log "unpacking"
for w in "$CACHE"/wheels/*.whl; do
  python3 - "$w" "$CACHE" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
done
[[ -x "$ROOT/bin/nvcc" || -f "$ROOT/bin/nvcc" ]] || { echo "nvcc missing under $ROOT/bin" >&2; exit 1; }

# Wheels do not keep Unix modes.
chmod +x "$ROOT"/bin/* 2>/dev/null || true
find "$ROOT" -path '*/bin/*' -type f -exec chmod +x {} + 2>/dev/null || true
find "$ROOT" -path '*/nvvm/bin/*' -type f -exec chmod +x {} + 2>/dev/null || true

# The linker and nvcc expect `libX.so` and `lib64/`, wheels ship only `libX.so.N`.
cd "$ROOT/lib"
for f in lib*.so.*; do
  base="${f%%.so.*}.so"
  [[ -e "$base" ]] || ln -s "$f" "$base"
done
cd "$ROOT"
[[ -e lib64 ]] || ln -s lib lib64

# Link-time stand-in for the driver library (the real one comes with the GPU
# driver): one dummy per driver symbol that cudarc's bindings reference.
CUDARC_SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys 2>/dev/null | sort -V | tail -1)
if [[ -z "$CUDARC_SYS" ]]; then
  echo "cudarc sources not found; run 'cargo fetch' in the repo first" >&2
  exit 1
fi
mkdir -p "$ROOT/lib/stubs"
grep -rhoE '\bfn cu[A-Za-z0-9_]+' "$CUDARC_SYS" | sed 's/^fn //' | sort -u |
  awk '{ print "void " $1 "(void) {}" }' >"$ROOT/lib/stubs/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$ROOT/lib/stubs/libcuda.so" "$ROOT/lib/stubs/libcuda_stub.c"
log "libcuda stub: $(wc -l <"$ROOT/lib/stubs/libcuda_stub.c") symbols from $CUDARC_SYS"

nccl_stub

"$ROOT/bin/nvcc" --version >&2
rm -rf "$CACHE/wheels"
touch "$CACHE/.complete"
log "installed in $CACHE"
print_exports
