// Runs the attention kernels of src/kernels/cuda/attention.cu on the host (host.h) for one case
// that tests/cuda_emulated.rs writes into a directory, with the launch shapes and view strides of
// src/kernels/attention.rs's `gpu` module, and writes their outputs back there; the Rust test
// compares them with the CPU twin.
//
// `<dir>/case.txt`: dtype (0 f32, 1 bf16), layout (0 q/k/v apart, 1 packed per head as GPT-NeoX,
// 2 packed in blocks as GPT-2), b, heads, kv heads, t, s, d, rot, mb, mh. Inputs (raw
// little-endian f32): q.bin k.bin v.bin (layout 0) or qkv.bin, cos.bin and sin.bin (rot > 0),
// mask.bin `[mb, mh, t, s]`, g.bin (the output's gradient). Outputs: y.bin, and dq.bin dk.bin
// dv.bin (layout 0) or dqkv.bin, in f32 (bf16 results widened).
#include "host.h"

#include "../../src/kernels/cuda/attention.cu"

#include <cstdio>
#include <fstream>
#include <string>

static std::string dir;

static std::vector<float> read(const std::string &name, size_t n) {
  std::vector<float> v(n);
  std::ifstream f(dir + "/" + name, std::ios::binary);
  f.read(reinterpret_cast<char *>(v.data()), (std::streamsize)(n * 4));
  if (!f) {
    std::fprintf(stderr, "cannot read %zu floats from %s\n", n, name.c_str());
    std::exit(2);
  }
  return v;
}

template <typename T> static void write(const std::string &name, const std::vector<T> &v) {
  std::vector<float> f(v.size());
  for (size_t i = 0; i < v.size(); ++i) f[i] = to_f(v[i]);
  std::ofstream out(dir + "/" + name, std::ios::binary);
  out.write(reinterpret_cast<const char *>(f.data()), (std::streamsize)(f.size() * 4));
}

template <typename T> static std::vector<T> typed(const std::vector<float> &v) {
  std::vector<T> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) out[i] = from_f<T>(v[i]);
  return out;
}

template <typename T>
static void run(int layout, int b, int h, int hkv, int t, int s, int d, int rot, int mb, int mh) {
  const long long w = 3LL * h * d;
  const size_t qn = (size_t)b * h * t * d, kn = (size_t)b * hkv * s * d;
  std::vector<T> q, k, v, qkv, cos, sin, mask, g;
  // Views as src/kernels/attention.rs sets them up: (base offset, batch, head, row strides).
  long long qo = 0, ko = 0, vo = 0;
  AttnShape a{};
  if (layout == 0) {
    q = typed<T>(read("q.bin", qn));
    k = typed<T>(read("k.bin", kn));
    v = typed<T>(read("v.bin", kn));
    a.qb = (long long)h * t * d, a.qh = (long long)t * d, a.qt = d;
    a.kb = (long long)hkv * s * d, a.kh = (long long)s * d, a.kt = d;
    a.ob = a.qb, a.oh = a.qh, a.ot = a.qt;
  } else {
    qkv = typed<T>(read("qkv.bin", (size_t)b * t * w));
    const long long hs = layout == 1 ? 3LL * d : d;
    qo = 0;
    ko = layout == 1 ? d : (long long)h * d;
    vo = 2 * ko;
    a.qb = a.kb = t * w, a.qh = a.kh = hs, a.qt = a.kt = w;
    a.ob = (long long)t * h * d, a.oh = d, a.ot = (long long)h * d;
  }
  if (rot > 0) {
    cos = typed<T>(read("cos.bin", (size_t)t * rot));
    sin = typed<T>(read("sin.bin", (size_t)t * rot));
  }
  mask = typed<T>(read("mask.bin", (size_t)mb * mh * t * s));
  g = typed<T>(read("g.bin", qn));
  a.h = h, a.hkv = hkv, a.t = t, a.s = s, a.d = d, a.rot = rot, a.mb = mb, a.mh = mh;
  a.scale = (float)(1 / std::sqrt((double)d));
  const T *qp = layout == 0 ? q.data() : qkv.data() + qo;
  const T *kp = layout == 0 ? k.data() : qkv.data() + ko;
  const T *vp = layout == 0 ? v.data() : qkv.data() + vo;
  const T *cp = rot > 0 ? cos.data() : nullptr, *sp = rot > 0 ? sin.data() : nullptr;
  const unsigned nt = (unsigned)((t + ATT_B - 1) / ATT_B), ns = (unsigned)((s + ATT_B - 1) / ATT_B);
  std::vector<int> ranges(2 * nt * mb * mh);
  std::vector<T> y(qn);
  std::vector<float> lse(2 * (size_t)b * h * t), delta((size_t)b * h * t);
  emu::launch({nt, (unsigned)(mb * mh), 1}, {32, 1, 1}, [&] { attn_ranges<T>(mask.data(), ranges.data(), t, s); });
  const dim3 block{128, 1, 1};
  emu::launch({nt, (unsigned)(b * h), 1}, block, [&] {
    attn_fwd<T>(qp, kp, vp, cp, sp, mask.data(), ranges.data(), y.data(), lse.data(), a);
  });
  write("y.bin", y);
  // Gradients: apart, or in one buffer laid out as the projection (each element written once).
  std::vector<T> dq(qn), dk(kn), dv(kn), dqkv(layout == 0 ? 0 : (size_t)b * t * w);
  T *dqp = layout == 0 ? dq.data() : dqkv.data() + qo;
  T *dkp = layout == 0 ? dk.data() : dqkv.data() + ko;
  T *dvp = layout == 0 ? dv.data() : dqkv.data() + vo;
  emu::launch({nt, (unsigned)(b * h), 1}, block, [&] {
    attn_bwd_dq<T>(qp, kp, vp, cp, sp, mask.data(), ranges.data(), y.data(), g.data(), lse.data(), dqp,
                   delta.data(), a);
  });
  emu::launch({ns, (unsigned)(b * hkv), 1}, block, [&] {
    attn_bwd_dkv<T>(qp, kp, vp, cp, sp, mask.data(), ranges.data(), g.data(), lse.data(), delta.data(),
                    dkp, dvp, a);
  });
  if (layout == 0) {
    write("dq.bin", dq);
    write("dk.bin", dk);
    write("dv.bin", dv);
  } else {
    write("dqkv.bin", dqkv);
  }
}

int main(int argc, char **argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: attention <case directory>\n");
    return 2;
  }
  dir = argv[1];
  std::ifstream spec(dir + "/case.txt");
  int dtype, layout, b, h, hkv, t, s, d, rot, mb, mh;
  if (!(spec >> dtype >> layout >> b >> h >> hkv >> t >> s >> d >> rot >> mb >> mh)) {
    std::fprintf(stderr, "cannot read %s/case.txt\n", dir.c_str());
    return 2;
  }
  if (dtype == 0)
    run<float>(layout, b, h, hkv, t, s, d, rot, mb, mh);
  else
    run<__nv_bfloat16>(layout, b, h, hkv, t, s, d, rot, mb, mh);
  return 0;
}
