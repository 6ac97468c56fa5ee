// Fused attention, forward and backward, in FlashAttention-2's scheme (twin: attention.rs):
// the scores of a tile of ATT_B query rows against a tile of ATT_B keys live only in shared
// memory. The forward runs an online softmax over the key tiles and keeps per row its log-sum-exp
// as two floats (`lse`: the row's max m and log Σ exp(x − m), apart, because the max of a fully
// masked row is about −1e9, where one float would lose the sum); the backward recomputes each tile's probabilities from it, in two passes that
// need no atomics (the same result on every run): `attn_bwd_dq` per query tile (dq, and
// δ = Σ dO ⊙ O per row) and `attn_bwd_dkv` per key tile (dk and dv, summed over the query heads
// that share a key/value head under grouped-query attention).
//
// q, k, v, o and their gradients are views: a head's rows start at base + b·sb + head·sh and
// follow each other every `st` elements, so the same kernels read heads out of a fused q/k/v
// projection and write the merged output (`[b, t, heads · d]`) without copies. Rotary tables
// (`[t, rot]` cos and sin, rot ≤ d) rotate q and k as tiles are loaded; the gradients of q and k
// get the rotation's transpose as they are written. The additive mask is `[mb, mh, t, s]`
// (mb ∈ {1, b}, mh ∈ {1, heads}): causal, padding and sliding-window masks are all values of it.
// `attn_ranges` finds, per query tile, the keys any of its rows attends to (mask > −1e8); key
// tiles outside are skipped (their probabilities are exactly 0), unless a row of the tile is
// fully masked, whose softmax spreads over every key as the twin's does.
//
// The per-thread accumulators loop over ATT_COLS unrolled, so that they stay in registers.
// Arithmetic is f32 on SIMT cores (shared-memory tiles, no tensor-core MMA yet: docs/gpu.md).
// Launch: 128 threads, ATT_LANES per query row (or per key in attn_bwd_dkv); grid (tiles,
// b · heads) — b · kv heads for attn_bwd_dkv.
#include "common.cuh"

#define ATT_B 16
#define ATT_LANES 8
#define ATT_MAXD 128
#define ATT_COLS (ATT_MAXD / ATT_LANES)
#define ATT_LD (ATT_MAXD + 1)
#define ATT_MASKED -1e8f

// Rows [0, ATT_B) of a head from `src` (row r at src + r·st, positions pos0 + r for the rotary
// tables) into shared f32 `dst` (row stride d + 1): rows past `valid` are zeros.
template <typename T>
__device__ __forceinline__ void load_tile(float *dst, const T *src, long long st, int valid, int d,
                                          const T *cos, const T *sin, int rot, int pos0) {
  const int half = rot / 2;
  for (int e = threadIdx.x; e < ATT_B * d; e += blockDim.x) {
    const int r = e / d, c = e % d;
    float v = 0.f;
    if (r < valid) {
      const T *x = src + r * st;
      v = to_f(x[c]);
      if (c < rot) {
        const size_t p = (size_t)(pos0 + r) * rot + c;
        const float cs = to_f(cos[p]), sn = to_f(sin[p]);
        v = c < half ? v * cs - to_f(x[c + half]) * sn : v * cs + to_f(x[c - half]) * sn;
      }
    }
    dst[r * (d + 1) + c] = v;
  }
}

// Shared f32 rows `src` (stride d + 1) out to rows of `dst`, the rotation's transpose applied
// to the first `rot` features (the backward of load_tile's rotation).
template <typename T>
__device__ __forceinline__ void store_tile(T *dst, long long st, int valid, int d, const float *src,
                                           const T *cos, const T *sin, int rot, int pos0) {
  const int half = rot / 2;
  for (int e = threadIdx.x; e < ATT_B * d; e += blockDim.x) {
    const int r = e / d, c = e % d;
    if (r >= valid) continue;
    const float *g = src + r * (d + 1);
    float v = g[c];
    if (c < rot) {
      const size_t p = (size_t)(pos0 + r) * rot;
      v = c < half ? v * to_f(cos[p + c]) + g[c + half] * to_f(sin[p + c + half])
                   : v * to_f(cos[p + c]) - g[c - half] * to_f(sin[p + c - half]);
    }
    dst[r * st + c] = from_f<T>(v);
  }
}

