// LayerNorm and RMSNorm over the last dimension, forward and backward (twin: norm.rs). One block
// per row for the forward and for dx; the weight and bias gradients are column sums over the rows
// (a second kernel, from the per-row statistics the first one saved), so no atomics and the same
// result on every run.
#include "common.cuh"

// (mean, 1/sqrt(var + eps)) of a row for LayerNorm (`centered`), (0, 1/sqrt(mean(x²) + eps)) for
// RMSNorm, as the CPU twin's `moments` and `rms`.
template <typename T>
__device__ __forceinline__ float2 row_stats(const T *x, int d, float eps, bool centered,
                                            float *scratch) {
  float mean = 0.f;
  if (centered) {
    float s = 0.f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) s += to_f(x[i]);
    mean = block_sum(s, scratch) / d;
  }
  float s2 = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float c = to_f(x[i]) - mean;
    s2 += c * c;
  }
  return make_float2(mean, 1.f / sqrtf(block_sum(s2, scratch) / d + eps));
}

// y = (x − mean) · rstd · w (+ b): row blockIdx.x.
template <typename T>
__device__ void norm_fwd(const T *x, const T *w, const T *b, T *y, int d, float eps,
                         bool centered) {
  __shared__ float scratch[32];
  const size_t row = (size_t)blockIdx.x * d;
  const float2 st = row_stats(x + row, d, eps, centered, scratch);
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    float v = (to_f(x[row + i]) - st.x) * st.y * to_f(w[i]);
    if (b) v += to_f(b[i]);
    y[row + i] = from_f<T>(v);
  }
}

// dx = rstd (ĝ − mean(ĝ) − x̂ mean(ĝ x̂)) with ĝ = g ⊙ w (RMSNorm drops mean(ĝ)), for row
// blockIdx.x; saves (mean, rstd) of the row in `stats` for the column sums.
template <typename T>
__device__ void norm_bwd_rows(const T *x, const T *w, const T *g, T *dx, float2 *stats, int d,
                              float eps, bool centered) {
  __shared__ float scratch[32];
  const size_t row = (size_t)blockIdx.x * d;
  const float2 st = row_stats(x + row, d, eps, centered, scratch);
  float sum_g = 0.f, sum_gx = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float gh = to_f(g[row + i]) * to_f(w[i]);
    sum_g += gh;
    sum_gx += gh * ((to_f(x[row + i]) - st.x) * st.y);
  }
  const float mean_g = centered ? block_sum(sum_g, scratch) / d : 0.f;
  const float mean_gx = block_sum(sum_gx, scratch) / d;
  for (int i = threadIdx.x; i < d; i += blockDim.x) {
    const float xhat = (to_f(x[row + i]) - st.x) * st.y;
    dx[row + i] = from_f<T>(st.y * (to_f(g[row + i]) * to_f(w[i]) - mean_g - xhat * mean_gx));
  }
  if (threadIdx.x == 0) stats[blockIdx.x] = st;
}

// dw = Σ_rows g ⊙ x̂ and db = Σ_rows g (db may be null), blocks of 32 × COL_ROWS threads.
template <typename T>
__device__ void norm_bwd_cols(const T *x, const T *g, const float2 *stats, T *dw, T *db,
                              int rows, int d) {
  column_sums(
      rows, d,
      [&](int r, int c) {
        const size_t i = (size_t)r * d + c;
        const float gv = to_f(g[i]);
        return make_float2(gv * ((to_f(x[i]) - stats[r].x) * stats[r].y), gv);
      },
      [&](int c, float a, float b) {
        dw[c] = from_f<T>(a);
        if (db) db[c] = from_f<T>(b);
      });
}

#define NORM_OPS(T, S)                                                                        \
  extern "C" __global__ void norm_fwd_##S(const T *x, const T *w, const T *b, T *y, int d,      \
                                          float eps, int centered) {                           \
    norm_fwd<T>(x, w, b, y, d, eps, centered);                                                 \
  }                                                                                            \
  extern "C" __global__ void norm_bwd_rows_##S(const T *x, const T *w, const T *g, T *dx,       \
                                               float2 *stats, int d, float eps, int centered) { \
    norm_bwd_rows<T>(x, w, g, dx, stats, d, eps, centered);                                    \
  }                                                                                            \
  extern "C" __global__ void norm_bwd_cols_##S(const T *x, const T *g, const float2 *stats,     \
                                               T *dw, T *db, int rows, int d) {                 \
    norm_bwd_cols<T>(x, g, stats, dw, db, rows, d);                                            \
  }

NORM_OPS(float, f32)
NORM_OPS(__nv_bfloat16, bf16)
NORM_OPS(__half, f16)
