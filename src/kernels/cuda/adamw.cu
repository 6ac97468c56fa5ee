// The optimiser over all parameters in one launch per pass (twin: adamw.rs's CPU kernels and
// optim.rs): Σ g² per chunk, the global norm and clipping factor, and the AdamW (or SGD) update
// of the f32 weights and moments, writing the half-precision copy of each weight in the same pass
// under mixed precision. A parameter is a `Slot`; block b works on one chunk of `chunk` elements
// of the slot whose chunks start at or before b (`chunk_start`, a prefix sum with `count + 1`
// entries, searched by bisection).
#include "common.cuh"

// Mirrors `Slot` in adamw.rs (repr(C)).
struct Slot {
  float *w;
  float *m;
  float *v;
  const float *g;
  void *copy;  // the bf16/f16 weight written after the update, or null
  unsigned long long n;
  float keep;  // 1 − lr · weight decay (1 for biases and norm weights)
  float unused;
};

__device__ __forceinline__ int slot_of(const unsigned *chunk_start, int count) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (chunk_start[mid] <= blockIdx.x) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// partials[b] = Σ g² over block b's chunk.
extern "C" __global__ void sumsq(const Slot *slots, const unsigned *chunk_start, int count,
                                 int chunk, double *partials) {
  __shared__ float scratch[32];
  const int i = slot_of(chunk_start, count);
  const Slot s = slots[i];
  const unsigned long long first = (unsigned long long)(blockIdx.x - chunk_start[i]) * chunk;
  const unsigned long long end = min(first + (unsigned long long)chunk, s.n);
  float acc = 0.f;
  for (unsigned long long k = first + threadIdx.x; k < end; k += blockDim.x) acc += s.g[k] * s.g[k];
  acc = block_sum(acc, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// One block: out = [‖g‖, clipping factor] from the partial sums, the factor as
// torch.nn.utils.clip_grad_norm_ computes it (1 when max_norm is 0 or the norm is within it).
extern "C" __global__ void clip_factor(const double *partials, int n, double max_norm, float *out) {
  __shared__ double scratch[32];
  double acc = 0.0;
  for (int k = threadIdx.x; k < n; k += blockDim.x) acc += partials[k];
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if ((threadIdx.x & 31) == 0) scratch[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += scratch[w];
    const double norm = sqrt(total);
    out[0] = (float)norm;
    out[1] = (max_norm > 0.0 && norm > max_norm) ? (float)(max_norm / (norm + 1e-6)) : 1.f;
  }
}

__device__ __forceinline__ void write_copy(void *copy, int kind, unsigned long long k, float w) {
  if (kind == 1) ((__nv_bfloat16 *)copy)[k] = __float2bfloat16(w);
  else if (kind == 2) ((__half *)copy)[k] = __float2half(w);
}

// AdamW, as adamw.rs's CPU kernels (the clipping factor clip[1] scales each gradient read):
// m ← β₁ m + (1 − β₁) g, v ← β₂ v + (1 − β₂) g², w ← w·keep − lr · (m / bc₁) / (√(v / bc₂) + eps).
// `copy_kind`: 0 none, 1 bf16, 2 f16.
extern "C" __global__ void adamw(const Slot *slots, const unsigned *chunk_start, int count,
                                 int chunk, const float *clip, float lr, float beta1, float rest1,
                                 float beta2, float rest2, float eps, float inv_bc1, float inv_bc2,
                                 int copy_kind) {
  const int i = slot_of(chunk_start, count);
  const Slot s = slots[i];
  const float scale = clip[1];
  const unsigned long long first = (unsigned long long)(blockIdx.x - chunk_start[i]) * chunk;
  const unsigned long long end = min(first + (unsigned long long)chunk, s.n);
  for (unsigned long long k = first + threadIdx.x; k < end; k += blockDim.x) {
    const float g = s.g[k] * scale;
    const float m = beta1 * s.m[k] + rest1 * g;
    const float v = beta2 * s.v[k] + rest2 * (g * g);
    const float w = s.w[k] * s.keep - lr * (m * inv_bc1) / (sqrtf(v * inv_bc2) + eps);
    s.m[k] = m;
    s.v[k] = v;
    s.w[k] = w;
    if (s.copy) write_copy(s.copy, copy_kind, k, w);
  }
}

// SGD: w ← w·keep − (lr · clip factor) · g.
extern "C" __global__ void sgd(const Slot *slots, const unsigned *chunk_start, int count, int chunk,
                               const float *clip, float lr, int copy_kind) {
  const int i = slot_of(chunk_start, count);
  const Slot s = slots[i];
  const float step = lr * clip[1];
  const unsigned long long first = (unsigned long long)(blockIdx.x - chunk_start[i]) * chunk;
  const unsigned long long end = min(first + (unsigned long long)chunk, s.n);
  for (unsigned long long k = first + threadIdx.x; k < end; k += blockDim.x) {
    const float w = s.w[k] * s.keep - step * s.g[k];
    s.w[k] = w;
    if (s.copy) write_copy(s.copy, copy_kind, k, w);
  }
}
