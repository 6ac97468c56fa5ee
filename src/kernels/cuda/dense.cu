// The dense layers' elementwise parts (twin: dense.rs): the MLP activations, the gated MLP's
// act(gate) ⊙ up, each forward and backward, and the column sums a bias gradient needs where
// cuBLASLt's BGRADB epilogue is not available. Elementwise kernels use a grid-stride loop.
#include "common.cuh"

// Activation kinds, in the order of `CudaActivation` in dense.rs.
#define GELU_TANH 0
#define GELU_ERF 1
#define RELU 2
#define SILU 3

// (act(x), act'(x)), with the CPU twin's formulas.
__device__ __forceinline__ float2 act(float x, int kind) {
  switch (kind) {
  case GELU_TANH: {
    const float k = 0.7978845608028654f;
    const float u = k * (x + 0.044715f * x * x * x);
    const float th = tanhf(u);
    const float du = k * (1.f + 3.f * 0.044715f * x * x);
    const float half = 0.5f * (1.f + th);
    return make_float2(x * half, half + 0.5f * x * (1.f - th * th) * du);
  }
  case GELU_ERF: {
    const float cdf = 0.5f * (1.f + erff(x * 0.7071067811865476f));
    const float pdf = expf(-0.5f * x * x) * 0.3989422804014327f;
    return make_float2(x * cdf, cdf + x * pdf);
  }
  case RELU:
    return x > 0.f ? make_float2(x, 1.f) : make_float2(0.f, 0.f);
  default: {
    const float s = 1.f / (1.f + expf(-x));
    return make_float2(x * s, s * (1.f + x * (1.f - s)));
  }
  }
}

#define GRID_STRIDE(k, n)                                                                     \
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < (n);                \
       k += (long long)gridDim.x * blockDim.x)

template <typename T> __device__ void act_fwd(const T *x, T *y, long long n, int kind) {
  GRID_STRIDE(k, n) y[k] = from_f<T>(act(to_f(x[k]), kind).x);
}

template <typename T> __device__ void act_bwd(const T *x, const T *g, T *dx, long long n, int kind) {
  GRID_STRIDE(k, n) dx[k] = from_f<T>(to_f(g[k]) * act(to_f(x[k]), kind).y);
}

// y = act(gate) ⊙ up.
template <typename T>
__device__ void glu_fwd(const T *gate, const T *up, T *y, long long n, int kind) {
  GRID_STRIDE(k, n) y[k] = from_f<T>(act(to_f(gate[k]), kind).x * to_f(up[k]));
}

// dgate = (g ⊙ up) ⊙ act'(gate), dup = g ⊙ act(gate), in the order the composition (act, then
// a product) computes them.
template <typename T>
__device__ void glu_bwd(const T *gate, const T *up, const T *g, T *dgate, T *dup, long long n,
                        int kind) {
  GRID_STRIDE(k, n) {
    const float2 a = act(to_f(gate[k]), kind);
    const float gv = to_f(g[k]);
    dgate[k] = from_f<T>(gv * to_f(up[k]) * a.y);
    dup[k] = from_f<T>(gv * a.x);
  }
}

// out = Σ_rows g (a bias gradient), or out += Σ_rows g when `accumulate` (the output layer's,
// over blocks of rows), blocks of 32 × COL_ROWS threads.
template <typename T, typename O>
__device__ void col_sum(const T *g, O *out, int rows, int cols, bool accumulate) {
  column_sums(
      rows, cols, [&](int r, int c) { return make_float2(to_f(g[(size_t)r * cols + c]), 0.f); },
      [&](int c, float a, float) { out[c] = from_f<O>(accumulate ? to_f(out[c]) + a : a); });
}

#define DENSE_OPS(T, S)                                                                        \
  extern "C" __global__ void act_fwd_##S(const T *x, T *y, long long n, int kind) {             \
    act_fwd<T>(x, y, n, kind);                                                                 \
  }                                                                                            \
  extern "C" __global__ void act_bwd_##S(const T *x, const T *g, T *dx, long long n, int kind) {\
    act_bwd<T>(x, g, dx, n, kind);                                                             \
  }                                                                                            \
  extern "C" __global__ void glu_fwd_##S(const T *gate, const T *up, T *y, long long n,         \
                                         int kind) {                                           \
    glu_fwd<T>(gate, up, y, n, kind);                                                          \
  }                                                                                            \
  extern "C" __global__ void glu_bwd_##S(const T *gate, const T *up, const T *g, T *dgate,      \
                                         T *dup, long long n, int kind) {                      \
    glu_bwd<T>(gate, up, g, dgate, dup, n, kind);                                              \
  }                                                                                            \
  extern "C" __global__ void col_sum_##S(const T *g, T *out, int rows, int cols) {              \
    col_sum<T, T>(g, out, rows, cols, false);                                                  \
  }                                                                                            \
  extern "C" __global__ void col_sum_add_##S(const T *g, float *out, int rows, int cols) {      \
    col_sum<T, float>(g, out, rows, cols, true);                                               \
  }

DENSE_OPS(float, f32)
DENSE_OPS(__nv_bfloat16, bf16)
DENSE_OPS(__half, f16)
