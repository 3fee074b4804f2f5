// Native CPU kernels: the MCT's composite attention, the attention distillation, the GRU.
//
// 1. Block softmax: softmax statistics of every query over each key block, and their gradient.
//
// Per item i (batch × head) with queries q (T, D), keys k and values v (S, D), S = blocks·Lb:
// for key block j and query t, s_tk = q_t·k_k over the block's keys and
//   m[j, i, t]    = max_k s_tk
//   z[j, i, t]    = Σ_k exp(s_tk − m)
//   n[j, i, t, :] = Σ_k exp(s_tk − m) v_k
// The backward pass takes dz, dn (m is a shift only, its cotangent is ignored) and writes
//   ds_tk = exp(s_tk − m) (dn_t·v_k + dz_t),  dq_t = Σ_k ds_tk k_k,
//   dk_k = Σ_t ds_tk q_t,  dv_k = Σ_t exp(s_tk − m) dn_t,
// recomputing the scores instead of storing them.
//
// 2. Attention KL: per query t of item i, with teacher scores a = q_t·k and student scores
//   b = p_t·r (over all S keys), kl[i, t] = Σ_k softmax(a)_k (log softmax(a)_k − log softmax(b)_k),
//   also returning the two log-sum-exps. Its backward pass, given dkl, differentiates the
//   student side only (the teacher is a constant): db_tk = dkl_t (softmax(b)_k − softmax(a)_k),
//   dp_t = Σ_k db_tk r_k, dr_k = Σ_t db_tk p_t.
//
// 3. GRU (below): the recurrence of M GRUs over B sequences, forward and backward.
//
// 4. Masked attention (below): softmax attention with an additive key bias and optional
//   hashed dropout of the weights (BERT self-attention, WSAM), forward and backward.
//
// 5. Composite attention (below): the MCT's seven-pattern attention from its packed q|k|v
//   projections, built on section 1's block statistics, forward and backward.
//
// 6. LayerNorm (below) over the last axis, forward and backward (the MCT's LayerNorms).
//
// 7. Weight gradient of a dense layer (below).
//
// 8. Adam updates in place (below): the optimizer's parameter and moment updates.
//
// Attention queries run W at a time in vector lanes
// (GCC vector extensions: AVX-512 where -march=native has it, narrower vectors elsewhere);
// the items are shared among XLA's intra-op threads.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Lanes per vector and vector registers: W lanes fill one register of the widest unit that
// -march=native has, and the register blocks below are sized so that their accumulators fit
// in kVecRegs registers (a vector twice a register's width would spill them).
#if defined(__AVX512F__)
constexpr int W = 16, kVecRegs = 32;
#elif defined(__AVX__)
constexpr int W = 8, kVecRegs = 16;
#elif defined(__aarch64__)
constexpr int W = 4, kVecRegs = 32;
#else
constexpr int W = 4, kVecRegs = 16;
#endif
typedef float vf __attribute__((vector_size(W * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(W * sizeof(int32_t))));

inline vf splat(float x) {
#if defined(__AVX512F__)
  return (vf)_mm512_set1_ps(x);  // one broadcast (vf{} + x would also add +0.0 first)
#else
  // x − (+0) is x for every x (−0 and NaN included), so the compiler drops the subtraction
  // and keeps one broadcast; vf{} + x would add +0.0 to x first (−0 + 0 is +0)
  return x - vf{};
#endif
}

// Lane-wise square roots, correctly rounded as std::sqrt's: one vector instruction where the
// ISA has it (per lane, GCC calls sqrtf beside each scalar root to keep errno).
inline vf vsqrt(vf x) {
#if defined(__AVX512F__)
  return (vf)_mm512_sqrt_ps((__m512)x);
#elif defined(__AVX__)
  static_assert(sizeof(vf) == sizeof(__m256), "W = 8 lanes with AVX");
  return (vf)_mm256_sqrt_ps((__m256)x);
#elif defined(__aarch64__)
  static_assert(sizeof(vf) == sizeof(float32x4_t), "W = 4 lanes on aarch64");
  return (vf)vsqrtq_f32((float32x4_t)x);
#else
  vf r;
  for (int l = 0; l < W; ++l) r[l] = std::sqrt(x[l]);
  return r;
#endif
}

inline vf load(const float* p) {
  vf r;
  std::memcpy(&r, p, sizeof(vf));
  return r;
}

inline void store(float* p, vf x) { std::memcpy(p, &x, sizeof(vf)); }

// exp(x) for x <= 0 (scores minus their row max): Cephes' single-precision polynomial on
// x − n·ln2, |x − n·ln2| <= ln2/2, scaled by 2^n; about 1 ulp. Below the smallest normal
// result (x < −87.33) it returns 0; NaN stays NaN.
inline vf exp_nonpositive(vf x) {
#if defined(__AVX512F__)
  // the same values from AVX-512's round-to-nearest and scale-by-2^n instructions
  static_assert(sizeof(vf) == sizeof(__m512), "W = 16 lanes with AVX-512");
  vf t = x * 1.44269504088896341f;
  vf nf = (vf)_mm512_roundscale_ps((__m512)t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
  const vf magic = splat(12582912.0f);  // 1.5·2^23: adding and subtracting rounds to integer
  vf t = x * 1.44269504088896341f;
  vf nf = (t + magic) - magic;
#endif
  vf r = x - nf * 0.693359375f;
  r = r - nf * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  vf y = p * r * r + r + 1.0f;
#if defined(__AVX512F__)
  y = (vf)_mm512_scalef_ps((__m512)y, (__m512)nf);
#else
  vi n = __builtin_convertvector(nf, vi);
  vi bits = (n + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(vf));
  y = y * scale;
#endif
  return x < -87.33654475f ? splat(0.0f) : y;
}

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

// Rows x_t (t < T, D values each, row stride `stride`) times `scale`, transposed to (D, Tp)
// with Tp a multiple of W (padding lanes are 0).
void transpose_rows(const float* x, int T, int D, int stride, int Tp, float scale, float* xt) {
  std::fill(xt, xt + static_cast<size_t>(D) * Tp, 0.0f);
  for (int t = 0; t < T; ++t)
    for (int d = 0; d < D; ++d)
      xt[static_cast<size_t>(d) * Tp + t] = scale * x[static_cast<size_t>(t) * stride + d];
}

// Queries of one item (T, D), transposed to (D, Tp).
void transpose_queries(const float* q, int T, int D, int Tp, float* qt) {
  transpose_rows(q, T, D, D, Tp, 1.0f, qt);
}

// The inverse of transpose_queries: (D, Tp) back to the first T rows of (T, D).
void untranspose_queries(const float* qt, int T, int D, int Tp, float* q) {
  for (int t = 0; t < T; ++t)
    for (int d = 0; d < D; ++d) q[t * D + d] = qt[static_cast<size_t>(d) * Tp + t];
}

// Pairwise sums of two vectors' lanes by a shuffle network: sum_pairs<S>(a, b) adds lanes l
// and l + S within each block of 2S lanes, a's blocks to the low half, b's to the high half.
template <int S>
inline vf sum_pairs(vf a, vf b) {
  vi lo, hi;
  for (int l = 0; l < W; ++l) {
    const int src = (l % (W / 2)) / S * 2 * S + l % S + (l < W / 2 ? 0 : W);
    lo[l] = src;
    hi[l] = src + S;
  }
  return __builtin_shuffle(a, b, lo) + __builtin_shuffle(a, b, hi);
}

// One level of reduce_lanes' network: n vectors to n / 2 by sum_pairs<S>, then the next.
template <int S>
inline void reduce_level(vf* x, int n) {
  for (int i = 0; i < n / 2; ++i) x[i] = sum_pairs<S>(x[2 * i], x[2 * i + 1]);
  if constexpr (S > 1) reduce_level<S / 2>(x, n / 2);
}

// out[r] = the sum of the W lanes of acc[r] for r < rows (acc is (rows, W)); W rows at a
// time through a transposing shuffle-and-add network (W − 1 adds instead of W·(W − 1)).
void reduce_lanes(const float* acc, int rows, float* out) {
  int r = 0;
  for (; r + W <= rows; r += W) {
    const float* a = acc + static_cast<size_t>(r) * W;
    vf x[W];
    for (int i = 0; i < W; ++i) x[i] = load(a + i * W);
    reduce_level<W / 2>(x, W);
    store(out + r, x[0]);
  }
  for (; r < rows; ++r) {
    float sum = 0.0f;
    for (int l = 0; l < W; ++l) sum += acc[static_cast<size_t>(r) * W + l];
    out[r] = sum;
  }
}

// Σ_d qd[d]·key[d] for W queries at once (qd[d]: component d of each lane's query).
template <int D>
inline vf dot_lanes(const vf* qd, const float* key) {
  vf s = qd[0] * key[0];
  for (int d = 1; d < D; ++d) s = s + qd[d] * key[d];
  return s;
}

// Softmax statistics of the W-lane query groups of qt (D, Tp) over one key block of Lb keys
// (key r at kb + r·ks, its value at vb + r·ks): mx, zs (Tp) and ns (D, Tp), lanes-major.
template <int D>
void block_forward(const float* qt, int Tp, const float* kb, const float* vb, int ks, int Lb,
                   float* mx_out, float* zs_out, float* ns_out) {
  // each group's scores, computed once for the max and the exponentials (Lb, W)
  thread_local std::vector<float> scores;
  scores.resize(static_cast<size_t>(Lb) * W);
  float* sc = scores.data();
  for (int t0 = 0; t0 < Tp; t0 += W) {
    vf qd[D];
    for (int d = 0; d < D; ++d) qd[d] = load(qt + static_cast<size_t>(d) * Tp + t0);
    vf mx = splat(-__builtin_inff());
    for (int key = 0; key < Lb; ++key) {
      const vf sk = dot_lanes<D>(qd, kb + static_cast<size_t>(key) * ks);
      store(sc + key * W, sk);
      mx = vmax(mx, sk);
    }
    vf zs = splat(0.0f);
    vf ns[D];
    for (int d = 0; d < D; ++d) ns[d] = splat(0.0f);
    for (int key = 0; key < Lb; ++key) {
      const float* vk = vb + static_cast<size_t>(key) * ks;
      const vf e = exp_nonpositive(load(sc + key * W) - mx);
      zs = zs + e;
      for (int d = 0; d < D; ++d) ns[d] = ns[d] + e * vk[d];
    }
    store(mx_out + t0, mx);
    store(zs_out + t0, zs);
    for (int d = 0; d < D; ++d) store(ns_out + static_cast<size_t>(d) * Tp + t0, ns[d]);
  }
}

// The gradient of block_forward's z and n (given as dzt (Tp) and dnt (D, Tp), with the row
// max mt (Tp) as the shift): adds dq to dqt (D, Tp) and writes the lane partial sums of dk
// and dv to dka, dva (Lb, D, W). Padding lanes need q = dn = dz = 0 and a finite m.
template <int D>
void block_backward(const float* qt, int Tp, const float* kb, const float* vb, int ks, int Lb,
                    const float* mt, const float* dzt, const float* dnt, float* dqt, float* dka,
                    float* dva) {
  std::fill(dka, dka + static_cast<size_t>(Lb) * D * W, 0.0f);
  std::fill(dva, dva + static_cast<size_t>(Lb) * D * W, 0.0f);
  for (int t0 = 0; t0 < Tp; t0 += W) {
    vf qd[D], gd[D], dqd[D];
    for (int d = 0; d < D; ++d) {
      qd[d] = load(qt + static_cast<size_t>(d) * Tp + t0);
      gd[d] = load(dnt + static_cast<size_t>(d) * Tp + t0);
      dqd[d] = splat(0.0f);
    }
    const vf mx = load(mt + t0);
    const vf dzv = load(dzt + t0);
    for (int key = 0; key < Lb; ++key) {
      const float* kk = kb + static_cast<size_t>(key) * ks;
      const float* vk = vb + static_cast<size_t>(key) * ks;
      const vf e = exp_nonpositive(dot_lanes<D>(qd, kk) - mx);
      const vf ds = e * (dot_lanes<D>(gd, vk) + dzv);
      float* dkk = dka + static_cast<size_t>(key) * D * W;
      float* dvk = dva + static_cast<size_t>(key) * D * W;
      for (int d = 0; d < D; ++d) {
        dqd[d] = dqd[d] + ds * kk[d];
        store(dkk + d * W, load(dkk + d * W) + ds * qd[d]);
        store(dvk + d * W, load(dvk + d * W) + e * gd[d]);
      }
    }
    for (int d = 0; d < D; ++d) {
      float* out = dqt + static_cast<size_t>(d) * Tp + t0;
      store(out, load(out) + dqd[d]);
    }
  }
}

template <int D>
void forward_item(const float* q, const float* k, const float* v, int T, int S, int Lb,
                  int item, int items, float* m, float* z, float* n, std::vector<float>& buf) {
  const int Tp = (T + W - 1) / W * W;
  // qt, ns (D, Tp), mx, zs (Tp)
  buf.resize(static_cast<size_t>(2 * D + 2) * Tp);
  float* qt = buf.data();
  float* ns = qt + static_cast<size_t>(D) * Tp;
  float* mx = ns + static_cast<size_t>(D) * Tp;
  float* zs = mx + Tp;
  transpose_queries(q, T, D, Tp, qt);
  const int blocks = S / Lb;
  for (int j = 0; j < blocks; ++j) {
    block_forward<D>(qt, Tp, k + static_cast<size_t>(j) * Lb * D,
                     v + static_cast<size_t>(j) * Lb * D, D, Lb, mx, zs, ns);
    const size_t row = (static_cast<size_t>(j) * items + item) * T;
    std::copy(mx, mx + T, m + row);
    std::copy(zs, zs + T, z + row);
    untranspose_queries(ns, T, D, Tp, n + row * D);
  }
}

template <int D>
void backward_item(const float* q, const float* k, const float* v, const float* m,
                   const float* dz, const float* dn, int T, int S, int Lb, int item, int items,
                   float* dq, float* dk, float* dv, std::vector<float>& buf) {
  const int Tp = (T + W - 1) / W * W;
  // qt (D, Tp), dnt (D, Tp), mt, dzt (Tp), dqt (D, Tp), dk and dv lane accumulators (Lb, D, W)
  buf.assign(static_cast<size_t>(3 * D + 2) * Tp + static_cast<size_t>(2) * Lb * D * W, 0.0f);
  float* qt = buf.data();
  float* dnt = qt + static_cast<size_t>(D) * Tp;
  float* mt = dnt + static_cast<size_t>(D) * Tp;
  float* dzt = mt + Tp;
  float* dqt = dzt + Tp;
  float* dka = dqt + static_cast<size_t>(D) * Tp;
  float* dva = dka + static_cast<size_t>(Lb) * D * W;
  transpose_queries(q, T, D, Tp, qt);
  const int blocks = S / Lb;
  for (int j = 0; j < blocks; ++j) {
    const size_t row = (static_cast<size_t>(j) * items + item) * T;
    // padding lanes: q = dn = dz = 0 and m = 0, so their ds and e·dn vanish
    std::copy(m + row, m + row + T, mt);
    std::copy(dz + row, dz + row + T, dzt);
    transpose_queries(dn + row * D, T, D, Tp, dnt);
    block_backward<D>(qt, Tp, k + static_cast<size_t>(j) * Lb * D,
                      v + static_cast<size_t>(j) * Lb * D, D, Lb, mt, dzt, dnt, dqt, dka, dva);
    reduce_lanes(dka, Lb * D, dk + static_cast<size_t>(j) * Lb * D);
    reduce_lanes(dva, Lb * D, dv + static_cast<size_t>(j) * Lb * D);
  }
  untranspose_queries(dqt, T, D, Tp, dq);
}

template <int D>
void kl_forward_item(const float* qa, const float* ka, const float* qb, const float* kb, int T,
                     int S, float* kl, float* lse_a, float* lse_b, std::vector<float>& buf) {
  const int Tp = (T + W - 1) / W * W;
  // qat, qbt (D, Tp); a group's scores of both, computed once (S, 2, W)
  buf.resize(static_cast<size_t>(2 * D) * Tp + static_cast<size_t>(2) * S * W);
  float* qat = buf.data();
  float* qbt = qat + static_cast<size_t>(D) * Tp;
  float* sc = qbt + static_cast<size_t>(D) * Tp;
  transpose_queries(qa, T, D, Tp, qat);
  transpose_queries(qb, T, D, Tp, qbt);
  for (int t0 = 0; t0 < Tp; t0 += W) {
    vf ad[D], bd[D];
    for (int d = 0; d < D; ++d) {
      ad[d] = load(qat + static_cast<size_t>(d) * Tp + t0);
      bd[d] = load(qbt + static_cast<size_t>(d) * Tp + t0);
    }
    vf ma = splat(-__builtin_inff()), mb = ma;
    for (int key = 0; key < S; ++key) {
      const vf a = dot_lanes<D>(ad, ka + key * D), b = dot_lanes<D>(bd, kb + key * D);
      store(sc + 2 * key * W, a);
      store(sc + (2 * key + 1) * W, b);
      ma = vmax(ma, a);
      mb = vmax(mb, b);
    }
    vf za = splat(0.0f), zb = za, cross = za;
    for (int key = 0; key < S; ++key) {
      const vf a = load(sc + 2 * key * W), b = load(sc + (2 * key + 1) * W);
      const vf ea = exp_nonpositive(a - ma);
      za = za + ea;
      zb = zb + exp_nonpositive(b - mb);
      cross = cross + ea * (a - b);
    }
    const int lanes = std::min(W, T - t0);
    for (int l = 0; l < lanes; ++l) {
      const float la = ma[l] + std::log(za[l]), lb = mb[l] + std::log(zb[l]);
      // Σ p_a (a − la − b + lb) = Σ p_a (a − b) − la + lb
      kl[t0 + l] = cross[l] / za[l] - la + lb;
      lse_a[t0 + l] = la;
      lse_b[t0 + l] = lb;
    }
  }
}

template <int D>
void kl_backward_item(const float* qa, const float* ka, const float* qb, const float* kb,
                      const float* lse_a, const float* lse_b, const float* dkl, int T, int S,
                      float* dqb, float* dkb, std::vector<float>& buf) {
  const int Tp = (T + W - 1) / W * W;
  // qat, qbt, dqt (D, Tp); la, lb, g (Tp); dk lane accumulators (S, D, W)
  buf.assign(static_cast<size_t>(3 * D + 3) * Tp + static_cast<size_t>(S) * D * W, 0.0f);
  float* qat = buf.data();
  float* qbt = qat + static_cast<size_t>(D) * Tp;
  float* dqt = qbt + static_cast<size_t>(D) * Tp;
  float* la = dqt + static_cast<size_t>(D) * Tp;
  float* lb = la + Tp;
  float* g = lb + Tp;
  float* dka = g + Tp;
  transpose_queries(qa, T, D, Tp, qat);
  transpose_queries(qb, T, D, Tp, qbt);
  // padding lanes: q = 0, lse = 0 and dkl = 0, so their gradient vanishes
  std::copy(lse_a, lse_a + T, la);
  std::copy(lse_b, lse_b + T, lb);
  std::copy(dkl, dkl + T, g);
  for (int t0 = 0; t0 < Tp; t0 += W) {
    vf ad[D], bd[D], dqd[D];
    for (int d = 0; d < D; ++d) {
      ad[d] = load(qat + static_cast<size_t>(d) * Tp + t0);
      bd[d] = load(qbt + static_cast<size_t>(d) * Tp + t0);
      dqd[d] = splat(0.0f);
    }
    const vf lav = load(la + t0), lbv = load(lb + t0), gv = load(g + t0);
    for (int key = 0; key < S; ++key) {
      const float* kk = kb + key * D;
      const vf pa = exp_nonpositive(dot_lanes<D>(ad, ka + key * D) - lav);
      const vf pb = exp_nonpositive(dot_lanes<D>(bd, kk) - lbv);
      const vf ds = gv * (pb - pa);
      float* acc = dka + static_cast<size_t>(key) * D * W;
      for (int d = 0; d < D; ++d) {
        dqd[d] = dqd[d] + ds * kk[d];
        store(acc + d * W, load(acc + d * W) + ds * bd[d]);
      }
    }
    for (int d = 0; d < D; ++d) store(dqt + static_cast<size_t>(d) * Tp + t0, dqd[d]);
  }
  reduce_lanes(dka, S * D, dkb);
  untranspose_queries(dqt, T, D, Tp, dqb);
}

// 3. GRU recurrence, torch gate order r|z|n, initial state 0. For item (m, b) and step t,
//   gh = h W[m] + c[m],  r = σ(gx_r + gh_r),  u = σ(gx_z + gh_z),  n = tanh(gx_n + r·gh_n),
//   h ← (1 − u) n + u h,
// with gx (M, B, T, 3H) the input projections (bias included), W (M, H, 3H), c (M, 3H); the
// states are written to hs (M, B, T, H) and the hidden parts gh to ghs (M, B, T, 3H). The
// backward pass runs the steps in reverse, recomputing the gates from gx and ghs, and writes
// dgx (M, B, T, 3H) and dghs (M, B, T, 3H), the gradient of gh (the caller forms dW and dc).
// σ(x) = 1 / (1 + e^−x) from e = exp(−|x|) ≤ 1, without cancellation for either sign.
inline vf sigmoid_v(vf x) {
  const vf e = exp_nonpositive(x > 0.0f ? -x : x);
  const vf one = splat(1.0f);
  return x > 0.0f ? one / (one + e) : e / (one + e);
}

// tanh: Cephes' odd polynomial below |x| = 0.625, (1 − e)/(1 + e) with e = exp(−2|x|) above
// (no cancellation there: e ≤ 0.29); about 2 ulp.
inline vf tanh_v(vf x) {
  const vf ax = x > 0.0f ? x : -x;
  const vf z = x * x;
  vf p = splat(-5.70498872745e-3f);
  p = p * z + 2.06390887954e-2f;
  p = p * z - 5.37397155531e-2f;
  p = p * z + 1.33314422036e-1f;
  p = p * z - 3.33332819422e-1f;
  const vf small = p * z * x + x;
  const vf e = exp_nonpositive(-2.0f * ax);
  const vf big = (1.0f - e) / (1.0f + e);
  return ax < 0.625f ? small : (x < 0.0f ? -big : big);
}

// gh = c + h W (G = 3H outputs), W row-major (H, Gp) and c (Gp) padded with zeros to Gp, a
// multiple of W: one vector accumulator per W outputs, in registers across the H products.
inline void hidden_gates(const float* __restrict h, const float* __restrict w,
                         const float* __restrict c, int H, int Gp, float* __restrict gh) {
  for (int j0 = 0; j0 < Gp; j0 += W) {
    vf acc = load(c + j0);
    for (int k = 0; k < H; ++k) acc = acc + h[k] * load(w + static_cast<size_t>(k) * Gp + j0);
    store(gh + j0, acc);
  }
}

// The weights of one GRU laid out for the kernels: W padded to (H, Gp), c to (Gp), and Wᵀ
// (G, Hp) padded to Hp columns (Gp, Hp: 3H and H rounded up to W).
struct GruWeights {
  int H, G, Gp, Hp;
  std::vector<float> w, c, wt;
  GruWeights(const float* w0, const float* c0, int H_)
      : H(H_), G(3 * H_), Gp((3 * H_ + W - 1) / W * W), Hp((H_ + W - 1) / W * W),
        w(static_cast<size_t>(H_) * Gp, 0.0f), c(Gp, 0.0f), wt(static_cast<size_t>(G) * Hp, 0.0f) {
    for (int k = 0; k < H; ++k)
      for (int j = 0; j < G; ++j) {
        w[static_cast<size_t>(k) * Gp + j] = w0[static_cast<size_t>(k) * G + j];
        wt[static_cast<size_t>(j) * Hp + k] = w0[static_cast<size_t>(k) * G + j];
      }
    std::copy(c0, c0 + G, c.begin());
  }
};

// The gates of one step for all H units, W at a time: r, u, n and the pre-activation
// hidden part of n (gh_n), into arrays of Hp = H rounded up to W (padding lanes are junk).
inline void gru_gates(const float* g, const float* gh, int H, int Hp, float* a, float* r,
                      float* u, float* n) {
  // a holds the three pre-activations, padded: a[0, Hp) r-gate, [Hp, 2Hp) u, [2Hp, 3Hp) n part
  for (int j = 0; j < H; ++j) {
    a[j] = g[j] + gh[j];
    a[Hp + j] = g[H + j] + gh[H + j];
  }
  for (int j0 = 0; j0 < Hp; j0 += W) {
    store(r + j0, sigmoid_v(load(a + j0)));
    store(u + j0, sigmoid_v(load(a + Hp + j0)));
  }
  for (int j = 0; j < H; ++j) a[2 * Hp + j] = g[2 * H + j] + r[j] * gh[2 * H + j];
  for (int j0 = 0; j0 < Hp; j0 += W) store(n + j0, tanh_v(load(a + 2 * Hp + j0)));
}

void gru_forward_item(const float* gx, const GruWeights& wt, int T, float* hs, float* ghs,
                      std::vector<float>& buf) {
  const int H = wt.H, G = wt.G, Gp = wt.Gp, Hp = wt.Hp;
  buf.assign(static_cast<size_t>(H + Gp + 6 * Hp), 0.0f);
  float* h = buf.data();
  float* gh = h + H;
  float* a = gh + Gp;
  float* r = a + 3 * Hp;
  float* u = r + Hp;
  float* n = u + Hp;
  for (int t = 0; t < T; ++t) {
    const float* g = gx + static_cast<size_t>(t) * G;
    hidden_gates(h, wt.w.data(), wt.c.data(), H, Gp, gh);
    std::copy(gh, gh + G, ghs + static_cast<size_t>(t) * G);
    gru_gates(g, gh, H, Hp, a, r, u, n);
    float* out = hs + static_cast<size_t>(t) * H;
    for (int j = 0; j < H; ++j) out[j] = (1.0f - u[j]) * n[j] + u[j] * h[j];
    std::copy(out, out + H, h);
  }
}

// The stored hidden parts gh of every step stand in for h W: each step's backward is the
// gates' derivatives and dh_prev = d·u + dgh Wᵀ (vectors over the H outputs, four partial
// sums); dW = Σ_t h_prevᵀ dgh and dc = Σ_t dgh are left to the caller (one matmul over all
// items and steps).
void gru_backward_item(const float* gx, const GruWeights& wt, const float* hs, const float* ghs,
                       const float* dhs, int T, float* dgx, float* dghs, std::vector<float>& buf) {
  const int H = wt.H, G = wt.G, Hp = wt.Hp;
  buf.assign(static_cast<size_t>(H + 8 * Hp + G), 0.0f);
  float* zero = buf.data();
  float* dh = zero + H;
  float* dh_prev = dh + Hp;
  float* a = dh_prev + Hp;
  float* r = a + 3 * Hp;
  float* u = r + Hp;
  float* n = u + Hp;
  float* dgh = n + Hp;
  for (int t = T - 1; t >= 0; --t) {
    const float* g = gx + static_cast<size_t>(t) * G;
    const float* gh = ghs + static_cast<size_t>(t) * G;
    const float* h_prev = t > 0 ? hs + static_cast<size_t>(t - 1) * H : zero;
    const float* dout = dhs + static_cast<size_t>(t) * H;
    float* dg = dgx + static_cast<size_t>(t) * G;
    gru_gates(g, gh, H, Hp, a, r, u, n);
    for (int j = 0; j < H; ++j) {
      const float d = dh[j] + dout[j];
      const float dn = d * (1.0f - u[j]) * (1.0f - n[j] * n[j]);  // through tanh
      const float du = d * (h_prev[j] - n[j]) * u[j] * (1.0f - u[j]);
      const float dr = dn * gh[2 * H + j] * r[j] * (1.0f - r[j]);
      dg[j] = dr;
      dg[H + j] = du;
      dg[2 * H + j] = dn;
      dgh[j] = dr;
      dgh[H + j] = du;
      dgh[2 * H + j] = dn * r[j];
      dh_prev[j] = d * u[j];
    }
    std::copy(dgh, dgh + G, dghs + static_cast<size_t>(t) * G);
    for (int k0 = 0; k0 < Hp; k0 += W) {
      vf acc[4] = {splat(0.0f), splat(0.0f), splat(0.0f), splat(0.0f)};
      const float* col = wt.wt.data() + k0;
      for (int j = 0; j < G; ++j)
        acc[j & 3] = acc[j & 3] + dgh[j] * load(col + static_cast<size_t>(j) * Hp);
      store(dh + k0, load(dh_prev + k0) + ((acc[0] + acc[1]) + (acc[2] + acc[3])));
    }
  }
}

// 4. Masked attention. Arrays are (G, T, H, D) for queries and outputs and (G, S, H, D) for
// keys and values (item i = g·H + h: head h of group g), the key bias is (G, S). Per item:
//   s_tk = scale·q_t·k_k + bias_k,  p = softmax_k(s),  out_t = Σ_k p_tk·keep_tk/keep_prob·v_k,
// with keep_tk = [hash(index) >= threshold] (cider_jax.models.dropout's bits of the flat
// index (i·T + t)·S + k of the (G, H, T, S) weights; threshold 0 keeps everything). The
// forward pass also writes the row max m and the sum of exponentials z, (G, H, T); the
// backward pass recomputes p from them: with δ_t = dout_t·out_t,
//   ds_tk = p_tk (keep_tk/keep_prob·dout_t·v_k − δ_t),  dq_t = scale Σ_k ds_tk k_k,
//   dk_k = scale Σ_t ds_tk q_t,  dv_k = Σ_t p_tk keep_tk/keep_prob·dout_t.
// rows (G, T) and cols (G, S) select the work: a query row with rows = 0 is not computed (out,
// dq = 0, m = 0, z = 1, and its dout is ignored), a key with cols = 0 is left out of every
// softmax (dk, dv = 0); a row with no key left gets out = 0.
typedef uint32_t vu __attribute__((vector_size(W * sizeof(uint32_t))));

inline vu lowbias32(vu x) {
  x = x ^ (x >> 16);
  x = x * 0x7FEB352Du;
  x = x ^ (x >> 15);
  x = x * 0x846CA68Bu;
  return x ^ (x >> 16);
}

struct Drop {
  uint32_t s0 = 0, s1 = 0, threshold = 0;
  float scale = 1.0f;  // 1 / keep_prob
  // weight multipliers (keep/keep_prob or 0) of W lanes whose flat indices are idx
  inline vf keep(vu idx) const {
    const vu bits = lowbias32(lowbias32(idx + s0) ^ s1);
    return bits >= threshold ? splat(scale) : splat(0.0f);
  }
};

// dot_lanes with four partial sums (D >= 8): a quarter of the dependency chain.
template <int D>
inline vf dot_lanes4(const vf* qd, const float* key) {
  if constexpr (D < 8) {
    return dot_lanes<D>(qd, key);
  } else {
    vf s0 = qd[0] * key[0], s1 = qd[1] * key[1], s2 = qd[2] * key[2], s3 = qd[3] * key[3];
    for (int d = 4; d < D; d += 4) {
      s0 = s0 + qd[d] * key[d];
      s1 = s1 + qd[d + 1] * key[d + 1];
      s2 = s2 + qd[d + 2] * key[d + 2];
      s3 = s3 + qd[d + 3] * key[d + 3];
    }
    return (s0 + s1) + (s2 + s3);
  }
}

// The selected query rows (rows[t] > 0) and keys (cols[k] > 0) of one item, as index lists
// (n and nk of them) padded with index 0 to a multiple of W. False when either is empty.
bool select_rows(const float* rows, int T, const float* cols, int S, std::vector<int>& act,
                 std::vector<int>& keys, int* n, int* nk) {
  act.clear();
  keys.clear();
  for (int t = 0; t < T; ++t)
    if (rows[t] > 0.0f) act.push_back(t);
  for (int k = 0; k < S; ++k)
    if (cols[k] > 0.0f) keys.push_back(k);
  *n = static_cast<int>(act.size());
  *nk = static_cast<int>(keys.size());
  if (act.empty() || keys.empty()) return false;
  act.resize((act.size() + W - 1) / W * W, 0);
  keys.resize((keys.size() + W - 1) / W * W, 0);
  return true;
}

// Rows idx[a] (a < n) of x (row stride `stride`, D values) times `scale`, transposed to
// (D, np) with np = idx.size(); padding lanes are 0.
void gather_rows(const float* x, const std::vector<int>& idx, int n, int D, int stride,
                 float scale, float* xt) {
  const size_t np = idx.size();
  std::fill(xt, xt + static_cast<size_t>(D) * np, 0.0f);
  for (int a = 0; a < n; ++a)
    for (int d = 0; d < D; ++d)
      xt[static_cast<size_t>(d) * np + a] = scale * x[static_cast<size_t>(idx[a]) * stride + d];
}

// Dropout counters first + idx[a0 + l]·stride of W lanes.
inline vu lane_index(const int* idx, uint32_t first, uint32_t stride) {
  vu r;
  for (int l = 0; l < W; ++l) r[l] = first + static_cast<uint32_t>(idx[l]) * stride;
  return r;
}

// Head-size chunk of the masked attention's accumulators: at most kVecRegs / 2 vectors live
// at a time, so no head size spills them (with 32 registers 16 for D = 16, 32, 64 and 8 for
// 24; with 16 registers 8 for D = 8 and up; D below 8 whole).
template <int D>
constexpr int chunk_of() {
  return D % 16 == 0 && kVecRegs >= 32 ? 16 : (D % 8 == 0 ? 8 : D);
}

// s[j] (W lanes, j < nk) = bias[keys[j]] + Σ_d qt[d]·k[keys[j], d] for the W queries of qt
// (D, Tp) at t0, a chunk of C components at a time (C vectors of queries in registers).
template <int D>
void lane_scores(const float* qt, int Tp, int t0, const float* k, int HD, const int* keys,
                 int nk, const float* bias, float kscale, float* s) {
  constexpr int C = chunk_of<D>();
  for (int d0 = 0; d0 < D; d0 += C) {
    vf qd[C];
    for (int c = 0; c < C; ++c) qd[c] = load(qt + static_cast<size_t>(d0 + c) * Tp + t0);
    for (int j = 0; j < nk; ++j) {
      const float* kk = k + static_cast<size_t>(keys[j]) * HD + d0;
      const vf prev = d0 == 0 ? splat(bias ? bias[keys[j]] : 0.0f) : load(s + j * W);
      store(s + j * W, prev + kscale * dot_lanes4<C>(qd, kk));
    }
  }
}

// acc (D, W) = Σ_j w[j]·x[keys[j], :] (W lanes each), written to out[lane l] rows at
// rows_out[l]·HD (l < lanes) times `scale`, a chunk of C components at a time.
template <int D>
void lane_weighted_sum(const float* w, const float* x, int HD, const int* keys, int nk,
                       const int* rows_out, int lanes, vf scale, float* out) {
  constexpr int C = chunk_of<D>();
  for (int d0 = 0; d0 < D; d0 += C) {
    vf acc[C];
    for (int c = 0; c < C; ++c) acc[c] = splat(0.0f);
    for (int j = 0; j < nk; ++j) {
      const vf wj = load(w + j * W);
      const float* xr = x + static_cast<size_t>(keys[j]) * HD + d0;
      for (int c = 0; c < C; ++c) acc[c] = acc[c] + wj * xr[c];
    }
    for (int c = 0; c < C; ++c) acc[c] = acc[c] * scale;
    for (int l = 0; l < lanes; ++l)
      for (int c = 0; c < C; ++c) out[static_cast<size_t>(rows_out[l]) * HD + d0 + c] = acc[c][l];
  }
}

template <int D>
void masked_forward_item(const float* q, const float* k, const float* v, const float* bias,
                         const float* rows, const float* cols, int T, int S, int HD,
                         float scale, const Drop& drop, uint32_t base, float* out, float* m,
                         float* z, std::vector<float>& buf, std::vector<int>& act,
                         std::vector<int>& keys) {
  // rows left out: out = 0, m = 0, z = 1 (the backward pass skips them as well)
  for (int t = 0; t < T; ++t) {
    std::fill(out + static_cast<size_t>(t) * HD, out + static_cast<size_t>(t) * HD + D, 0.0f);
    m[t] = 0.0f;
    z[t] = 1.0f;
  }
  int n, nk;
  if (!select_rows(rows, T, cols, S, act, keys, &n, &nk)) return;
  const int Tp = static_cast<int>(act.size());
  // qt (D, Tp); the scores, then the weights, of W queries over the nk keys (nk, W)
  buf.resize(static_cast<size_t>(D) * Tp + static_cast<size_t>(nk) * W);
  float* qt = buf.data();
  float* s = qt + static_cast<size_t>(D) * Tp;
  gather_rows(q, act, n, D, HD, scale, qt);
  for (int t0 = 0; t0 < Tp; t0 += W) {
    lane_scores<D>(qt, Tp, t0, k, HD, keys.data(), nk, bias, 1.0f, s);
    vf mx = splat(-__builtin_inff());
    for (int j = 0; j < nk; ++j) mx = vmax(mx, load(s + j * W));
    const vu idx = lane_index(act.data() + t0, base, S);
    vf zs = splat(0.0f);
    for (int j = 0; j < nk; ++j) {
      const vf e = exp_nonpositive(load(s + j * W) - mx);
      zs = zs + e;
      store(s + j * W, drop.threshold ? e * drop.keep(idx + static_cast<uint32_t>(keys[j])) : e);
    }
    const int lanes = std::min(W, n - t0);
    lane_weighted_sum<D>(s, v, HD, keys.data(), nk, act.data() + t0, lanes, 1.0f / zs, out);
    for (int l = 0; l < lanes; ++l) {
      m[act[t0 + l]] = mx[l];
      z[act[t0 + l]] = zs[l];
    }
  }
}

// Two passes: dq with the queries in the vector lanes, then dk and dv with the keys in the
// lanes. Each first writes the weights' gradient ds (and the kept weights) of its W lanes to
// a buffer, then sums them against the other side a chunk of components at a time, so that
// no accumulator spills. Rows and keys left out get 0.
template <int D>
void masked_backward_item(const float* q, const float* k, const float* v, const float* bias,
                          const float* rows, const float* cols, const float* m, const float* z,
                          const float* out, const float* dout, int T, int S, int HD,
                          float scale, const Drop& drop, uint32_t base, float* dq, float* dk,
                          float* dv, std::vector<float>& buf, std::vector<int>& act,
                          std::vector<int>& keys) {
  for (int t = 0; t < T; ++t)
    std::fill(dq + static_cast<size_t>(t) * HD, dq + static_cast<size_t>(t) * HD + D, 0.0f);
  for (int s = 0; s < S; ++s) {
    std::fill(dk + static_cast<size_t>(s) * HD, dk + static_cast<size_t>(s) * HD + D, 0.0f);
    std::fill(dv + static_cast<size_t>(s) * HD, dv + static_cast<size_t>(s) * HD + D, 0.0f);
  }
  int n, nk;
  if (!select_rows(rows, T, cols, S, act, keys, &n, &nk)) return;
  const int Tp = static_cast<int>(act.size()), Sp = static_cast<int>(keys.size());
  // qt, gt (D, Tp); mt, rzt, delta (Tp); kt, vt (D, Sp); bt (Sp); per-lane scores and
  // g·v of pass 1 (nk, W) each; ds and kept weights of pass 2 (n, W) each
  buf.assign(static_cast<size_t>(2 * D + 3) * Tp + static_cast<size_t>(2 * D + 1) * Sp +
                 static_cast<size_t>(2) * (nk + n) * W, 0.0f);
  float* qt = buf.data();
  float* gt = qt + static_cast<size_t>(D) * Tp;
  float* mt = gt + static_cast<size_t>(D) * Tp;
  float* rzt = mt + Tp;
  float* delta = rzt + Tp;
  float* kt = delta + Tp;
  float* vt = kt + static_cast<size_t>(D) * Sp;
  float* bt = vt + static_cast<size_t>(D) * Sp;
  float* sb = bt + Sp;
  float* gb = sb + static_cast<size_t>(nk) * W;
  float* dsb = gb + static_cast<size_t>(nk) * W;
  float* pkb = dsb + static_cast<size_t>(n) * W;
  gather_rows(q, act, n, D, HD, scale, qt);
  gather_rows(dout, act, n, D, HD, 1.0f, gt);
  gather_rows(k, keys, nk, D, HD, 1.0f, kt);
  gather_rows(v, keys, nk, D, HD, 1.0f, vt);
  // padding lanes: queries with q = dout = 0 and 1/z = 0, keys with bias −inf: p = 0 there
  for (int a = 0; a < n; ++a) {
    const int t = act[a];
    mt[a] = m[t];
    rzt[a] = 1.0f / z[t];
    float dot = 0.0f;
    for (int d = 0; d < D; ++d)
      dot += dout[static_cast<size_t>(t) * HD + d] * out[static_cast<size_t>(t) * HD + d];
    delta[a] = dot;
  }
  for (int j = 0; j < nk; ++j) bt[j] = bias[keys[j]];
  std::fill(bt + nk, bt + Sp, -__builtin_inff());
  // pass 1: dq_t = scale Σ_k ds_tk k_k
  for (int t0 = 0; t0 < Tp; t0 += W) {
    lane_scores<D>(qt, Tp, t0, k, HD, keys.data(), nk, bias, 1.0f, sb);
    lane_scores<D>(gt, Tp, t0, v, HD, keys.data(), nk, nullptr, 1.0f, gb);
    const vf mx = load(mt + t0), rz = load(rzt + t0), dl = load(delta + t0);
    const vu idx = lane_index(act.data() + t0, base, S);
    for (int j = 0; j < nk; ++j) {
      const vf p = exp_nonpositive(load(sb + j * W) - mx) * rz;
      const vf pk = drop.threshold ? p * drop.keep(idx + static_cast<uint32_t>(keys[j])) : p;
      store(sb + j * W, pk * load(gb + j * W) - p * dl);
    }
    lane_weighted_sum<D>(sb, k, HD, keys.data(), nk, act.data() + t0, std::min(W, n - t0),
                         splat(scale), dq);
  }
  // pass 2: dk_k = scale Σ_t ds_tk q_t, dv_k = Σ_t p_tk keep_tk/keep_prob dout_t
  for (int s0 = 0; s0 < Sp; s0 += W) {
    lane_scores<D>(kt, Sp, s0, q, HD, act.data(), n, nullptr, scale, dsb);
    lane_scores<D>(vt, Sp, s0, dout, HD, act.data(), n, nullptr, 1.0f, pkb);
    const vf bl = load(bt + s0);
    const vu idx = lane_index(keys.data() + s0, base, 1);
    for (int a = 0; a < n; ++a) {
      const vf p = exp_nonpositive(load(dsb + a * W) + bl - mt[a]) * rzt[a];
      const vf pk = drop.threshold ? p * drop.keep(idx + static_cast<uint32_t>(act[a]) * S) : p;
      store(dsb + a * W, pk * load(pkb + a * W) - p * delta[a]);
      store(pkb + a * W, pk);
    }
    const int lanes = std::min(W, nk - s0);
    lane_weighted_sum<D>(dsb, q, HD, act.data(), n, keys.data() + s0, lanes, splat(scale), dk);
    lane_weighted_sum<D>(pkb, dout, HD, act.data(), n, keys.data() + s0, lanes, splat(1.0f), dv);
  }
}

// 5. Composite attention: the MCT's seven-pattern attention (models/mct.py) from its packed
// projections qkv (B, T, 3E), T = 3·L, E = H·D. For batch item b and head h (item b·H + h) the
// queries are q_t = scale·qkv[b, t, hD:(h+1)D] and the keys and values sit at offsets E and
// 2E. With section 1's statistics m_j, z_j, n_j of every query over key block j (L keys),
// a query of modality block i gets, for each of the four patterns p of that block
// (kSummary[i]), the softmax over the union of the pattern's blocks
//   o_p = Σ_j c_pj n_j / Σ_j c_pj z_j,  c_pj = [j in p] exp(m_j − max_{j' in p} m_j'),
// written to out[b, t, p·E + h·D : p·E + (h+1)·D]; m and z go to mz (B·H, 2, 3, T). The
// backward pass turns dout into section 1's block cotangents, with a_pj = c_pj / Σ_j c_pj z_j,
//   dn_j = Σ_p a_pj dout_p,  dz_j = −Σ_p a_pj (dout_p·o_p),
// runs section 1's backward on them and writes dqkv (B, T, 3E) (dq times scale).
constexpr int kSummary[3][4] = {{0, 1, 2, 4}, {0, 1, 3, 5}, {0, 2, 3, 6}};
constexpr bool kMember[7][3] = {{1, 1, 1}, {1, 1, 0}, {1, 0, 1}, {0, 1, 1},
                                {1, 0, 0}, {0, 1, 0}, {0, 0, 1}};

// mask (4, 3, Tp): 1 where key block j belongs to the p-th pattern of query t's block (padding
// lanes: those of block 0).
std::vector<float> composite_mask(int T, int L, int Tp) {
  std::vector<float> mask(static_cast<size_t>(12) * Tp, 0.0f);
  for (int t = 0; t < Tp; ++t) {
    const int i = t < T ? t / L : 0;
    for (int p = 0; p < 4; ++p)
      for (int j = 0; j < 3; ++j)
        mask[static_cast<size_t>(p * 3 + j) * Tp + t] = kMember[kSummary[i][p]][j] ? 1.0f : 0.0f;
  }
  return mask;
}

// The normalised pattern weights a_pj = c_pj / Σ_j c_pj z_j of W queries (mm: m_j, zz: z_j).
inline void pattern_weights(const vf* mm, const vf* zz, const float* mask, int Tp, int t0, int p,
                            vf* a) {
  vf in[3], top = splat(-__builtin_inff());
  for (int j = 0; j < 3; ++j) {
    in[j] = load(mask + static_cast<size_t>(p * 3 + j) * Tp + t0);
    top = in[j] > 0.0f ? vmax(top, mm[j]) : top;
  }
  vf den = splat(0.0f);
  for (int j = 0; j < 3; ++j) {
    a[j] = in[j] > 0.0f ? exp_nonpositive(mm[j] - top) : splat(0.0f);
    den = den + a[j] * zz[j];
  }
  const vf r = 1.0f / den;
  for (int j = 0; j < 3; ++j) a[j] = a[j] * r;
}

template <int D>
void composite_forward_item(const float* qkv, int T, int L, int E, int h, float scale,
                            const float* mask, float* out, float* mz, std::vector<float>& buf) {
  const int Tp = (T + W - 1) / W * W, ks = 3 * E;
  // qt (D, Tp), then per block: mx, zs (Tp), ns (D, Tp)
  buf.resize(static_cast<size_t>(D) * Tp + static_cast<size_t>(3) * (D + 2) * Tp);
  float* qt = buf.data();
  float* st = qt + static_cast<size_t>(D) * Tp;
  auto mx = [&](int j) { return st + static_cast<size_t>(j) * (D + 2) * Tp; };
  transpose_rows(qkv + h * D, T, D, ks, Tp, scale, qt);
  for (int j = 0; j < 3; ++j) {
    const float* kb = qkv + static_cast<size_t>(j) * L * ks + E + h * D;
    block_forward<D>(qt, Tp, kb, kb + E, ks, L, mx(j), mx(j) + Tp, mx(j) + 2 * Tp);
    std::copy(mx(j), mx(j) + T, mz + static_cast<size_t>(j) * T);
    std::copy(mx(j) + Tp, mx(j) + Tp + T, mz + static_cast<size_t>(3 + j) * T);
  }
  for (int t0 = 0; t0 < Tp; t0 += W) {
    vf mm[3], zz[3];
    for (int j = 0; j < 3; ++j) {
      mm[j] = load(mx(j) + t0);
      zz[j] = load(mx(j) + Tp + t0);
    }
    const int lanes = std::min(W, T - t0);
    for (int p = 0; p < 4; ++p) {
      vf a[3];
      pattern_weights(mm, zz, mask, Tp, t0, p, a);
      for (int d = 0; d < D; ++d) {
        vf o = splat(0.0f);
        for (int j = 0; j < 3; ++j) o = o + a[j] * load(mx(j) + (2 + d) * Tp + t0);
        float* dst = out + static_cast<size_t>(t0) * 4 * E + p * E + h * D + d;
        for (int l = 0; l < lanes; ++l) dst[static_cast<size_t>(l) * 4 * E] = o[l];
      }
    }
  }
}

template <int D>
void composite_backward_item(const float* qkv, const float* mz, const float* out,
                             const float* dout, int T, int L, int E, int h, float scale,
                             const float* mask, float* dqkv, std::vector<float>& buf) {
  const int Tp = (T + W - 1) / W * W, ks = 3 * E;
  // qt, dqt (D, Tp); per block: mt, dzt (Tp), dnt (D, Tp); dk and dv lane sums (L, D, W);
  // the blocks' z (3, Tp)
  buf.assign(static_cast<size_t>(2 * D) * Tp + static_cast<size_t>(3) * (D + 2) * Tp +
                 static_cast<size_t>(2) * L * D * W + static_cast<size_t>(3) * Tp, 0.0f);
  float* qt = buf.data();
  float* dqt = qt + static_cast<size_t>(D) * Tp;
  float* st = dqt + static_cast<size_t>(D) * Tp;
  float* dka = st + static_cast<size_t>(3) * (D + 2) * Tp;
  float* dva = dka + static_cast<size_t>(L) * D * W;
  float* zt = dva + static_cast<size_t>(L) * D * W;
  auto mt = [&](int j) { return st + static_cast<size_t>(j) * (D + 2) * Tp; };
  transpose_rows(qkv + h * D, T, D, ks, Tp, scale, qt);
  // padding lanes: m = 0, z = 1 (finite weights) and dout = 0, so dn = dz = 0 there
  std::fill(zt, zt + static_cast<size_t>(3) * Tp, 1.0f);
  for (int j = 0; j < 3; ++j) {
    std::copy(mz + static_cast<size_t>(j) * T, mz + static_cast<size_t>(j + 1) * T, mt(j));
    std::copy(mz + static_cast<size_t>(3 + j) * T, mz + static_cast<size_t>(4 + j) * T,
              zt + static_cast<size_t>(j) * Tp);
  }
  for (int t0 = 0; t0 < Tp; t0 += W) {
    vf mm[3], zz[3], dzs[3], dns[3][D];
    for (int j = 0; j < 3; ++j) {
      mm[j] = load(mt(j) + t0);
      zz[j] = load(zt + static_cast<size_t>(j) * Tp + t0);
      dzs[j] = splat(0.0f);
      for (int d = 0; d < D; ++d) dns[j][d] = splat(0.0f);
    }
    const int lanes = std::min(W, T - t0);
    for (int p = 0; p < 4; ++p) {
      vf a[3], go[D];
      pattern_weights(mm, zz, mask, Tp, t0, p, a);
      vf delta = splat(0.0f);
      for (int d = 0; d < D; ++d) {
        alignas(64) float o[W] = {}, g[W] = {};
        const size_t at = static_cast<size_t>(t0) * 4 * E + p * E + h * D + d;
        for (int l = 0; l < lanes; ++l) {
          o[l] = out[at + static_cast<size_t>(l) * 4 * E];
          g[l] = dout[at + static_cast<size_t>(l) * 4 * E];
        }
        go[d] = load(g);
        delta = delta + go[d] * load(o);
      }
      for (int j = 0; j < 3; ++j) {
        dzs[j] = dzs[j] - a[j] * delta;
        for (int d = 0; d < D; ++d) dns[j][d] = dns[j][d] + a[j] * go[d];
      }
    }
    for (int j = 0; j < 3; ++j) {
      store(mt(j) + Tp + t0, dzs[j]);
      for (int d = 0; d < D; ++d) store(mt(j) + (2 + d) * Tp + t0, dns[j][d]);
    }
  }
  for (int j = 0; j < 3; ++j) {
    const float* kb = qkv + static_cast<size_t>(j) * L * ks + E + h * D;
    block_backward<D>(qt, Tp, kb, kb + E, ks, L, mt(j), mt(j) + Tp, mt(j) + 2 * Tp, dqt, dka, dva);
    // lane sums into the front of the accumulators (row r's sum lands at or before row r)
    reduce_lanes(dka, L * D, dka);
    reduce_lanes(dva, L * D, dva);
    for (int key = 0; key < L; ++key) {
      float* dk = dqkv + static_cast<size_t>(j * L + key) * ks + E + h * D;
      std::copy(dka + key * D, dka + (key + 1) * D, dk);
      std::copy(dva + key * D, dva + (key + 1) * D, dk + E);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int d = 0; d < D; ++d)
      dqkv[static_cast<size_t>(t) * ks + h * D + d] = scale * dqt[static_cast<size_t>(d) * Tp + t];
}

// 6. LayerNorm over the last axis: rows x_r (R rows of E), y = (x − μ)·ρ·γ + β with
// μ = mean(x), ρ = 1/√(mean((x − μ)²) + eps) (two passes over the row, as torch), and the
// statistics (μ, ρ) per row for the backward pass, which writes, with x̂ = (x − μ)ρ, g = dy·γ,
//   dx = ρ (g − mean(g) − x̂ mean(g·x̂)),
// and the partial sums Σ dy·x̂ and Σ dy of dγ and dβ over kLnParts contiguous row ranges
// (the caller adds the kLnParts rows).
constexpr int kLnParts = 16;

inline float hsum(vf x) {
  float s = 0.0f;
  for (int l = 0; l < W; ++l) s += x[l];
  return s;
}

// Entries i.. of a row of E: a vector of W where a whole one fits, else entry i in every lane
// (row_sum then takes lane 0 only).
inline vf chunk_at(const float* p, int i, int E) {
  return i + W <= E ? load(p + i) : splat(p[i]);
}

// Σ_i f(i) over the E entries of a row, W at a time (lanes past E contribute 0).
template <typename F>
inline float row_sum(int E, F&& f) {
  vf acc = splat(0.0f);
  int i = 0;
  for (; i + W <= E; i += W) acc = acc + f(i);
  float s = hsum(acc);
  for (; i < E; ++i) s += f(i)[0];
  return s;
}

void ln_forward_rows(const float* x, const float* gamma, const float* beta, int E, float eps,
                     int r0, int r1, float* y, float* stats) {
  for (int r = r0; r < r1; ++r) {
    const float* xr = x + static_cast<size_t>(r) * E;
    float* yr = y + static_cast<size_t>(r) * E;
    const float mu = row_sum(E, [&](int i) { return chunk_at(xr, i, E); }) / E;
    const float var = row_sum(E, [&](int i) {
      const vf d = chunk_at(xr, i, E) - mu;
      return d * d;
    }) / E;
    const float rho = 1.0f / std::sqrt(var + eps);
    int i = 0;
    for (; i + W <= E; i += W)
      store(yr + i, (load(xr + i) - mu) * rho * load(gamma + i) + load(beta + i));
    for (; i < E; ++i) yr[i] = (xr[i] - mu) * rho * gamma[i] + beta[i];
    stats[2 * r] = mu;
    stats[2 * r + 1] = rho;
  }
}

void ln_backward_rows(const float* x, const float* gamma, const float* stats, const float* dy,
                      int E, int r0, int r1, float* dx, float* dgamma, float* dbeta) {
  std::fill(dgamma, dgamma + E, 0.0f);
  std::fill(dbeta, dbeta + E, 0.0f);
  for (int r = r0; r < r1; ++r) {
    const float* xr = x + static_cast<size_t>(r) * E;
    const float* gr = dy + static_cast<size_t>(r) * E;
    float* dr = dx + static_cast<size_t>(r) * E;
    const float mu = stats[2 * r], rho = stats[2 * r + 1];
    const float mg =
        row_sum(E, [&](int i) { return chunk_at(gr, i, E) * chunk_at(gamma, i, E); }) / E;
    const float mgx = row_sum(E, [&](int i) {
      return chunk_at(gr, i, E) * chunk_at(gamma, i, E) * ((chunk_at(xr, i, E) - mu) * rho);
    }) / E;
    int i = 0;
    for (; i + W <= E; i += W) {
      const vf xh = (load(xr + i) - mu) * rho, g = load(gr + i);
      store(dr + i, rho * (g * load(gamma + i) - mg - xh * mgx));
      store(dgamma + i, load(dgamma + i) + g * xh);
      store(dbeta + i, load(dbeta + i) + g);
    }
    for (; i < E; ++i) {
      const float xh = (xr[i] - mu) * rho, g = gr[i];
      dr[i] = rho * (g * gamma[i] - mg - xh * mgx);
      dgamma[i] += g * xh;
      dbeta[i] += g;
    }
  }
}

// 7. Weight gradient of a dense layer y = x·w + b over M rows: dw = xᵀ·dy (K, N) and
// db = Σ_m dy_m (N), x (M, K) and dy (M, N) row-major, read in place (no transposed copies).
// Up to kWgSplitWeights weights the rows of x are split into parts on the pool, each summed
// into its own (K + 1, N) partial (row K: db), and the caller adds the parts; above it each
// part owns a range of dw's rows over all of x. Within a part, a tile of kWgTile rows at a
// time, a block of KB rows of dw by NV vectors of columns lives in registers: per row m, NV
// vectors of dy times KB broadcast entries of x.
constexpr int kWgTile = 256;
// Above this many weights (K·N) the parts split dw's rows instead of x's.
constexpr int64_t kWgSplitWeights = 64 * 1024;

// acc (KB × NV vectors) += Σ_{m in [m0, m1)} x[m·K + i]·dy[m·N + c], i < KB, c < NV·W.
template <int KB, int NV>
inline void wg_rows(const float* x, int K, const float* dy, int N, int m0, int m1, vf* acc) {
  for (int m = m0; m < m1; ++m) {
    const float* xr = x + static_cast<size_t>(m) * K;
    const float* dr = dy + static_cast<size_t>(m) * N;
    vf d[NV];
    for (int j = 0; j < NV; ++j) d[j] = load(dr + j * W);
    for (int i = 0; i < KB; ++i) {
      const vf xb = splat(xr[i]);
      for (int j = 0; j < NV; ++j) acc[i * NV + j] += xb * d[j];
    }
  }
}

// Rows k0..k0+KB of dw (K, N) at columns n0..n0+cols (cols <= NV·W) += the sum over rows
// [m0, m1) of x (M, K) and dy (M, N). Rows whose NV full vectors stay inside dy are read in
// place (lanes past `cols` add up entries that are not stored); the last few go through a
// zero-padded copy.
template <int KB, int NV>
void wg_block(const float* x, int K, const float* dy, int M, int N, int m0, int m1, int k0,
              int n0, int cols, float* dw) {
  vf acc[KB * NV];
  for (int i = 0; i < KB * NV; ++i) acc[i] = splat(0.0f);
  const int64_t room = static_cast<int64_t>(M) * N - n0 - NV * W;  // last in-place start
  const int safe = room < 0 ? 0 : static_cast<int>(std::min<int64_t>(M, room / N + 1));
  const int ms = std::max(m0, std::min(m1, safe));
  wg_rows<KB, NV>(x + k0, K, dy + n0, N, m0, ms, acc);
  for (int m = ms; m < m1; ++m) {
    float pad[NV * W] = {};
    std::memcpy(pad, dy + static_cast<size_t>(m) * N + n0, cols * sizeof(float));
    wg_rows<KB, NV>(x + static_cast<size_t>(m) * K + k0, K, pad, 0, 0, 1, acc);
  }
  for (int i = 0; i < KB; ++i) {
    float* o = dw + static_cast<size_t>(k0 + i) * N + n0;
    int c = 0;
    for (int j = 0; j < NV; ++j, c += W) {
      if (c + W <= cols) {
        store(o + c, load(o + c) + acc[i * NV + j]);
      } else {
        for (int l = 0; c + l < cols; ++l) o[c + l] += acc[i * NV + j][l];
      }
    }
  }
}

// Rows per register block for NV vectors: KB·NV accumulators, NV loads and a broadcast in
// the registers (24, 12, 8, 6 rows with 32 of them; 12, 6, 4, 2 with 16).
template <int NV>
constexpr int wg_kb() { return std::min(kVecRegs * 3 / 4 / NV, (kVecRegs - 1 - NV) / NV); }

typedef void (*WgFn)(const float*, int, const float*, int, int, int, int, int, int, int, float*);

template <int NV, int... KBs>
constexpr std::array<WgFn, sizeof...(KBs)> wg_table(std::integer_sequence<int, KBs...>) {
  return {&wg_block<KBs + 1, NV>...};
}

// wg_block for any KB in 1..wg_kb<NV>().
template <int NV>
void wg_any_block(int kb, const float* x, int K, const float* dy, int M, int N, int m0, int m1,
                  int k0, int n0, int cols, float* dw) {
  static constexpr auto table = wg_table<NV>(std::make_integer_sequence<int, wg_kb<NV>()>{});
  table[kb - 1](x, K, dy, M, N, m0, m1, k0, n0, cols, dw);
}

// Rows [ka, kb) of dw (K, N) from the rows [m0, m1) of x and dy, overwritten; with db set,
// also db (N) = Σ dy over those rows.
void wg_part(const float* x, const float* dy, int M, int K, int N, int m0, int m1, int ka,
             int kb, float* dw, float* db) {
  std::fill(dw + static_cast<size_t>(ka) * N, dw + static_cast<size_t>(kb) * N, 0.0f);
  if (db) std::fill(db, db + N, 0.0f);
  for (int t0 = m0; t0 < m1; t0 += kWgTile) {
    const int t1 = std::min(m1, t0 + kWgTile);
    for (int n0 = 0; n0 < N; n0 += 4 * W) {
      const int cols = std::min(4 * W, N - n0);
      const int nv = (cols + W - 1) / W;
      auto run = [&](auto nvc) {
        constexpr int NV = decltype(nvc)::value;
        constexpr int KB = wg_kb<NV>();
        for (int k0 = ka; k0 < kb; k0 += KB)
          wg_any_block<NV>(std::min(KB, kb - k0), x, K, dy, M, N, t0, t1, k0, n0, cols, dw);
      };
      switch (nv) {
        case 1: run(std::integral_constant<int, 1>{}); break;
        case 2: run(std::integral_constant<int, 2>{}); break;
        case 3: run(std::integral_constant<int, 3>{}); break;
        default: run(std::integral_constant<int, 4>{}); break;
      }
    }
    if (!db) continue;
    for (int m = t0; m < t1; ++m) {
      const float* dr = dy + static_cast<size_t>(m) * N;
      int n = 0;
      for (; n + W <= N; n += W) store(db + n, load(db + n) + load(dr + n));
      for (; n < N; ++n) db[n] += dr[n];
    }
  }
}

// Runs body(begin, end) over [0, items) in contiguous chunks. Chunks are claimed from an
// atomic counter by the caller and by tasks scheduled on XLA's intra-op pool, so the caller
// does all the work itself when the pool is busy elsewhere; it returns once every claimed
// chunk is done. Tasks that start after that find no chunk left and touch nothing else.
struct Work {
  std::atomic<int> next{0};
  int chunks = 0, items = 0, finished = 0;
  std::mutex mu;
  std::condition_variable all_done;
  const std::function<void(int, int)>* body = nullptr;

  // claims and runs chunks until none is left; returns how many it ran
  int drain() {
    int ran = 0;
    for (int c; (c = next.fetch_add(1)) < chunks; ++ran)
      (*body)(static_cast<int>(static_cast<int64_t>(items) * c / chunks),
              static_cast<int>(static_cast<int64_t>(items) * (c + 1) / chunks));
    return ran;
  }
  void add_finished(int ran) {
    if (ran == 0) return;
    std::lock_guard<std::mutex> lock(mu);
    finished += ran;
    if (finished == chunks) all_done.notify_all();
  }
};

void parallel_for(ffi::ThreadPool& pool, int items, const std::function<void(int, int)>& body) {
  const int64_t threads = pool.num_threads();
  const int chunks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(items, 4 * (threads + 1))));
  if (threads <= 0 || chunks == 1) {
    body(0, items);
    return;
  }
  auto work = std::make_shared<Work>();
  work->chunks = chunks;
  work->items = items;
  work->body = &body;
  for (int64_t t = 0; t < std::min<int64_t>(threads, chunks - 1); ++t)
    pool.Schedule([work] { work->add_finished(work->drain()); });
  work->add_finished(work->drain());
  std::unique_lock<std::mutex> lock(work->mu);
  work->all_done.wait(lock, [&] { return work->finished == work->chunks; });
}

struct Shapes {
  int items, T, S, D, Lb;
};

ffi::Error check_shapes(ffi::AnyBuffer::Dimensions qd, ffi::AnyBuffer::Dimensions kd,
                        ffi::AnyBuffer::Dimensions vd, int64_t block_len, Shapes* out) {
  if (qd.size() != 3 || kd.size() != 3 || vd.size() != 3)
    return ffi::Error::InvalidArgument("cider attention kernel: q, k, v must be (items, length, D)");
  if (kd[0] != qd[0] || vd[0] != qd[0] || kd[1] != vd[1] || kd[2] != qd[2] || vd[2] != qd[2])
    return ffi::Error::InvalidArgument("cider attention kernel: q, k, v disagree in items or D");
  if (block_len <= 0 || kd[1] % block_len != 0)
    return ffi::Error::InvalidArgument("cider attention kernel: key length not a multiple of block_len");
  *out = Shapes{static_cast<int>(qd[0]), static_cast<int>(qd[1]), static_cast<int>(kd[1]),
                static_cast<int>(qd[2]), static_cast<int>(block_len)};
  return ffi::Error::Success();
}

template <typename F>
ffi::Error dispatch_d(int D, F&& f) {
  switch (D) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 24: f(std::integral_constant<int, 24>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: return ffi::Error::InvalidArgument("cider attention kernel: head size must be 1, 2, 4, 8, 16, 24, 32 or 64");
  }
  return ffi::Error::Success();
}

// Runs item(D as an integral constant, i, q offset, k offset, scratch) for every item i, on
// the intra-op pool, with the head size D of the shapes as a compile-time constant.
template <typename ItemFn>
ffi::Error for_each_item(ffi::ThreadPool& pool, const Shapes& sh, ItemFn&& item) {
  return dispatch_d(sh.D, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    parallel_for(pool, sh.items, [&](int begin, int end) {
      std::vector<float> buf;
      for (int i = begin; i < end; ++i)
        item(dc, i, static_cast<size_t>(i) * sh.T * D, static_cast<size_t>(i) * sh.S * D, buf);
    });
  });
}

