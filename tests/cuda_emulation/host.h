// Just enough of CUDA to run the kernels of src/kernels/cuda on the host, for testing them where
// no GPU is (tests/cuda_emulated.rs): a launch runs its blocks one after another, each block's
// threads as std::threads; `__shared__` variables become statics (one block runs at a time),
// `__syncthreads` a barrier, warp shuffles an exchange through memory between two barriers
// (every kernel here shuffles with all threads of the block, as this requires).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }

namespace emu {
inline dim3 block_dim, grid_dim;
inline thread_local dim3 thread_idx, block_idx;
inline std::barrier<> *barrier = nullptr;
inline std::vector<double> lanes;

inline unsigned flat_thread() {
  return thread_idx.x + block_dim.x * (thread_idx.y + block_dim.y * thread_idx.z);
}

// Runs `kernel` over `grid` × `block`: one OS thread per thread of a block, which runs the
// blocks in turn, all threads finishing one block before any starts the next.
template <typename F> void launch(dim3 grid, dim3 block, F kernel) {
  grid_dim = grid;
  block_dim = block;
  const unsigned n = block.x * block.y * block.z;
  lanes.assign(n, 0.0);
  std::barrier<> bar(n);
  barrier = &bar;
  std::vector<std::thread> threads;
  for (unsigned t = 0; t < n; ++t)
    threads.emplace_back([=, &bar] {
      thread_idx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
          for (unsigned bx = 0; bx < grid.x; ++bx) {
            block_idx = {bx, by, bz};
            kernel();
            bar.arrive_and_wait();
          }
    });
  for (auto &t : threads) t.join();
}
} // namespace emu

#define threadIdx emu::thread_idx
#define blockIdx emu::block_idx
#define blockDim emu::block_dim
#define gridDim emu::grid_dim
#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static

inline void __syncthreads() { emu::barrier->arrive_and_wait(); }

template <typename T> T __shfl_xor_sync(unsigned, T v, int offset) {
  const unsigned t = emu::flat_thread();
  emu::lanes[t] = (double)v; // floats and doubles both round-trip through a double
  __syncthreads();
  const T r = (T)emu::lanes[t ^ offset];
  __syncthreads();
  return r;
}

template <typename T> T min(T a, T b) { return a < b ? a : b; }
inline float fmaxf(float a, float b) { return std::fmax(a, b); }
inline float expf(float x) { return std::exp(x); }
inline float logf(float x) { return std::log(x); }
inline float sqrtf(float x) { return std::sqrt(x); }
inline float erff(float x) { return std::erf(x); }
inline float tanhf(float x) { return std::tanh(x); }
inline float cospif(float x) { return (float)std::cos(M_PI * (double)x); }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 b) {
  const uint32_t u = (uint32_t)b.bits << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// Round to nearest even, as the device's conversion.
inline __nv_bfloat16 __float2bfloat16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);
  return {(uint16_t)(u >> 16)};
}

struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return (float)h.v; }
inline __half __float2half(float f) { return {(_Float16)f}; }
