// Runs every kernel of src/kernels/cuda on the host (host.h) against a double-precision reference
// written out here, with the launch shapes src/kernels/cuda.rs uses (`rows_config`,
// `elementwise_config`, `columns_config`, the optimiser's chunked grid, and the output layer's
// vocabulary tiles). Prints one line per check, `name relative-error bound`, then the first
// values of the device random stream (which tests/cuda_emulated.rs compares with
// `kernels::init::randn_host`); exits non-zero if a check fails. The relative error is ‖kernel − reference‖ / ‖reference‖.
#include "host.h"

#include "../../src/kernels/cuda/adamw.cu"
#include "../../src/kernels/cuda/dense.cu"
#include "../../src/kernels/cuda/init.cu"
#include "../../src/kernels/cuda/norm.cu"
#include "../../src/kernels/cuda/output.cu"
#include "../../src/kernels/cuda/rotary.cu"
#include "../../src/kernels/cuda/softmax.cu"

#include <cstdio>
#include <string>

using V = std::vector<float>;
using D = std::vector<double>;

static int failures = 0;

static void report(const std::string &name, const V &got, const D &want, double bound) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    diff += (got[i] - want[i]) * (got[i] - want[i]);
    norm += want[i] * want[i];
  }
  const double err = norm > 0 ? std::sqrt(diff / norm) : std::sqrt(diff);
  const bool ok = got.size() == want.size() && err <= bound && std::isfinite(err);
  if (!ok) ++failures;
  std::printf("%-40s %.3e %.0e %s\n", name.c_str(), err, bound, ok ? "ok" : "FAIL");
}