ffi::Error Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                   ffi::Buffer<ffi::F32> v, int64_t block_len, ffi::ResultBuffer<ffi::F32> m,
                   ffi::ResultBuffer<ffi::F32> z, ffi::ResultBuffer<ffi::F32> n) {
  Shapes sh;
  if (auto err = check_shapes(q.dimensions(), k.dimensions(), v.dimensions(), block_len, &sh);
      err.failure())
    return err;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *mp = m->typed_data(), *zp = z->typed_data(), *np_ = n->typed_data();
  return for_each_item(pool, sh, [&](auto dc, int i, size_t qo, size_t ko, std::vector<float>& buf) {
    forward_item<decltype(dc)::value>(qp + qo, kp + ko, vp + ko, sh.T, sh.S, sh.Lb, i, sh.items,
                                      mp, zp, np_, buf);
  });
}

ffi::Error Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> dz,
                    ffi::Buffer<ffi::F32> dn, int64_t block_len, ffi::ResultBuffer<ffi::F32> dq,
                    ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  Shapes sh;
  if (auto err = check_shapes(q.dimensions(), k.dimensions(), v.dimensions(), block_len, &sh);
      err.failure())
    return err;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *mp = m.typed_data(), *dzp = dz.typed_data(), *dnp = dn.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  return for_each_item(pool, sh, [&](auto dc, int i, size_t qo, size_t ko, std::vector<float>& buf) {
    backward_item<decltype(dc)::value>(qp + qo, kp + ko, vp + ko, mp, dzp, dnp, sh.T, sh.S, sh.Lb,
                                       i, sh.items, dqp + qo, dkp + ko, dvp + ko, buf);
  });
}

