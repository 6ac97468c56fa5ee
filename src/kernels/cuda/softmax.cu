// Softmax over the last dimension, forward and backward (twin: softmax.rs): one block per row.
#include "common.cuh"

// y = exp(x − max) / Σ exp(x − max).
template <typename T> __device__ void softmax_fwd(const T *x, T *y, int d) {
  __shared__ float scratch[32];
  const size_t row = (size_t)blockIdx.x * d;
  float m = -INFINITY;
  for (int i = threadIdx.x; i < d; i += blockDim.x) m = fmaxf(m, to_f(x[row + i]));
  m = block_max(m, scratch);
  float s = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) s += expf(to_f(x[row + i]) - m);
  s = block_sum(s, scratch);
  // exp is taken again rather than read back from y, which may be bf16.
  for (int i = threadIdx.x; i < d; i += blockDim.x) y[row + i] = from_f<T>(expf(to_f(x[row + i]) - m) / s);
}

// dx = p ⊙ (g − Σ g p).
template <typename T> __device__ void softmax_bwd(const T *p, const T *g, T *dx, int d) {
  __shared__ float scratch[32];
  const size_t row = (size_t)blockIdx.x * d;
  float dot = 0.f;
  for (int i = threadIdx.x; i < d; i += blockDim.x) dot += to_f(g[row + i]) * to_f(p[row + i]);
  dot = block_sum(dot, scratch);
  for (int i = threadIdx.x; i < d; i += blockDim.x)
    dx[row + i] = from_f<T>(to_f(p[row + i]) * (to_f(g[row + i]) - dot));
}

#define SOFTMAX_OPS(T, S)                                                                      \
  extern "C" __global__ void softmax_fwd_##S(const T *x, T *y, int d) { softmax_fwd<T>(x, y, d); } \
  extern "C" __global__ void softmax_bwd_##S(const T *p, const T *g, T *dx, int d) {           \
    softmax_bwd<T>(p, g, dx, d);                                                              \
  }

SOFTMAX_OPS(float, f32)
SOFTMAX_OPS(__nv_bfloat16, bf16)
SOFTMAX_OPS(__half, f16)
