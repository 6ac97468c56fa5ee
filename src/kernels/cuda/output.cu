// The tiled output layer's row kernels (twin: output.rs). cuBLASLt computes each tile of logits
// z = H W[v0:v0+vn]ᵀ into f32 (bias not added); these turn one tile into the forward's running
// log-sum-exp and the backward's ∂L/∂logits (the bias gradient, their column sums, is dense.cu's
// `col_sum_add`). One block per row of the tile; `T` is the storage type of the weight, the bias
// and the backward's G (the GEMMs' input type).
#include "common.cuh"

// Folds the tile's row into the running max m and s = Σ exp(z + b − m) of token r (state of
// earlier tiles ignored when `first`), keeps the target's logit zt if it lies in [v0, v0 + vn),
// and on the `last` tile writes the token log-prob (zt − m) − ln s and the log-sum-exp m + ln s.
// `bias` (null when there is none) and `targets`, `m`, `s`, `zt`, `out`, `lse` start at the
// tile's first vocabulary entry and first row.
template <typename T>
__device__ void logps_fwd(const float *z, const T *bias, const uint32_t *targets, float *m, float *s,
                          float *zt, float *out, float *lse, int vn, int v0, int first, int last) {
  __shared__ float scratch[32];
  const int r = blockIdx.x;
  const float *row = z + (size_t)r * vn;
  auto at = [&](int i) { return row[i] + (bias ? to_f(bias[i]) : 0.f); };
  float tile_max = -INFINITY;
  for (int i = threadIdx.x; i < vn; i += blockDim.x) tile_max = fmaxf(tile_max, at(i));
  tile_max = block_max(tile_max, scratch);
  float tile_sum = 0.f;
  for (int i = threadIdx.x; i < vn; i += blockDim.x) tile_sum += expf(at(i) - tile_max);
  tile_sum = block_sum(tile_sum, scratch);
  if (threadIdx.x != 0) return;
  float mx = tile_max, sum = tile_sum, target = first ? 0.f : zt[r];
  if (!first) {
    mx = fmaxf(m[r], tile_max);
    sum = s[r] * expf(m[r] - mx) + tile_sum * expf(tile_max - mx);
  }
  const int t = (int)targets[r] - v0;
  if (t >= 0 && t < vn) target = at(t);
  m[r] = mx;
  s[r] = sum;
  zt[r] = target;
  if (last) {
    out[r] = (target - mx) - logf(sum);
    lse[r] = mx + logf(sum);
  }
}

// G = dlogp ⊙ (onehot(target) − exp(z + b − lse)) for one row of the tile, written as T.
template <typename T>
__device__ void logps_bwd(const float *z, const T *bias, const uint32_t *targets, const float *dlogp,
                          const float *lse, T *g, int vn, int v0) {
  const int r = blockIdx.x;
  const float *row = z + (size_t)r * vn;
  T *out = g + (size_t)r * vn;
  const float coef = dlogp[r], l = lse[r];
  const int t = (int)targets[r] - v0;
  for (int i = threadIdx.x; i < vn; i += blockDim.x) {
    const float p = expf(row[i] + (bias ? to_f(bias[i]) : 0.f) - l);
    out[i] = from_f<T>(coef * ((i == t ? 1.f : 0.f) - p));
  }
}

#define OUTPUT_OPS(T, S)                                                                          \
  extern "C" __global__ void logps_fwd_##S(const float *z, const T *bias, const uint32_t *targets, \
                                           float *m, float *s, float *zt, float *out, float *lse,  \
                                           int vn, int v0, int first, int last) {                  \
    logps_fwd<T>(z, bias, targets, m, s, zt, out, lse, vn, v0, first, last);                      \
  }                                                                                                \
  extern "C" __global__ void logps_bwd_##S(const float *z, const T *bias, const uint32_t *targets, \
                                           const float *dlogp, const float *lse, T *g, int vn,     \
                                           int v0) {                                               \
    logps_bwd<T>(z, bias, targets, dlogp, lse, g, vn, v0);                                         \
  }

OUTPUT_OPS(float, f32)
OUTPUT_OPS(__nv_bfloat16, bf16)
OUTPUT_OPS(__half, f16)