ffi::Error KlForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qa, ffi::Buffer<ffi::F32> ka,
                     ffi::Buffer<ffi::F32> qb, ffi::Buffer<ffi::F32> kb,
                     ffi::ResultBuffer<ffi::F32> kl, ffi::ResultBuffer<ffi::F32> lse_a,
                     ffi::ResultBuffer<ffi::F32> lse_b) {
  Shapes sh;
  if (auto err = check_shapes(qa.dimensions(), ka.dimensions(), kb.dimensions(),
                                 ka.dimensions().size() == 3 ? ka.dimensions()[1] : 1, &sh);
      err.failure())
    return err;
  if (qb.dimensions().size() != 3 || qb.dimensions()[0] != sh.items || qb.dimensions()[1] != sh.T ||
      qb.dimensions()[2] != sh.D)
    return ffi::Error::InvalidArgument("cider attention kernel: teacher and student queries differ in shape");
  const float *qap = qa.typed_data(), *kap = ka.typed_data(), *qbp = qb.typed_data(),
              *kbp = kb.typed_data();
  float *klp = kl->typed_data(), *lap = lse_a->typed_data(), *lbp = lse_b->typed_data();
  return for_each_item(pool, sh, [&](auto dc, int i, size_t qo, size_t ko, std::vector<float>& buf) {
    const size_t ro = static_cast<size_t>(i) * sh.T;
    kl_forward_item<decltype(dc)::value>(qap + qo, kap + ko, qbp + qo, kbp + ko, sh.T, sh.S,
                                         klp + ro, lap + ro, lbp + ro, buf);
  });
}

