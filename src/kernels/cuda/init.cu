// Random normal initialisation on the device (twin: the host reference `init::normal_host` in
// init.rs, which uses the same integer stream): element k of a tensor keyed `key` takes the
// splitmix64 outputs 2k and 2k + 1 of seed `key` as two uniforms and maps them to a normal by
// Box–Muller. Deterministic for a key and independent of the launch shape; not the CPU loader's
// ChaCha stream.
#include "common.cuh"

__device__ __forceinline__ unsigned long long splitmix64(unsigned long long key,
                                                         unsigned long long index) {
  unsigned long long z = key + (index + 1) * 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

extern "C" __global__ void randn_f32(float *out, long long n, unsigned long long key, float mean,
                                     float stdev) {
  for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < n;
       k += (long long)gridDim.x * blockDim.x) {
    const float u1 = (float)((splitmix64(key, 2 * k) >> 40) + 1) * 5.9604644775390625e-8f;
    const float u2 = (float)(splitmix64(key, 2 * k + 1) >> 40) * 5.9604644775390625e-8f;
    out[k] = mean + stdev * (sqrtf(-2.f * logf(u1)) * cospif(2.f * u2));
  }
}
