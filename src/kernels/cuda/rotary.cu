// Rotate-half rotary embedding of `[rows, d]` rows whose position is row % t, with `[t, rot]` cos and
// sin tables, on the first `rot` features (the rest are copied); `transpose` applies the
// rotation's transpose, which is its backward (twin: rotary.rs). One thread per feature pair.
#include "common.cuh"

template <typename T>
__device__ void rotary(const T *x, const T *cos, const T *sin, T *y, long long rows, int d, int t,
                       int rot, bool transpose) {
  const int half = rot / 2, rest = d - rot, width = half + rest;
  const long long n = rows * width;
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n;
       k += (long long)gridDim.x * blockDim.x) {
    const long long r = k / width;
    const int j = (int)(k % width);
    const T *xr = x + r * d;
    T *yr = y + r * d;
    if (j >= half) {
      const int i = rot + (j - half);
      yr[i] = xr[i];
      continue;
    }
    const size_t p = (size_t)(r % t) * rot;
    const float x1 = to_f(xr[j]), x2 = to_f(xr[j + half]);
    const float c1 = to_f(cos[p + j]), c2 = to_f(cos[p + j + half]);
    const float s1 = to_f(sin[p + j]), s2 = to_f(sin[p + j + half]);
    if (transpose) {
      yr[j] = from_f<T>(x1 * c1 + x2 * s2);
      yr[j + half] = from_f<T>(x2 * c2 - x1 * s1);
    } else {
      yr[j] = from_f<T>(x1 * c1 - x2 * s1);
      yr[j + half] = from_f<T>(x2 * c2 + x1 * s2);
    }
  }
}

#define ROTARY_OPS(T, S)                                                                       \
  extern "C" __global__ void rotary_##S(const T *x, const T *cos, const T *sin, T *y,          \
                                        long long rows, int d, int t, int rot, int transpose) { \
    rotary<T>(x, cos, sin, y, rows, d, t, rot, transpose);                                     \
  }

ROTARY_OPS(float, f32)
ROTARY_OPS(__nv_bfloat16, bf16)
ROTARY_OPS(__half, f16)