ffi::Error KlBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qa, ffi::Buffer<ffi::F32> ka,
                      ffi::Buffer<ffi::F32> qb, ffi::Buffer<ffi::F32> kb,
                      ffi::Buffer<ffi::F32> lse_a, ffi::Buffer<ffi::F32> lse_b,
                      ffi::Buffer<ffi::F32> dkl, ffi::ResultBuffer<ffi::F32> dqb,
                      ffi::ResultBuffer<ffi::F32> dkb) {
  Shapes sh;
  if (auto err = check_shapes(qa.dimensions(), ka.dimensions(), kb.dimensions(),
                                 ka.dimensions().size() == 3 ? ka.dimensions()[1] : 1, &sh);
      err.failure())
    return err;
  const float *qap = qa.typed_data(), *kap = ka.typed_data(), *qbp = qb.typed_data(),
              *kbp = kb.typed_data(), *lap = lse_a.typed_data(), *lbp = lse_b.typed_data(),
              *gp = dkl.typed_data();
  float *dqp = dqb->typed_data(), *dkp = dkb->typed_data();
  return for_each_item(pool, sh, [&](auto dc, int i, size_t qo, size_t ko, std::vector<float>& buf) {
    const size_t ro = static_cast<size_t>(i) * sh.T;
    kl_backward_item<decltype(dc)::value>(qap + qo, kap + ko, qbp + qo, kbp + ko, lap + ro,
                                          lbp + ro, gp + ro, sh.T, sh.S, dqp + qo, dkp + ko, buf);
  });
}