// Σ over the ATT_LANES threads of a row, returned to each of them.
__device__ __forceinline__ float lanes_sum(float v) {
  for (int o = 1; o < ATT_LANES; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float lanes_max(float v) {
  for (int o = 1; o < ATT_LANES; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Dot product of two shared rows.
__device__ __forceinline__ float dot_rows(const float *a, const float *b, int d) {
  float s = 0.f;
  for (int i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

// Per query tile (blockIdx.x) of mask slice blockIdx.y: (start, end) of the keys some row of the
// tile attends to, (0, s) when one of its rows attends to none. 32 threads, one per row.
template <typename T> __device__ void attn_ranges(const T *mask, int *ranges, int t, int s) {
  __shared__ int lo[ATT_B], hi[ATT_B];
  const int r = threadIdx.x, row = blockIdx.x * ATT_B + r;
  if (r < ATT_B) {
    int a = s, e = 0;
    if (row < t) {
      const T *m = mask + ((size_t)blockIdx.y * t + row) * s;
      for (int j = 0; j < s; ++j)
        if (to_f(m[j]) > ATT_MASKED) {
          if (e == 0) a = j;
          e = j + 1;
        }
      if (e == 0) a = 0, e = s;
    }
    lo[r] = a;
    hi[r] = e;
  }
  __syncthreads();
  if (r == 0) {
    int a = s, e = 0;
    for (int i = 0; i < ATT_B; ++i) a = min(a, lo[i]), e = e > hi[i] ? e : hi[i];
    int *out = ranges + 2 * ((size_t)blockIdx.y * gridDim.x + blockIdx.x);
    out[0] = a;
    out[1] = e;
  }
}

// What every attention kernel is told: sizes, and strides (batch, head, row) of the views.
struct AttnShape {
  long long qb, qh, qt, kb, kh, kt, ob, oh, ot;
  int h, hkv, t, s, d, rot, mb, mh;
  float scale;
};

// The mask slice of head `head` in batch `bi`.
__device__ __forceinline__ int mask_index(const AttnShape &a, int bi, int head) {
  return (bi % a.mb) * a.mh + head % a.mh;
}

// o = softmax(q kᵀ · scale + mask) v and, per row, lse = (m, log Σ exp(x − m)) of its scores x.
template <typename T>
__device__ void attn_fwd(const T *q, const T *k, const T *v, const T *cos, const T *sin,
                         const T *mask, const int *ranges, T *o, float *lse, AttnShape a) {
  __shared__ float qs[ATT_B * ATT_LD], ks[ATT_B * ATT_LD], vs[ATT_B * ATT_LD];
  __shared__ float ps[ATT_B][ATT_B + 1];
  const int d = a.d, ld = d + 1, cols = d / ATT_LANES, nt = (a.t + ATT_B - 1) / ATT_B;
  const int bh = blockIdx.y, bi = bh / a.h, head = bh % a.h, kvh = head / (a.h / a.hkv);
  const int row = threadIdx.x / ATT_LANES, lane = threadIdx.x % ATT_LANES;
  const int r0 = blockIdx.x * ATT_B, token = r0 + row, mi = mask_index(a, bi, head);
  const int start = ranges[2 * (mi * nt + blockIdx.x)], end = ranges[2 * (mi * nt + blockIdx.x) + 1];
  const T *kp = k + bi * a.kb + kvh * a.kh, *vp = v + bi * a.kb + kvh * a.kh;
  const T *mrow = mask + ((size_t)mi * a.t + min(token, a.t - 1)) * a.s;
  load_tile(qs, q + bi * a.qb + head * a.qh + r0 * a.qt, a.qt, min(ATT_B, a.t - r0), d, cos, sin,
            a.rot, r0);
  float acc[ATT_COLS];
  for (int i = 0; i < ATT_COLS; ++i) acc[i] = 0.f;
  float mx = -INFINITY, l = 0.f;
  for (int c0 = start / ATT_B * ATT_B; c0 < end; c0 += ATT_B) {
    const int n = min(ATT_B, a.s - c0);
    __syncthreads(); // the previous tile's readers are done
    load_tile(ks, kp + c0 * a.kt, a.kt, n, d, cos, sin, a.rot, c0);
    load_tile(vs, vp + c0 * a.kt, a.kt, n, d, (const T *)nullptr, (const T *)nullptr, 0, c0);
    __syncthreads();
    float sc[ATT_B / ATT_LANES], tmax = -INFINITY;
    for (int j = 0; j < ATT_B / ATT_LANES; ++j) {
      const int c = lane + ATT_LANES * j;
      sc[j] = -INFINITY;
      if (token < a.t && c < n)
        sc[j] = dot_rows(qs + row * ld, ks + c * ld, d) * a.scale + to_f(mrow[c0 + c]);
      tmax = fmaxf(tmax, sc[j]);
    }
    const float mnew = fmaxf(mx, lanes_max(tmax));
    const float base = mnew == -INFINITY ? 0.f : mnew; // no key yet: every p is 0
    const float corr = expf(mx - base);
    float sum = 0.f;
    for (int j = 0; j < ATT_B / ATT_LANES; ++j) {
      const float p = expf(sc[j] - base);
      ps[row][lane + ATT_LANES * j] = p;
      sum += p;
    }
    l = l * corr + lanes_sum(sum);
    mx = mnew;
    __syncthreads();
    _Pragma("unroll") for (int i = 0; i < ATT_COLS && i < cols; ++i) {
      const int col = lane + ATT_LANES * i;
      float s = 0.f;
      for (int c = 0; c < n; ++c) s += ps[row][c] * vs[c * ld + col];
      acc[i] = acc[i] * corr + s;
    }
  }
  if (token < a.t) {
    T *out = o + bi * a.ob + head * a.oh + token * a.ot;
    _Pragma("unroll") for (int i = 0; i < ATT_COLS && i < cols; ++i) out[lane + ATT_LANES * i] = from_f<T>(acc[i] / l);
    if (lane == 0) {
      lse[2 * ((size_t)bh * a.t + token)] = mx;
      lse[2 * ((size_t)bh * a.t + token) + 1] = logf(l);
    }
  }
}

// dq = Σ over keys of ds k, ds = scale · p ⊙ (dp − δ), dp = dO vᵀ, p = exp(x − m − log Σ) of
// the scores x = q kᵀ · scale + mask, with δ = Σ dO ⊙ O per row, which it also writes for attn_bwd_dkv. dq has q's strides.
template <typename T>
__device__ void attn_bwd_dq(const T *q, const T *k, const T *v, const T *cos, const T *sin,
                            const T *mask, const int *ranges, const T *o, const T *g,
                            const float *lse, T *dq, float *delta, AttnShape a) {
  __shared__ float qs[ATT_B * ATT_LD], gs[ATT_B * ATT_LD], ks[ATT_B * ATT_LD], vs[ATT_B * ATT_LD];
  __shared__ float dss[ATT_B][ATT_B + 1];
  const int d = a.d, ld = d + 1, cols = d / ATT_LANES, nt = (a.t + ATT_B - 1) / ATT_B;
  const int bh = blockIdx.y, bi = bh / a.h, head = bh % a.h, kvh = head / (a.h / a.hkv);
  const int row = threadIdx.x / ATT_LANES, lane = threadIdx.x % ATT_LANES;
  const int r0 = blockIdx.x * ATT_B, token = r0 + row, mi = mask_index(a, bi, head);
  const int valid = min(ATT_B, a.t - r0);
  const int start = ranges[2 * (mi * nt + blockIdx.x)], end = ranges[2 * (mi * nt + blockIdx.x) + 1];
  const T *kp = k + bi * a.kb + kvh * a.kh, *vp = v + bi * a.kb + kvh * a.kh;
  const T *mrow = mask + ((size_t)mi * a.t + min(token, a.t - 1)) * a.s;
  const long long qoff = bi * a.qb + head * a.qh + r0 * a.qt;
  const long long ooff = bi * a.ob + head * a.oh + r0 * a.ot;
  load_tile(qs, q + qoff, a.qt, valid, d, cos, sin, a.rot, r0);
  load_tile(gs, g + ooff, a.ot, valid, d, (const T *)nullptr, (const T *)nullptr, 0, r0);
  __syncthreads();
  float dl = 0.f;
  if (token < a.t)
    _Pragma("unroll") for (int i = 0; i < ATT_COLS && i < cols; ++i) {
      const int col = lane + ATT_LANES * i;
      dl += gs[row * ld + col] * to_f(o[ooff + row * a.ot + col]);
    }
  dl = lanes_sum(dl);
  if (token < a.t && lane == 0) delta[(size_t)bh * a.t + token] = dl;
  const size_t lrow = 2 * ((size_t)bh * a.t + min(token, a.t - 1));
  const float lm = lse[lrow], ll = lse[lrow + 1];
  float acc[ATT_COLS];
  for (int i = 0; i < ATT_COLS; ++i) acc[i] = 0.f;
  for (int c0 = start / ATT_B * ATT_B; c0 < end; c0 += ATT_B) {
    const int n = min(ATT_B, a.s - c0);
    __syncthreads();
    load_tile(ks, kp + c0 * a.kt, a.kt, n, d, cos, sin, a.rot, c0);
    load_tile(vs, vp + c0 * a.kt, a.kt, n, d, (const T *)nullptr, (const T *)nullptr, 0, c0);
    __syncthreads();
    for (int j = 0; j < ATT_B / ATT_LANES; ++j) {
      const int c = lane + ATT_LANES * j;
      float ds = 0.f;
      if (token < a.t && c < n) {
        const float x = dot_rows(qs + row * ld, ks + c * ld, d) * a.scale + to_f(mrow[c0 + c]);
        const float p = expf(x - lm - ll), dp = dot_rows(gs + row * ld, vs + c * ld, d);
        ds = a.scale * p * (dp - dl);
      }
      dss[row][c] = ds;
    }
    __syncthreads();
    _Pragma("unroll") for (int i = 0; i < ATT_COLS && i < cols; ++i) {
      const int col = lane + ATT_LANES * i;
      float s = 0.f;
      for (int c = 0; c < n; ++c) s += dss[row][c] * ks[c * ld + col];
      acc[i] += s;
    }
  }
  __syncthreads(); // qs is free: dq goes through it to get the rotation's transpose
  _Pragma("unroll") for (int i = 0; i < ATT_COLS && i < cols; ++i) qs[row * ld + lane + ATT_LANES * i] = acc[i];
  __syncthreads();
  store_tile(dq + qoff, a.qt, valid, d, qs, cos, sin, a.rot, r0);
}

// dv = Σ pᵀ dO and dk = Σ dsᵀ q over the query rows of every head sharing this key/value head,
// for the key tile blockIdx.x; dk and dv have k's strides.
template <typename T>
__device__ void attn_bwd_dkv(const T *q, const T *k, const T *v, const T *cos, const T *sin,
                             const T *mask, const int *ranges, const T *g, const float *lse,
                             const float *delta, T *dk, T *dv, AttnShape a) {
  __shared__ float qs[ATT_B * ATT_LD], gs[ATT_B * ATT_LD], ks[ATT_B * ATT_LD], vs[ATT_B * ATT_LD];
  __shared__ float pt[ATT_B][ATT_B + 1], dst[ATT_B][ATT_B + 1], lm[ATT_B], ll[ATT_B], drow[ATT_B];
  const int d = a.d, ld = d + 1, cols = d / ATT_LANES, nt = (a.t + ATT_B - 1) / ATT_B;
  const int bi = blockIdx.y / a.hkv, kvh = blockIdx.y % a.hkv, group = a.h / a.hkv;
  const int kr = threadIdx.x / ATT_LANES, lane = threadIdx.x % ATT_LANES;
  const int c0 = blockIdx.x * ATT_B, key = c0 + kr, n = min(ATT_B, a.s - c0);
  const long long koff = bi * a.kb + kvh * a.kh + c0 * a.kt;
  load_tile(ks, k + koff, a.kt, n, d, cos, sin, a.rot, c0);
  load_tile(vs, v + koff, a.kt, n, d, (const T *)nullptr, (const T *)nullptr, 0, c0);
  float dka[ATT_COLS], dva[ATT_COLS];
  for (int i = 0; i < ATT_COLS; ++i) dka[i] = dva[i] = 0.f;
  for (int head = kvh * group; head < (kvh + 1) * group; ++head) {
    const int mi = mask_index(a, bi, head);
    const size_t bh = (size_t)bi * a.h + head;
    for (int qt = 0; qt < nt; ++qt) {
      const int start = ranges[2 * (mi * nt + qt)], end = ranges[2 * (mi * nt + qt) + 1];
      if (c0 >= end || c0 + ATT_B <= start) continue; // the forward skipped this tile
      const int r0 = qt * ATT_B, valid = min(ATT_B, a.t - r0);
      __syncthreads();
      load_tile(qs, q + bi * a.qb + head * a.qh + r0 * a.qt, a.qt, valid, d, cos, sin, a.rot, r0);
      load_tile(gs, g + bi * a.ob + head * a.oh + r0 * a.ot, a.ot, valid, d, (const T *)nullptr,
                (const T *)nullptr, 0, r0);
      if (threadIdx.x < ATT_B && (int)threadIdx.x < valid) {
        lm[threadIdx.x] = lse[2 * (bh * a.t + r0 + threadIdx.x)];
        ll[threadIdx.x] = lse[2 * (bh * a.t + r0 + threadIdx.x) + 1];
        drow[threadIdx.x] = delta[bh * a.t + r0 + threadIdx.x];
      }
      __syncthreads();
      for (int j = 0; j < ATT_B / ATT_LANES; ++j) {
        const int r = lane + ATT_LANES * j, token = r0 + r;
        float p = 0.f, ds = 0.f;
        if (r < valid && kr < n) {
          const float m = to_f(mask[((size_t)mi * a.t + token) * a.s + key]);
          const float x = dot_rows(qs + r * ld, ks + kr * ld, d) * a.scale + m;
          p = expf(x - lm[r] - ll[r]);
          ds = a.scale * p * (dot_rows(gs + r * ld, vs + kr * ld, d) - drow[r]);
        }
        pt[kr][r] = p;
        dst[kr][r] = ds;
      }
      __syncthreads();
      _Pragma("unroll") for (int i = 0; i < ATT_COLS && i < cols; ++i) {
        const int col = lane + ATT_LANES * i;
        float sv = 0.f, sk = 0.f;
        for (int r = 0; r < valid; ++r) {
          sv += pt[kr][r] * gs[r * ld + col];
          sk += dst[kr][r] * qs[r * ld + col];
        }
        dva[i] += sv;
        dka[i] += sk;
      }
    }
  }
  if (kr < n)
    _Pragma("unroll") for (int i = 0; i < ATT_COLS && i < cols; ++i) dv[koff + kr * a.kt + lane + ATT_LANES * i] = from_f<T>(dva[i]);
  __syncthreads(); // ks is free: dk goes through it to get the rotation's transpose
  _Pragma("unroll") for (int i = 0; i < ATT_COLS && i < cols; ++i) ks[kr * ld + lane + ATT_LANES * i] = dka[i];
  __syncthreads();
  store_tile(dk + koff, a.kt, n, d, ks, cos, sin, a.rot, c0);
}

#define ATTN_SHAPE                                                                             \
  AttnShape a{qb, qh, qt, kb, kh, kt, ob, oh, ot, h, hkv, t, s, d, rot, mb, mh, scale}
#define ATTN_SHAPE_ARGS                                                                        \
  long long qb, long long qh, long long qt, long long kb, long long kh, long long kt,          \
      long long ob, long long oh, long long ot, int h, int hkv, int t, int s, int d, int rot,  \
      int mb, int mh, float scale

#define ATTENTION_OPS(T, S)                                                                    \
  extern "C" __global__ void attn_ranges_##S(const T *mask, int *ranges, int t, int s) {       \
    attn_ranges<T>(mask, ranges, t, s);                                                        \
  }                                                                                            \
  extern "C" __global__ void attn_fwd_##S(const T *q, const T *k, const T *v, const T *cos,    \
                                          const T *sin, const T *mask, const int *ranges,      \
                                          T *o, float *lse, ATTN_SHAPE_ARGS) {                 \
    ATTN_SHAPE;                                                                                \
    attn_fwd<T>(q, k, v, cos, sin, mask, ranges, o, lse, a);                                   \
  }                                                                                            \
  extern "C" __global__ void attn_bwd_dq_##S(                                                  \
      const T *q, const T *k, const T *v, const T *cos, const T *sin, const T *mask,           \
      const int *ranges, const T *o, const T *g, const float *lse, T *dq, float *delta,        \
      ATTN_SHAPE_ARGS) {                                                                       \
    ATTN_SHAPE;                                                                                \
    attn_bwd_dq<T>(q, k, v, cos, sin, mask, ranges, o, g, lse, dq, delta, a);                  \
  }                                                                                            \
  extern "C" __global__ void attn_bwd_dkv_##S(                                                 \
      const T *q, const T *k, const T *v, const T *cos, const T *sin, const T *mask,           \
      const int *ranges, const T *g, const float *lse, const float *delta, T *dk, T *dv,       \
      ATTN_SHAPE_ARGS) {                                                                       \
    ATTN_SHAPE;                                                                                \
    attn_bwd_dkv<T>(q, k, v, cos, sin, mask, ranges, g, lse, delta, dk, dv, a);                \
  }

ATTENTION_OPS(float, f32)
ATTENTION_OPS(__nv_bfloat16, bf16)
ATTENTION_OPS(__half, f16)
