// What the kernels in this folder share: float conversions of the storage types and block-wide
// sums. build.rs compiles each `.cu` file here to PTX (under the `cuda` feature only); the Rust
// side (`src/kernels/cuda.rs`) loads each as one module and launches its `extern "C"` entry points,
// which come in one instance per storage type (`_f32`, `_bf16`, `_f16`). Every kernel computes in
// f32 and rounds once on writing, so bf16 outputs carry one rounding, as the CPU twin's f32 result
// rounded to bf16 would.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Σ v over the threads of a one-dimensional block (blockDim.x a multiple of 32, at most 1024),
// returned to every thread. `scratch` holds 32 floats of shared memory; the first barrier lets a
// previous call's readers finish with it.
__device__ __forceinline__ float block_sum(float v, float *scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// The largest v over the block, as block_sum.
__device__ __forceinline__ float block_max(float v, float *scratch) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < (int)(blockDim.x >> 5) ? scratch[lane] : -INFINITY;
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Column sums of a row-major [rows, cols] matrix of value pairs f(r, c), one 32-column stripe
// per block of 32 × COL_ROWS threads: thread (x, y) adds rows y, y + COL_ROWS, … of column
// 32·blockIdx.x + x, then thread (x, 0) adds the COL_ROWS partial sums of its column in a fixed
// order (so the result does not depend on scheduling) and calls store(c, Σ first, Σ second).
#define COL_ROWS 16
template <typename F, typename S>
__device__ __forceinline__ void column_sums(int rows, int cols, F f, S store) {
  __shared__ float part_a[COL_ROWS][33], part_b[COL_ROWS][33];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float a = 0.f, b = 0.f;
  if (c < cols) {
    for (int r = threadIdx.y; r < rows; r += COL_ROWS) {
      const float2 v = f(r, c);
      a += v.x;
      b += v.y;
    }
  }
  part_a[threadIdx.y][threadIdx.x] = a;
  part_b[threadIdx.y][threadIdx.x] = b;
  __syncthreads();
  if (threadIdx.y == 0 && c < cols) {
    a = 0.f;
    b = 0.f;
    for (int y = 0; y < COL_ROWS; ++y) {
      a += part_a[y][threadIdx.x];
      b += part_b[y][threadIdx.x];
    }
    store(c, a, b);
  }
}