struct MaskedShapes {
  int G, T, S, H, D;
};

ffi::Error check_masked(ffi::AnyBuffer::Dimensions qd, ffi::AnyBuffer::Dimensions kd,
                        ffi::AnyBuffer::Dimensions vd, ffi::AnyBuffer::Dimensions bd,
                        ffi::AnyBuffer::Dimensions rd, ffi::AnyBuffer::Dimensions cd,
                        ffi::AnyBuffer::Dimensions sd, int64_t threshold, float keep_prob,
                        MaskedShapes* out) {
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || bd.size() != 2 || sd.size() != 1)
    return ffi::Error::InvalidArgument(
        "cider masked attention: q (G, T, H, D), k, v (G, S, H, D), bias (G, S), seed (2,)");
  for (int a : {0, 2, 3})
    if (kd[a] != qd[a] || vd[a] != qd[a])
      return ffi::Error::InvalidArgument("cider masked attention: q, k, v disagree in G, H or D");
  if (kd[1] != vd[1] || bd[0] != qd[0] || bd[1] != kd[1] || sd[0] != 2)
    return ffi::Error::InvalidArgument("cider masked attention: k, v, bias disagree in S, or seed is not (2,)");
  if (rd.size() != 2 || cd.size() != 2 || rd[0] != qd[0] || rd[1] != qd[1] || cd[0] != qd[0] ||
      cd[1] != kd[1])
    return ffi::Error::InvalidArgument("cider masked attention: rows must be (G, T) and cols (G, S)");
  if (qd[0] * qd[2] * qd[1] * kd[1] >= (int64_t{1} << 32))
    return ffi::Error::InvalidArgument("cider masked attention: the weights exceed a 32-bit dropout counter");
  if (threshold < 0 || threshold >= (int64_t{1} << 32) || !(keep_prob > 0.0f))
    return ffi::Error::InvalidArgument("cider masked attention: bad dropout threshold or keep_prob");
  *out = MaskedShapes{static_cast<int>(qd[0]), static_cast<int>(qd[1]), static_cast<int>(kd[1]),
                      static_cast<int>(qd[2]), static_cast<int>(qd[3])};
  return ffi::Error::Success();
}