// Seeded N(mean, scale²) values.
static V randn(size_t n, float mean, float scale, uint64_t seed) {
  V v(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ull + 1;
  auto uniform = [&] {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    return ((s >> 40) + 1) * 5.9604644775390625e-8;
  };
  for (auto &x : v) x = mean + scale * (float)(std::sqrt(-2 * std::log(uniform())) * std::cos(2 * M_PI * uniform()));
  return v;
}

// src/kernels/cuda.rs's launch shapes.
static dim3 rows_grid(size_t rows) { return {(unsigned)rows, 1, 1}; }
static dim3 rows_block(size_t d) {
  size_t t = ((d / 8 + 31) / 32) * 32;
  return {(unsigned)std::clamp<size_t>(t, 32, 1024), 1, 1};
}
static dim3 elem_grid(size_t n) { return {(unsigned)std::clamp<size_t>((n + 255) / 256, 1, 65535), 1, 1}; }
static dim3 elem_block() { return {256, 1, 1}; }
static dim3 cols_grid(size_t cols) { return {(unsigned)((cols + 31) / 32), 1, 1}; }
static dim3 cols_block() { return {32, 16, 1}; }

static void norms(size_t rows, size_t d, bool centered) {
  const std::string tag = std::string(centered ? "layer norm" : "rms norm") + " " +
                          std::to_string(rows) + "x" + std::to_string(d);
  const float eps = 1e-5f;
  V x = randn(rows * d, 0.5f, 1.f, 1), w = randn(d, 1.f, 0.2f, 2), b = randn(d, 0.f, 0.2f, 3);
  V g = randn(rows * d, 0.f, 1.f, 4);
  D y_ref(rows * d), dx_ref(rows * d), dw_ref(d, 0), db_ref(d, 0);
  for (size_t r = 0; r < rows; ++r) {
    const float *xr = &x[r * d], *gr = &g[r * d];
    double mean = 0, var = 0;
    if (centered) {
      for (size_t i = 0; i < d; ++i) mean += xr[i];
      mean /= d;
    }
    for (size_t i = 0; i < d; ++i) var += (xr[i] - mean) * (xr[i] - mean);
    const double rstd = 1 / std::sqrt(var / d + eps);
    double sg = 0, sgx = 0;
    for (size_t i = 0; i < d; ++i) {
      const double xh = (xr[i] - mean) * rstd;
      y_ref[r * d + i] = xh * w[i] + (centered ? b[i] : 0);
      sg += gr[i] * w[i];
      sgx += gr[i] * w[i] * xh;
      dw_ref[i] += gr[i] * xh;
      db_ref[i] += gr[i];
    }
    const double mg = centered ? sg / d : 0, mgx = sgx / d;
    for (size_t i = 0; i < d; ++i)
      dx_ref[r * d + i] = rstd * (gr[i] * w[i] - mg - (xr[i] - mean) * rstd * mgx);
  }
  V y(rows * d), dx(rows * d), dw(d), db(d);
  std::vector<float2> stats(rows);
  const float *bp = centered ? b.data() : nullptr;
  emu::launch(rows_grid(rows), rows_block(d), [&] { norm_fwd_f32(x.data(), w.data(), bp, y.data(), d, eps, centered); });
  emu::launch(rows_grid(rows), rows_block(d), [&] {
    norm_bwd_rows_f32(x.data(), w.data(), g.data(), dx.data(), stats.data(), d, eps, centered);
  });
  emu::launch(cols_grid(d), cols_block(), [&] {
    norm_bwd_cols_f32(x.data(), g.data(), stats.data(), dw.data(), centered ? db.data() : nullptr, rows, d);
  });
  report(tag + " y", y, y_ref, 1e-6);
  report(tag + " dx", dx, dx_ref, 1e-5);
  report(tag + " dw", dw, dw_ref, 1e-5);
  if (centered) report(tag + " db", db, db_ref, 1e-5);
  // bf16 storage: the same rows rounded, one rounding of the output.
  std::vector<__nv_bfloat16> xb(rows * d), wb(d), bb(d), yb(rows * d);
  for (size_t i = 0; i < x.size(); ++i) xb[i] = __float2bfloat16(x[i]);
  for (size_t i = 0; i < d; ++i) wb[i] = __float2bfloat16(w[i]), bb[i] = __float2bfloat16(b[i]);
  emu::launch(rows_grid(rows), rows_block(d), [&] {
    norm_fwd_bf16(xb.data(), wb.data(), centered ? bb.data() : nullptr, yb.data(), d, eps, centered);
  });
  V yf(rows * d);
  for (size_t i = 0; i < yf.size(); ++i) yf[i] = __bfloat162float(yb[i]);
  report(tag + " y (bf16)", yf, y_ref, 1e-2);
}

static void softmaxes(size_t rows, size_t d) {
  const std::string tag = "softmax " + std::to_string(rows) + "x" + std::to_string(d);
  V x = randn(rows * d, 0.f, 3.f, 5), g = randn(rows * d, 0.f, 1.f, 6);
  D p_ref(rows * d), dx_ref(rows * d);
  for (size_t r = 0; r < rows; ++r) {
    double m = -INFINITY, s = 0, dot = 0;
    for (size_t i = 0; i < d; ++i) m = std::max(m, (double)x[r * d + i]);
    for (size_t i = 0; i < d; ++i) s += std::exp(x[r * d + i] - m);
    for (size_t i = 0; i < d; ++i) p_ref[r * d + i] = std::exp(x[r * d + i] - m) / s;
    for (size_t i = 0; i < d; ++i) dot += g[r * d + i] * p_ref[r * d + i];
    for (size_t i = 0; i < d; ++i) dx_ref[r * d + i] = p_ref[r * d + i] * (g[r * d + i] - dot);
  }
  V p(rows * d), dx(rows * d);
  emu::launch(rows_grid(rows), rows_block(d), [&] { softmax_fwd_f32(x.data(), p.data(), d); });
  emu::launch(rows_grid(rows), rows_block(d), [&] { softmax_bwd_f32(p.data(), g.data(), dx.data(), d); });
  report(tag + " y", p, p_ref, 1e-6);
  report(tag + " dx", dx, dx_ref, 1e-5);
}

static void rotaries(size_t rot) {
  const size_t rows = 30, t = 5, d = 8, half = rot / 2;
  const std::string tag = "rotary rot " + std::to_string(rot);
  V x = randn(rows * d, 0.f, 1.f, 7), cos(t * rot), sin(t * rot);
  for (size_t p = 0; p < t; ++p)
    for (size_t i = 0; i < rot; ++i) {
      const double angle = p * std::pow(10000.0, -2.0 * (i % half) / rot);
      cos[p * rot + i] = (float)std::cos(angle);
      sin[p * rot + i] = (float)std::sin(angle);
    }
  D y_ref(x.begin(), x.end());
  for (size_t r = 0; r < rows; ++r)
    for (size_t i = 0; i < half; ++i) {
      const size_t p = (r % t) * rot;
      const double x1 = x[r * d + i], x2 = x[r * d + i + half];
      y_ref[r * d + i] = x1 * cos[p + i] - x2 * sin[p + i];
      y_ref[r * d + i + half] = x2 * cos[p + i + half] + x1 * sin[p + i + half];
    }
  V y(rows * d), back(rows * d);
  const size_t pairs = rows * (d - half);
  emu::launch(elem_grid(pairs), elem_block(), [&] { rotary_f32(x.data(), cos.data(), sin.data(), y.data(), rows, d, t, rot, 0); });
  emu::launch(elem_grid(pairs), elem_block(), [&] { rotary_f32(y.data(), cos.data(), sin.data(), back.data(), rows, d, t, rot, 1); });
  report(tag + " y", y, y_ref, 1e-6);
  // The transpose of a rotation is its inverse.
  report(tag + " transpose(y)", back, D(x.begin(), x.end()), 1e-6);
}

static void activations() {
  const size_t n = 1000;
  V x = randn(n, 0.f, 3.f, 8), up = randn(n, 0.f, 1.f, 9), g = randn(n, 0.f, 1.f, 10);
  const char *names[] = {"gelu (tanh)", "gelu (erf)", "relu", "silu"};
  for (int kind = 0; kind < 4; ++kind) {
    D y_ref(n), dx_ref(n), glu_ref(n), dgate_ref(n), dup_ref(n);
    for (size_t i = 0; i < n; ++i) {
      const double v = x[i];
      double a, da;
      if (kind == 0) {
        const double k = std::sqrt(2 / M_PI), u = k * (v + 0.044715 * v * v * v), th = std::tanh(u);
        a = 0.5 * v * (1 + th);
        da = 0.5 * (1 + th) + 0.5 * v * (1 - th * th) * k * (1 + 3 * 0.044715 * v * v);
      } else if (kind == 1) {
        const double cdf = 0.5 * (1 + std::erf(v / std::sqrt(2.0)));
        a = v * cdf;
        da = cdf + v * std::exp(-0.5 * v * v) / std::sqrt(2 * M_PI);
      } else if (kind == 2) {
        a = v > 0 ? v : 0;
        da = v > 0 ? 1 : 0;
      } else {
        const double s = 1 / (1 + std::exp(-v));
        a = v * s;
        da = s * (1 + v * (1 - s));
      }
      y_ref[i] = a;
      dx_ref[i] = g[i] * da;
      glu_ref[i] = a * up[i];
      dgate_ref[i] = g[i] * up[i] * da;
      dup_ref[i] = g[i] * a;
    }
    V y(n), dx(n), glu(n), dgate(n), dup(n);
    emu::launch(elem_grid(n), elem_block(), [&] { act_fwd_f32(x.data(), y.data(), n, kind); });
    emu::launch(elem_grid(n), elem_block(), [&] { act_bwd_f32(x.data(), g.data(), dx.data(), n, kind); });
    emu::launch(elem_grid(n), elem_block(), [&] { glu_fwd_f32(x.data(), up.data(), glu.data(), n, kind); });
    emu::launch(elem_grid(n), elem_block(), [&] {
      glu_bwd_f32(x.data(), up.data(), g.data(), dgate.data(), dup.data(), n, kind);
    });
    const std::string tag = names[kind];
    report(tag + " y", y, y_ref, 1e-6);
    report(tag + " dx", dx, dx_ref, 1e-5);
    report(tag + "(gate) * up y", glu, glu_ref, 1e-6);
    report(tag + "(gate) * up dgate", dgate, dgate_ref, 1e-5);
    report(tag + "(gate) * up dup", dup, dup_ref, 1e-6);
  }
  const size_t rows = 37, cols = 70;
  V m = randn(rows * cols, 0.f, 1.f, 11), sums(cols);
  D sums_ref(cols, 0);
  for (size_t r = 0; r < rows; ++r)
    for (size_t c = 0; c < cols; ++c) sums_ref[c] += m[r * cols + c];
  emu::launch(cols_grid(cols), cols_block(), [&] { col_sum_f32(m.data(), sums.data(), rows, cols); });
  report("column sums 37x70", sums, sums_ref, 1e-6);
}

// The output layer's row kernels over vocabulary tiles of `tile` columns, as output.rs runs
// them on cuBLASLt's f32 logits: the forward's running log-sum-exp and target log-probs, the
// backward's G (f32 and bf16) and the bias gradient summed over two blocks of rows.
static void output_layer(size_t rows, size_t vocab, size_t tile, bool with_bias) {
  const std::string tag = "output " + std::to_string(rows) + "x" + std::to_string(vocab) + " tile " +
                          std::to_string(tile) + (with_bias ? " + bias" : "");
  V z = randn(rows * vocab, 0.f, 3.f, 12), b = randn(vocab, 0.f, 1.f, 13), dlogp = randn(rows, 0.f, 1.f, 14);
  std::vector<uint32_t> targets(rows);
  for (size_t r = 0; r < rows; ++r) targets[r] = (uint32_t)((r * 7919 + 3) % vocab);
  std::vector<__nv_bfloat16> bb(vocab);
  for (size_t i = 0; i < vocab; ++i) bb[i] = __float2bfloat16(b[i]);
  auto bias_at = [&](size_t i) { return with_bias ? (double)b[i] : 0.0; };
  D out_ref(rows), lse_ref(rows), g_ref(rows * vocab), db_ref(vocab, 0);
  for (size_t r = 0; r < rows; ++r) {
    double m = -INFINITY, s = 0;
    for (size_t i = 0; i < vocab; ++i) m = std::max(m, z[r * vocab + i] + bias_at(i));
    for (size_t i = 0; i < vocab; ++i) s += std::exp(z[r * vocab + i] + bias_at(i) - m);
    lse_ref[r] = m + std::log(s);
    out_ref[r] = z[r * vocab + targets[r]] + bias_at(targets[r]) - lse_ref[r];
    for (size_t i = 0; i < vocab; ++i) {
      const double p = std::exp(z[r * vocab + i] + bias_at(i) - lse_ref[r]);
      g_ref[r * vocab + i] = dlogp[r] * ((i == targets[r] ? 1 : 0) - p);
      db_ref[i] += g_ref[r * vocab + i];
    }
  }
  V m(rows), s(rows), zt(rows), out(rows), lse(rows), g(rows * vocab), gb(rows * vocab), db(vocab, 0.f);
  const size_t half = rows / 2;
  for (size_t v0 = 0; v0 < vocab; v0 += tile) {
    const size_t vn = std::min(tile, vocab - v0);
    // The tile as cuBLASLt writes it: [rows, vn], row-major.
    V zt_tile(rows * vn);
    for (size_t r = 0; r < rows; ++r)
      for (size_t i = 0; i < vn; ++i) zt_tile[r * vn + i] = z[r * vocab + v0 + i];
    const float *bias = with_bias ? b.data() + v0 : nullptr;
    const int first = v0 == 0, last = v0 + vn == vocab;
    emu::launch(rows_grid(rows), rows_block(vn), [&] {
      logps_fwd_f32(zt_tile.data(), bias, targets.data(), m.data(), s.data(), zt.data(), out.data(), lse.data(),
                    (int)vn, (int)v0, first, last);
    });
  }
  report(tag + " logps", out, out_ref, 1e-6);
  report(tag + " lse", lse, lse_ref, 1e-6);
  for (size_t v0 = 0; v0 < vocab; v0 += tile) {
    const size_t vn = std::min(tile, vocab - v0);
    V z_tile(rows * vn), g_tile(rows * vn);
    std::vector<__nv_bfloat16> gb_tile(rows * vn);
    for (size_t r = 0; r < rows; ++r)
      for (size_t i = 0; i < vn; ++i) z_tile[r * vn + i] = z[r * vocab + v0 + i];
    const float *bias = with_bias ? b.data() + v0 : nullptr;
    const __nv_bfloat16 *bias_b = with_bias ? bb.data() + v0 : nullptr;
    emu::launch(rows_grid(rows), rows_block(vn), [&] {
      logps_bwd_f32(z_tile.data(), bias, targets.data(), dlogp.data(), lse.data(), g_tile.data(), (int)vn, (int)v0);
    });
    emu::launch(rows_grid(rows), rows_block(vn), [&] {
      logps_bwd_bf16(z_tile.data(), bias_b, targets.data(), dlogp.data(), lse.data(), gb_tile.data(), (int)vn, (int)v0);
    });
    // The bias gradient over two blocks of rows, added into db.
    for (auto [r0, rn] : {std::pair{(size_t)0, half}, std::pair{half, rows - half}})
      emu::launch(cols_grid(vn), cols_block(), [&] {
        col_sum_add_f32(g_tile.data() + r0 * vn, db.data() + v0, (int)rn, (int)vn);
      });
    for (size_t r = 0; r < rows; ++r)
      for (size_t i = 0; i < vn; ++i) {
        g[r * vocab + v0 + i] = g_tile[r * vn + i];
        gb[r * vocab + v0 + i] = __bfloat162float(gb_tile[r * vn + i]);
      }
  }
  report(tag + " G", g, g_ref, 1e-5);
  report(tag + " G (bf16)", gb, g_ref, 1e-2);
  if (with_bias) report(tag + " db", db, db_ref, 1e-5);
}

// The optimiser over three slots (one spanning two chunks) with clipping and weight decay, and
// a bf16 copy of each updated weight.
static void optimiser() {
  const int chunk = 1 << 16;
  const size_t sizes[] = {70000, 300, 1};
  const float lr = 1e-2f, b1 = 0.9f, b2 = 0.999f, eps = 1e-8f, decay = 0.1f;
  const double max_norm = 1.0;
  std::vector<V> w, m, v, g;
  std::vector<std::vector<__nv_bfloat16>> copy;
  std::vector<Slot> slots;
  std::vector<unsigned> starts{0};
  for (size_t i = 0; i < 3; ++i) {
    w.push_back(randn(sizes[i], 0.f, 0.1f, 20 + i));
    m.push_back(randn(sizes[i], 0.f, 0.01f, 30 + i));
    v.push_back(V(sizes[i], 1e-4f));
    g.push_back(randn(sizes[i], 0.f, 1.f, 40 + i));
    copy.emplace_back(sizes[i]);
  }
  for (size_t i = 0; i < 3; ++i) {
    const float keep = i < 2 ? 1 - lr * decay : 1.f;
    slots.push_back({w[i].data(), m[i].data(), v[i].data(), g[i].data(), copy[i].data(), sizes[i], keep, 0.f});
    starts.push_back(starts.back() + (unsigned)((sizes[i] + chunk - 1) / chunk));
  }
  double total = 0;
  for (auto &gi : g)
    for (float x : gi) total += (double)x * x;
  const double norm = std::sqrt(total), scale = norm > max_norm ? max_norm / (norm + 1e-6) : 1;
  std::vector<double> partials(starts.back());
  float clip[2];
  const dim3 grid{starts.back(), 1, 1}, block{256, 1, 1};
  emu::launch(grid, block, [&] { sumsq(slots.data(), starts.data(), 3, chunk, partials.data()); });
  emu::launch({1, 1, 1}, block, [&] { clip_factor(partials.data(), (int)partials.size(), max_norm, clip); });
  report("gradient norm", V{clip[0], clip[1]}, D{norm, scale}, 1e-6);
  std::vector<D> w_ref(3), m_ref(3), v_ref(3);
  const double bc1 = 1 - std::pow(b1, 3.0), bc2 = 1 - std::pow(b2, 3.0);
  for (size_t i = 0; i < 3; ++i)
    for (size_t k = 0; k < sizes[i]; ++k) {
      const double gk = g[i][k] * scale;
      const double mk = b1 * m[i][k] + (1 - b1) * gk, vk = b2 * v[i][k] + (1 - b2) * gk * gk;
      m_ref[i].push_back(mk);
      v_ref[i].push_back(vk);
      w_ref[i].push_back(w[i][k] * slots[i].keep - lr * (mk / bc1) / (std::sqrt(vk / bc2) + eps));
    }
  emu::launch(grid, block, [&] {
    adamw(slots.data(), starts.data(), 3, chunk, clip, lr, b1, 1 - b1, b2, 1 - b2, eps, (float)(1 / bc1), (float)(1 / bc2), 1);
  });
  for (size_t i = 0; i < 3; ++i) {
    const std::string tag = "adamw slot " + std::to_string(i);
    report(tag + " w", w[i], w_ref[i], 1e-6);
    report(tag + " m", m[i], m_ref[i], 1e-6);
    report(tag + " v", v[i], v_ref[i], 1e-6);
    V c(sizes[i]);
    for (size_t k = 0; k < sizes[i]; ++k) c[k] = __bfloat162float(copy[i][k]);
    report(tag + " bf16 copy", c, w_ref[i], 4e-3);
  }
}

int main() {
  norms(5, 300, true);
  norms(37, 70, true);
  norms(5, 300, false);
  norms(3, 2560, true);
  softmaxes(6, 7);
  softmaxes(3, 3000);
  output_layer(5, 3000, 1024, true);
  output_layer(37, 70, 32, false);
  output_layer(3, 700, 700, true);
  rotaries(4);
  rotaries(8);
  activations();
  optimiser();
  V r(8);
  emu::launch(elem_grid(r.size()), elem_block(), [&] { randn_f32(r.data(), (long long)r.size(), 99, 0.5f, 0.02f); });
  std::printf("init");
  for (float x : r) std::printf(" %.9g", x);
  std::printf("\n");
  return failures == 0 ? 0 : 1;
}