// Runs item(D as an integral constant, i, g, q offset, k offset, scratch) for every item
// i = g·H + h of the masked attention, on the intra-op pool.
template <typename ItemFn>
ffi::Error for_each_masked_item(ffi::ThreadPool& pool, const MaskedShapes& sh, ItemFn&& item) {
  return dispatch_d(sh.D, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    parallel_for(pool, sh.G * sh.H, [&](int begin, int end) {
      std::vector<float> buf;
      std::vector<int> act, keys;
      for (int i = begin; i < end; ++i) {
        const int g = i / sh.H, h = i % sh.H;
        item(dc, i, g, (static_cast<size_t>(g) * sh.T * sh.H + h) * D,
             (static_cast<size_t>(g) * sh.S * sh.H + h) * D, buf, act, keys);
      }
    });
  });
}

Drop make_drop(const uint32_t* seed, int64_t threshold, float keep_prob) {
  Drop drop;
  drop.s0 = seed[0];
  drop.s1 = seed[1];
  drop.threshold = static_cast<uint32_t>(threshold);
  drop.scale = threshold ? 1.0f / keep_prob : 1.0f;
  return drop;
}

ffi::Error MaskedForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                         ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                         ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::F32> cols,
                         ffi::Buffer<ffi::U32> seed, float scale, int64_t threshold,
                         float keep_prob, ffi::ResultBuffer<ffi::F32> out,
                         ffi::ResultBuffer<ffi::F32> m, ffi::ResultBuffer<ffi::F32> z) {
  MaskedShapes sh;
  if (auto err = check_masked(q.dimensions(), k.dimensions(), v.dimensions(), bias.dimensions(),
                              rows.dimensions(), cols.dimensions(), seed.dimensions(), threshold,
                              keep_prob, &sh);
      err.failure())
    return err;
  const Drop drop = make_drop(seed.typed_data(), threshold, keep_prob);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(),
              *bp = bias.typed_data(), *rp = rows.typed_data(), *cp = cols.typed_data();
  float *op = out->typed_data(), *mp = m->typed_data(), *zp = z->typed_data();
  const int HD = sh.H * sh.D;
  return for_each_masked_item(pool, sh, [&](auto dc, int i, int g, size_t qo, size_t ko,
                                            std::vector<float>& buf, std::vector<int>& act,
                                            std::vector<int>& keys) {
    const size_t ro = static_cast<size_t>(i) * sh.T, go = static_cast<size_t>(g);
    masked_forward_item<decltype(dc)::value>(
        qp + qo, kp + ko, vp + ko, bp + go * sh.S, rp + go * sh.T, cp + go * sh.S, sh.T, sh.S,
        HD, scale, drop, static_cast<uint32_t>(ro * sh.S), op + qo, mp + ro, zp + ro, buf, act,
        keys);
  });
}

ffi::Error MaskedBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                          ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> bias,
                          ffi::Buffer<ffi::F32> rows, ffi::Buffer<ffi::F32> cols,
                          ffi::Buffer<ffi::U32> seed, ffi::Buffer<ffi::F32> m,
                          ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::F32> out,
                          ffi::Buffer<ffi::F32> dout, float scale, int64_t threshold,
                          float keep_prob, ffi::ResultBuffer<ffi::F32> dq,
                          ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  MaskedShapes sh;
  if (auto err = check_masked(q.dimensions(), k.dimensions(), v.dimensions(), bias.dimensions(),
                              rows.dimensions(), cols.dimensions(), seed.dimensions(), threshold,
                              keep_prob, &sh);
      err.failure())
    return err;
  const Drop drop = make_drop(seed.typed_data(), threshold, keep_prob);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(),
              *bp = bias.typed_data(), *mp = m.typed_data(), *zp = z.typed_data(),
              *op = out.typed_data(), *gp = dout.typed_data(), *rp = rows.typed_data(),
              *cp = cols.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  const int HD = sh.H * sh.D;
  return for_each_masked_item(pool, sh, [&](auto dc, int i, int g, size_t qo, size_t ko,
                                            std::vector<float>& buf, std::vector<int>& act,
                                            std::vector<int>& keys) {
    const size_t ro = static_cast<size_t>(i) * sh.T, go = static_cast<size_t>(g);
    masked_backward_item<decltype(dc)::value>(
        qp + qo, kp + ko, vp + ko, bp + go * sh.S, rp + go * sh.T, cp + go * sh.S, mp + ro,
        zp + ro, op + qo, gp + qo, sh.T, sh.S, HD, scale, drop,
        static_cast<uint32_t>(ro * sh.S), dqp + qo, dkp + ko, dvp + ko, buf, act, keys);
  });
}

ffi::Error check_gru(ffi::AnyBuffer::Dimensions gd, ffi::AnyBuffer::Dimensions wd,
                     ffi::AnyBuffer::Dimensions cd, int* M, int* B, int* T, int* H) {
  if (gd.size() != 4 || wd.size() != 3 || cd.size() != 2)
    return ffi::Error::InvalidArgument("cider gru kernel: gx (M, B, T, 3H), W (M, H, 3H), c (M, 3H)");
  if (wd[0] != gd[0] || cd[0] != gd[0] || wd[2] != 3 * wd[1] || gd[3] != wd[2] || cd[1] != wd[2])
    return ffi::Error::InvalidArgument("cider gru kernel: gx, W and c disagree in M or H");
  *M = static_cast<int>(gd[0]);
  *B = static_cast<int>(gd[1]);
  *T = static_cast<int>(gd[2]);
  *H = static_cast<int>(wd[1]);
  return ffi::Error::Success();
}

ffi::Error check_gru_states(int M, int B, int T, int H, ffi::AnyBuffer::Dimensions d, int width) {
  if (d.size() != 4 || d[0] != M || d[1] != B || d[2] != T || d[3] != width)
    return ffi::Error::InvalidArgument("cider gru kernel: hs (M, B, T, H), ghs (M, B, T, 3H), dhs (M, B, T, H)");
  return ffi::Error::Success();
}

std::vector<GruWeights> gru_weights(const float* w, const float* c, int M, int H) {
  std::vector<GruWeights> out;
  const size_t G = 3 * static_cast<size_t>(H);
  for (int m = 0; m < M; ++m) out.emplace_back(w + m * H * G, c + m * G, H);
  return out;
}

ffi::Error GruForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gx, ffi::Buffer<ffi::F32> w,
                      ffi::Buffer<ffi::F32> c, ffi::ResultBuffer<ffi::F32> hs,
                      ffi::ResultBuffer<ffi::F32> ghs) {
  int M, B, T, H;
  if (auto err = check_gru(gx.dimensions(), w.dimensions(), c.dimensions(), &M, &B, &T, &H);
      err.failure())
    return err;
  const float* gp = gx.typed_data();
  float *hp = hs->typed_data(), *ghp = ghs->typed_data();
  const size_t G = 3 * static_cast<size_t>(H), Hs = static_cast<size_t>(H);
  const std::vector<GruWeights> weights = gru_weights(w.typed_data(), c.typed_data(), M, H);
  parallel_for(pool, M * B, [&](int begin, int end) {
    std::vector<float> buf;
    for (int i = begin; i < end; ++i)
      gru_forward_item(gp + i * T * G, weights[i / B], T, hp + i * T * Hs, ghp + i * T * G, buf);
  });
  return ffi::Error::Success();
}

ffi::Error GruBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> gx, ffi::Buffer<ffi::F32> w,
                       ffi::Buffer<ffi::F32> c, ffi::Buffer<ffi::F32> hs,
                       ffi::Buffer<ffi::F32> ghs, ffi::Buffer<ffi::F32> dhs,
                       ffi::ResultBuffer<ffi::F32> dgx, ffi::ResultBuffer<ffi::F32> dghs) {
  int M, B, T, H;
  if (auto err = check_gru(gx.dimensions(), w.dimensions(), c.dimensions(), &M, &B, &T, &H);
      err.failure())
    return err;
  for (auto [d, width] : {std::pair{hs.dimensions(), H}, std::pair{ghs.dimensions(), 3 * H},
                          std::pair{dhs.dimensions(), H}})
    if (auto err = check_gru_states(M, B, T, H, d, width); err.failure()) return err;
  const float *gp = gx.typed_data(), *hp = hs.typed_data(), *ghp = ghs.typed_data(),
              *dhp = dhs.typed_data();
  float *dgp = dgx->typed_data(), *dghp = dghs->typed_data();
  const size_t G = 3 * static_cast<size_t>(H), Hs = static_cast<size_t>(H);
  const std::vector<GruWeights> weights = gru_weights(w.typed_data(), c.typed_data(), M, H);
  parallel_for(pool, M * B, [&](int begin, int end) {
    std::vector<float> buf;
    for (int i = begin; i < end; ++i)
      gru_backward_item(gp + i * T * G, weights[i / B], hp + i * T * Hs, ghp + i * T * G,
                        dhp + i * T * Hs, T, dgp + i * T * G, dghp + i * T * G, buf);
  });
  return ffi::Error::Success();
}

struct CompositeShapes {
  int B, T, L, E, H, D;
};

ffi::Error check_composite(ffi::AnyBuffer::Dimensions xd, int64_t heads, int64_t block_len,
                           CompositeShapes* out) {
  if (xd.size() != 3 || xd[2] % 3 != 0)
    return ffi::Error::InvalidArgument("cider composite attention: qkv must be (B, T, 3E)");
  const int64_t E = xd[2] / 3;
  if (heads <= 0 || E % heads != 0)
    return ffi::Error::InvalidArgument("cider composite attention: heads must divide E");
  if (block_len <= 0 || xd[1] != 3 * block_len)
    return ffi::Error::InvalidArgument("cider composite attention: T must be 3·block_len");
  *out = CompositeShapes{static_cast<int>(xd[0]), static_cast<int>(xd[1]),
                         static_cast<int>(block_len), static_cast<int>(E),
                         static_cast<int>(heads), static_cast<int>(E / heads)};
  return ffi::Error::Success();
}

ffi::Error check_composite_rest(const CompositeShapes& sh, std::initializer_list<ffi::AnyBuffer::Dimensions> outs,
                                ffi::AnyBuffer::Dimensions mzd) {
  for (auto od : outs)
    if (od.size() != 3 || od[0] != sh.B || od[1] != sh.T || od[2] != 4 * sh.E)
      return ffi::Error::InvalidArgument("cider composite attention: out, dout must be (B, T, 4E)");
  if (mzd.size() != 4 || mzd[0] != static_cast<int64_t>(sh.B) * sh.H || mzd[1] != 2 ||
      mzd[2] != 3 || mzd[3] != sh.T)
    return ffi::Error::InvalidArgument("cider composite attention: mz must be (B·H, 2, 3, T)");
  return ffi::Error::Success();
}

// Runs item(D as an integral constant, b, h, item index, scratch) for every (b, h) on the
// intra-op pool.
template <typename ItemFn>
ffi::Error for_each_composite_item(ffi::ThreadPool& pool, const CompositeShapes& sh, ItemFn&& item) {
  return dispatch_d(sh.D, [&](auto dc) {
    parallel_for(pool, sh.B * sh.H, [&](int begin, int end) {
      std::vector<float> buf;
      for (int i = begin; i < end; ++i) item(dc, i / sh.H, i % sh.H, i, buf);
    });
  });
}

ffi::Error CompositeForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv, int64_t heads,
                            int64_t block_len, float scale, ffi::ResultBuffer<ffi::F32> out,
                            ffi::ResultBuffer<ffi::F32> mz) {
  CompositeShapes sh;
  if (auto err = check_composite(qkv.dimensions(), heads, block_len, &sh); err.failure()) return err;
  if (auto err = check_composite_rest(sh, {out->dimensions()}, mz->dimensions()); err.failure())
    return err;
  const int Tp = (sh.T + W - 1) / W * W;
  const std::vector<float> mask = composite_mask(sh.T, sh.L, Tp);
  const float* xp = qkv.typed_data();
  float *op = out->typed_data(), *mp = mz->typed_data();
  const size_t xs = static_cast<size_t>(sh.T) * 3 * sh.E, os = static_cast<size_t>(sh.T) * 4 * sh.E;
  return for_each_composite_item(pool, sh, [&](auto dc, int b, int h, int i, std::vector<float>& buf) {
    composite_forward_item<decltype(dc)::value>(xp + b * xs, sh.T, sh.L, sh.E, h, scale,
                                                mask.data(), op + b * os,
                                                mp + static_cast<size_t>(i) * 6 * sh.T, buf);
  });
}

ffi::Error CompositeBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                             ffi::Buffer<ffi::F32> mz, ffi::Buffer<ffi::F32> out,
                             ffi::Buffer<ffi::F32> dout, int64_t heads, int64_t block_len,
                             float scale, ffi::ResultBuffer<ffi::F32> dqkv) {
  CompositeShapes sh;
  if (auto err = check_composite(qkv.dimensions(), heads, block_len, &sh); err.failure()) return err;
  if (auto err = check_composite_rest(sh, {out.dimensions(), dout.dimensions()}, mz.dimensions());
      err.failure())
    return err;
  const int Tp = (sh.T + W - 1) / W * W;
  const std::vector<float> mask = composite_mask(sh.T, sh.L, Tp);
  const float *xp = qkv.typed_data(), *mp = mz.typed_data(), *op = out.typed_data(),
              *gp = dout.typed_data();
  float* dxp = dqkv->typed_data();
  const size_t xs = static_cast<size_t>(sh.T) * 3 * sh.E, os = static_cast<size_t>(sh.T) * 4 * sh.E;
  return for_each_composite_item(pool, sh, [&](auto dc, int b, int h, int i, std::vector<float>& buf) {
    composite_backward_item<decltype(dc)::value>(
        xp + b * xs, mp + static_cast<size_t>(i) * 6 * sh.T, op + b * os, gp + b * os, sh.T,
        sh.L, sh.E, h, scale, mask.data(), dxp + b * xs, buf);
  });
}

ffi::Error check_ln(ffi::AnyBuffer::Dimensions xd, ffi::AnyBuffer::Dimensions gd,
                    ffi::AnyBuffer::Dimensions bd, int64_t* R, int* E) {
  if (xd.size() < 1 || gd.size() != 1 || bd.size() != 1 || gd[0] != xd[xd.size() - 1] ||
      bd[0] != gd[0])
    return ffi::Error::InvalidArgument("cider layer norm: x (..., E), scale and bias (E,)");
  *E = static_cast<int>(gd[0]);
  *R = 1;
  for (size_t a = 0; a + 1 < xd.size(); ++a) *R *= xd[a];
  if (*E <= 0) return ffi::Error::InvalidArgument("cider layer norm: empty rows");
  return ffi::Error::Success();
}

// Runs body(first row, end row, part) for the kLnParts contiguous row ranges on the pool.
template <typename F>
void for_each_ln_part(ffi::ThreadPool& pool, int64_t R, F&& body) {
  parallel_for(pool, kLnParts, [&](int begin, int end) {
    for (int p = begin; p < end; ++p)
      body(static_cast<int>(R * p / kLnParts), static_cast<int>(R * (p + 1) / kLnParts), p);
  });
}

ffi::Error LnForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                     ffi::Buffer<ffi::F32> beta, float eps, ffi::ResultBuffer<ffi::F32> y,
                     ffi::ResultBuffer<ffi::F32> stats) {
  int64_t R;
  int E;
  if (auto err = check_ln(x.dimensions(), gamma.dimensions(), beta.dimensions(), &R, &E);
      err.failure())
    return err;
  const float *xp = x.typed_data(), *gp = gamma.typed_data(), *bp = beta.typed_data();
  float *yp = y->typed_data(), *sp = stats->typed_data();
  for_each_ln_part(pool, R, [&](int r0, int r1, int) {
    ln_forward_rows(xp, gp, bp, E, eps, r0, r1, yp, sp);
  });
  return ffi::Error::Success();
}

ffi::Error LnBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gamma,
                      ffi::Buffer<ffi::F32> stats, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dx, ffi::ResultBuffer<ffi::F32> dgamma,
                      ffi::ResultBuffer<ffi::F32> dbeta) {
  int64_t R;
  int E;
  if (auto err = check_ln(x.dimensions(), gamma.dimensions(), gamma.dimensions(), &R, &E);
      err.failure())
    return err;
  const float *xp = x.typed_data(), *gp = gamma.typed_data(), *sp = stats.typed_data(),
              *dyp = dy.typed_data();
  float *dxp = dx->typed_data(), *dgp = dgamma->typed_data(), *dbp = dbeta->typed_data();
  for_each_ln_part(pool, R, [&](int r0, int r1, int p) {
    ln_backward_rows(xp, gp, sp, dyp, E, r0, r1, dxp, dgp + static_cast<size_t>(p) * E,
                     dbp + static_cast<size_t>(p) * E);
  });
  return ffi::Error::Success();
}


ffi::Error WeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                      ffi::ResultBuffer<ffi::F32> dw, ffi::ResultBuffer<ffi::F32> db) {
  const auto xd = x.dimensions(), gd = dy.dimensions();
  if (xd.size() != 2 || gd.size() != 2 || xd[0] != gd[0])
    return ffi::Error::InvalidArgument("cider weight gradient: x (M, K) and dy (M, N)");
  const int M = static_cast<int>(xd[0]), K = static_cast<int>(xd[1]), N = static_cast<int>(gd[1]);
  if (dw->dimensions().size() != 2 || dw->dimensions()[0] != K || dw->dimensions()[1] != N ||
      db->dimensions().size() != 1 || db->dimensions()[0] != N)
    return ffi::Error::InvalidArgument("cider weight gradient: dw (K, N) and db (N,)");
  const float *xp = x.typed_data(), *gp = dy.typed_data();
  float *wp = dw->typed_data(), *bp = db->typed_data();
  const int64_t chunks = 4 * (pool.num_threads() + 1);
  if (static_cast<int64_t>(K) * N > kWgSplitWeights) {
    // many weights: each part owns a range of dw's rows (part 0 also db), no partial sums
    const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(chunks, K / 8)));
    parallel_for(pool, parts, [&](int begin, int end) {
      for (int p = begin; p < end; ++p)
        wg_part(xp, gp, M, K, N, 0, M, static_cast<int>(static_cast<int64_t>(K) * p / parts),
                static_cast<int>(static_cast<int64_t>(K) * (p + 1) / parts), wp,
                p == 0 ? bp : nullptr);
    });
    return ffi::Error::Success();
  }
  // few weights: each part sums a range of x's rows into its own (K + 1, N) partial
  const int parts = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(chunks, M / 128)));
  const size_t part_size = static_cast<size_t>(K + 1) * N;
  std::vector<float> partial(parts * part_size);
  parallel_for(pool, parts, [&](int begin, int end) {
    for (int p = begin; p < end; ++p) {
      float* out = partial.data() + p * part_size;
      wg_part(xp, gp, M, K, N, static_cast<int>(static_cast<int64_t>(M) * p / parts),
              static_cast<int>(static_cast<int64_t>(M) * (p + 1) / parts), 0, K, out,
              out + static_cast<size_t>(K) * N);
    }
  });
  std::copy(partial.begin(), partial.begin() + static_cast<size_t>(K) * N, wp);
  std::copy(partial.begin() + static_cast<size_t>(K) * N, partial.begin() + part_size, bp);
  for (int p = 1; p < parts; ++p) {
    const float* src = partial.data() + p * part_size;
    for (size_t i = 0; i < static_cast<size_t>(K) * N; ++i) wp[i] += src[i];
    for (int n = 0; n < N; ++n) bp[n] += src[static_cast<size_t>(K) * N + n];
  }
  return ffi::Error::Success();
}


// 8. Adam updates in place (optim.py's groups: optax's add_decayed_weights(wd), scale_by_adam
// and scale(−lr), then p + u), `steps` (1 or 2) of them in a row on p and its moments m, v:
//   g ← g + wd·p (wd ≠ 0),  m ← (1 − b1)·g + b1·m,  v ← (1 − b2)·g·g + b2·v,
//   p ← p + (−lr)·((m / c1_s) / (√(v / c2_s) + eps))
// with coef[s] = (c1_s, c2_s) = (1 − b1^t, 1 − b2^t) of update s. g is the first update's
// gradient (same shape as p) or empty: zero gradients, as every later update takes. Each
// element's operations are optax's float32 ones in their order (no fused multiply-adds).
// A second form first copies out the rows of given ids of p, m and v (embedding_rows). The
// `after` operand is never read: it makes XLA run the call after the values it was built
// from, so that the update in place follows every read of p (kernels/adam.py).
struct AdamConsts {
  float c1, b1, c2, b2, eps, neg_lr, wd;
};

// Elements at or above this count are split into parts on the pool.
constexpr int64_t kAdamPart = 64 * 1024;

template <typename V>
inline void adam_element(V& p, V& m, V& v, V g, float c1s, float c2s, const AdamConsts& k,
                         bool decay) {
  if (decay) g = g + k.wd * p;
  m = k.c1 * g + k.b1 * m;
  v = k.c2 * (g * g) + k.b2 * v;
  const V mh = m / c1s, vh = v / c2s;
  V root;
  if constexpr (std::is_same<V, float>::value)
    root = std::sqrt(vh);
  else
    root = vsqrt(vh);
  p = p + k.neg_lr * (mh / (root + k.eps));
}

__attribute__((optimize("fp-contract=off")))
void adam_range(float* p, float* m, float* v, const float* g, const float* coef, int steps,
                const AdamConsts& k, int64_t begin, int64_t end) {
  const bool decay = k.wd != 0.0f;
  int64_t i = begin;
  for (; i + W <= end; i += W) {
    vf pv = load(p + i), mv = load(m + i), vv = load(v + i);
    for (int s = 0; s < steps; ++s)
      adam_element(pv, mv, vv, (g && s == 0) ? load(g + i) : splat(0.0f), coef[2 * s],
                   coef[2 * s + 1], k, decay);
    store(p + i, pv), store(m + i, mv), store(v + i, vv);
  }
  for (; i < end; ++i)
    for (int s = 0; s < steps; ++s)
      adam_element(p[i], m[i], v[i], (g && s == 0) ? g[i] : 0.0f, coef[2 * s], coef[2 * s + 1],
                   k, decay);
}

ffi::Error adam_update(ffi::ThreadPool& pool, ffi::Buffer<ffi::F32>& p, ffi::Buffer<ffi::F32>& m,
                       ffi::Buffer<ffi::F32>& v, ffi::Buffer<ffi::F32>& g,
                       ffi::Buffer<ffi::F32>& coef, const AdamConsts& k, float* pp, float* mp,
                       float* vp, const std::function<void()>& before = {}) {
  const int64_t n = p.element_count();
  if (m.element_count() != n || v.element_count() != n ||
      (g.element_count() != 0 && g.element_count() != n))
    return ffi::Error::InvalidArgument("cider adam: p, m, v (and g unless empty) must match");
  const auto cd = coef.dimensions();
  if (cd.size() != 2 || cd[1] != 2 || cd[0] < 1 || cd[0] > 2)
    return ffi::Error::InvalidArgument("cider adam: coef must be (steps, 2), 1 or 2 steps");
  const int steps = static_cast<int>(cd[0]);
  if (before) before();   // reads of p, m, v before the update (AdamGather's rows)
  // aliased in place when XLA can; otherwise start from copies of the inputs
  if (pp != p.typed_data()) std::copy(p.typed_data(), p.typed_data() + n, pp);
  if (mp != m.typed_data()) std::copy(m.typed_data(), m.typed_data() + n, mp);
  if (vp != v.typed_data()) std::copy(v.typed_data(), v.typed_data() + n, vp);
  const float* gp = g.element_count() ? g.typed_data() : nullptr;
  const float* cp = coef.typed_data();
  if (n < kAdamPart) {
    adam_range(pp, mp, vp, gp, cp, steps, k, 0, n);
    return ffi::Error::Success();
  }
  const int parts = static_cast<int>(std::min<int64_t>(n / (kAdamPart / 4), 1024));
  parallel_for(pool, parts, [&](int begin, int end) {
    // part boundaries on multiples of W elements
    const int64_t lo = (n * begin / parts) / W * W, hi = end == parts ? n : (n * end / parts) / W * W;
    adam_range(pp, mp, vp, gp, cp, steps, k, lo, hi);
  });
  return ffi::Error::Success();
}

ffi::Error Adam(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> m,
                ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> g, ffi::Buffer<ffi::F32> coef,
                ffi::Buffer<ffi::F32> /*after: ordering only, not read*/, float b1, float b2,
                float c1, float c2, float eps, float neg_lr, float wd,
                ffi::ResultBuffer<ffi::F32> p_out, ffi::ResultBuffer<ffi::F32> m_out,
                ffi::ResultBuffer<ffi::F32> v_out) {
  return adam_update(pool, p, m, v, g, coef, AdamConsts{c1, b1, c2, b2, eps, neg_lr, wd},
                     p_out->typed_data(), m_out->typed_data(), v_out->typed_data());
}

// The rows `ids` (clipped to the table) of p, m and v (R rows of the last axis) as they are
// before the update, then the update; every read of p, m and v is then this call's, so XLA
// can run it in place without copies.
ffi::Error AdamGather(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> m,
                      ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> g,
                      ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::F32> /*after*/,
                      ffi::Buffer<ffi::S32> ids, float b1, float b2,
                      float c1, float c2, float eps, float neg_lr, float wd,
                      ffi::ResultBuffer<ffi::F32> p_out, ffi::ResultBuffer<ffi::F32> m_out,
                      ffi::ResultBuffer<ffi::F32> v_out, ffi::ResultBuffer<ffi::F32> p_rows,
                      ffi::ResultBuffer<ffi::F32> m_rows, ffi::ResultBuffer<ffi::F32> v_rows) {
  const auto pd = p.dimensions();
  if (pd.size() < 1 || pd.back() <= 0 || p.element_count() == 0)
    return ffi::Error::InvalidArgument("cider adam gather: p must be a non-empty table");
  const int64_t H = pd.back(), rows = p.element_count() / H, U = ids.element_count();
  if (p_rows->element_count() != U * H || m_rows->element_count() != U * H ||
      v_rows->element_count() != U * H)
    return ffi::Error::InvalidArgument("cider adam gather: rows outputs must be (ids, H)");
  const int32_t* ip = ids.typed_data();
  const float* src[3] = {p.typed_data(), m.typed_data(), v.typed_data()};
  float* dst[3] = {p_rows->typed_data(), m_rows->typed_data(), v_rows->typed_data()};
  // copied out once adam_update has checked that m and v match p
  const auto copy_rows = [&] {
    for (int a = 0; a < 3; ++a)
      for (int64_t u = 0; u < U; ++u) {
        const int64_t r = std::min<int64_t>(std::max<int64_t>(ip[u], 0), rows - 1);
        std::copy(src[a] + r * H, src[a] + (r + 1) * H, dst[a] + u * H);
      }
  };
  return adam_update(pool, p, m, v, g, coef, AdamConsts{c1, b1, c2, b2, eps, neg_lr, wd},
                     p_out->typed_data(), m_out->typed_data(), v_out->typed_data(), copy_rows);
}
}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderBlockSoftmaxForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_len")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderBlockSoftmaxBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("block_len")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderAttentionKlForward, KlForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderAttentionKlBackward, KlBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderGruForward, GruForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderGruBackward, GruBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderMaskedAttentionForward, MaskedForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threshold")
                                  .Attr<float>("keep_prob")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderMaskedAttentionBackward, MaskedBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Attr<int64_t>("threshold")
                                  .Attr<float>("keep_prob")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderCompositeAttentionForward, CompositeForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("block_len")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderCompositeAttentionBackward, CompositeBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("heads")
                                  .Attr<int64_t>("block_len")
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderLayerNormForward, LnForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("eps")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderLayerNormBackward, LnBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderWeightGrad, WeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The operands (p, m, v, g, coef, after) and constants both Adam handlers take.
static auto AdamOperands() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>();
}

template <typename Binding>
static auto AdamConstants(Binding b) {
  return std::move(b).template Attr<float>("b1")
      .template Attr<float>("b2")
      .template Attr<float>("c1")
      .template Attr<float>("c2")
      .template Attr<float>("eps")
      .template Attr<float>("neg_lr")
      .template Attr<float>("wd")
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderAdam, Adam, AdamConstants(AdamOperands()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(CiderAdamGather, AdamGather,
                              AdamConstants(AdamOperands().Arg<ffi::Buffer<ffi::S32>>())
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The vector lanes W this build uses (16 with AVX-512, 8 with AVX, 4 otherwise).
extern "C" int CiderVectorLanes() { return W; }
