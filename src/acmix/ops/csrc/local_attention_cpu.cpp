// Local k x k window attention on the CPU: forward and a flash-attention style backward.
//
// The op of acmix.ops.local_attention (ACmix attention path, paper Sec. 3.2, Eq. (5)-(6)) for q, k, v of
// (B, N, D, H, W): the query at output position (yo, xo) sits at input (yo * s, xo * s) and attends to the
// k x k window around it, positions outside the map being reflected (generalised reflection, see
// acmix/ops/_indexing.py). A reflected window position holds the mirrored real key, so the softmax runs over the
// k * k window positions exactly as over a reflection-padded map, without padding any tensor. The relative position
// term q_i . (k_j + p_i - p_j) keeps its softmax when p_i is dropped, so the op is attention over (q, k - p, v).
//
// Layout of the work. One task owns a block of output rows of one (batch, head). It copies the key / value rows its
// windows touch into a small scratch (reflected rows and columns resolved once, p subtracted there), split by column
// phase (column c of the padded row goes to phase c % s, slot c / s), so that for window column offset u the keys
// of consecutive queries are consecutive in memory at every stride. Queries are then handled one SIMD vector at a
// time along the output row: the k * k logits of those queries stay in L1, the softmax and its log-sum-exp follow, and the output is
// accumulated from the same scratch. Only the log-sum-exp (B, N, Ho, Wo) is kept for the backward, which recomputes
// the weights (FlashAttention) for a whole output row, then accumulates dk / dv into the scratch slot by slot (each
// scratch vector is loaded and stored once per window row, so no store has to be forwarded to an overlapping load),
// and finally folds the scratch back through the reflection onto the real map.
//
// Threads: at::parallel_for (honours torch.set_num_threads). Forward: tasks over (b, n, row block). Backward: tasks
// over (b, n) so that each task owns its dk / dv slab; when B * N is below the thread count, rows are split into
// groups that accumulate into private slabs, summed at the end.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

// 64-byte double vectors without AVX-512 change a (never exported) calling convention; nothing here crosses an ABI.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

namespace acmix_cpp {
namespace {

constexpr int XB = 8;           // row lengths are padded to a multiple of XB (a multiple of every lane count)
constexpr int UBMAX = 8;        // window columns whose logits are accumulated together
constexpr int DB = 8;           // channels accumulated together in the weighted sums (independent FMA chains)
constexpr int64_t kScratchBytes = 384 * 1024;  // target size of one task's row scratch (fits in L2)

inline int64_t reflect(int64_t i, int64_t n) {
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  i %= period;
  if (i < 0) i += period;
  return i >= n ? period - i : i;
}

// Geometry of one call, shared by all tasks.
struct Geom {
  int64_t B, N, D, H, W, k, s, pad, Ho, Wo;
  int64_t Wop;   // Wo rounded up to XB
  int64_t PL;    // largest slot shift of a window column: (k - 1) / s
  int64_t M;     // slots per phase: Wop + PL rounded up to XB
  int64_t LR;    // scratch length of one (row, channel): s * M
  int64_t LX;    // length of a row buffer: PL zeros, then M slots
  int64_t R;     // output rows per block
  int64_t nblk;  // blocks per (b, n)
  std::vector<int64_t> col;  // (s * M): real column of phase c / M, slot c % M
  std::vector<int64_t> off;  // (k): offset of window column u inside a scratch line: (u % s) * M + u / s
  std::vector<int64_t> need; // (s): slots of phase ph that some real query's window reads; the rest hold zeros

  Geom(const at::Tensor& q, int64_t kernel, int64_t stride, int64_t arrays, int64_t elem) {
    B = q.size(0), N = q.size(1), D = q.size(2), H = q.size(3), W = q.size(4);
    k = kernel, s = stride, pad = kernel / 2;
    Ho = (H + s - 1) / s, Wo = (W + s - 1) / s;
    Wop = (Wo + XB - 1) / XB * XB;
    PL = (k - 1) / s;
    M = (Wop + PL + XB - 1) / XB * XB;
    LR = s * M;
    LX = PL + M;
    col.resize(LR);
    for (int64_t ph = 0; ph < s; ++ph)
      for (int64_t m = 0; m < M; ++m) col[ph * M + m] = reflect(m * s + ph - pad, W);
    off.resize(k);
    for (int64_t u = 0; u < k; ++u) off[u] = (u % s) * M + u / s;
    need.resize(s);
    const int64_t last_col = (Wo - 1) * s + k - 1;  // last padded column of the last query's window
    for (int64_t ph = 0; ph < s; ++ph) need[ph] = ph > last_col ? 0 : std::min(M, (last_col - ph) / s + 1);
    // as many rows per block as keep `arrays` scratch arrays within kScratchBytes, at most 16
    const int64_t line = D * LR * elem * arrays;
    const int64_t rows_fit = std::max<int64_t>(kScratchBytes / std::max<int64_t>(line, 1), 1);
    R = std::min<int64_t>(std::max<int64_t>((rows_fit - k) / s + 1, 1), 16);
    R = std::min(R, Ho);
    nblk = (Ho + R - 1) / R;
  }
  int64_t rows(int64_t yo0, int64_t yo1) const { return (yo1 - yo0 - 1) * s + k; }
};

// Strided view of one (b, n) slab of a (B, N, D, H, W) tensor whose last dimension is contiguous.
template <typename T>
struct Slab {
  const T* ptr;
  int64_t sd, sh;
  const T* at(int64_t d, int64_t y) const { return ptr + d * sd + y * sh; }
};

template <typename T>
Slab<T> slab(const at::Tensor& t, int64_t b, int64_t n) {
  return {t.data_ptr<T>() + b * t.stride(0) + n * t.stride(1), t.stride(2), t.stride(3)};
}

// Slots [lo, hi) of a scratch line whose columns m * s + ph - pad lie inside the map for every phase ph: there the
// copy is a plain (interleaved for s = 2) strided one that the compiler vectorises; the rest goes through g.col.
inline void interior_slots(const Geom& g, int64_t& lo, int64_t& hi) {
  int64_t need = g.M;
  for (int64_t n : g.need) need = std::min(need, n);
  lo = std::min((g.pad + g.s - 1) / g.s, need);  // m * s - pad >= 0
  const int64_t last = g.W - g.s + g.pad;        // m * s + s - 1 - pad <= W - 1
  hi = last < 0 ? lo : std::max(lo, std::min(need, last / g.s + 1));
}

// One (row, channel) line of the scratch: out[ph * M + m] = in[reflect(m * s + ph - pad)] (- pin[...]) for the
// slots some query reads, zero for the rest (lanes past the row's end read them, and their results are dropped).
template <typename T, int S>
inline void fill_line(T* __restrict out, const T* __restrict in, const T* __restrict pin, const Geom& g, int64_t lo,
                      int64_t hi) {
  const int64_t s = S > 0 ? S : g.s, M = g.M, pad = g.pad;
  const int64_t* col = g.col.data();
  if (pin != nullptr) {
    for (int64_t m = lo; m < hi; ++m)
#pragma GCC unroll 4
      for (int64_t ph = 0; ph < s; ++ph) out[ph * M + m] = in[m * s + ph - pad] - pin[m * s + ph - pad];
  } else {
    for (int64_t m = lo; m < hi; ++m)
#pragma GCC unroll 4
      for (int64_t ph = 0; ph < s; ++ph) out[ph * M + m] = in[m * s + ph - pad];
  }
  for (int64_t ph = 0; ph < s; ++ph) {
    T* o = out + ph * M;
    const int64_t* c = col + ph * M;
    const int64_t need = g.need[ph];
    for (int64_t m = 0; m < std::min(lo, need); ++m) o[m] = in[c[m]] - (pin ? pin[c[m]] : T(0));
    for (int64_t m = hi; m < need; ++m) o[m] = in[c[m]] - (pin ? pin[c[m]] : T(0));
    for (int64_t m = std::max(hi, need); m < M; ++m) o[m] = T(0);
  }
}

// Adjoint of fill_line: out[reflect(m * s + ph - pad)] += in[ph * M + m] over the slots that were read.
template <typename T, int S>
inline void fold_line(T* __restrict out, const T* __restrict in, const Geom& g, int64_t lo, int64_t hi) {
  const int64_t s = S > 0 ? S : g.s, M = g.M, pad = g.pad;
  const int64_t* col = g.col.data();
  for (int64_t m = lo; m < hi; ++m)
#pragma GCC unroll 4
    for (int64_t ph = 0; ph < s; ++ph) out[m * s + ph - pad] += in[ph * M + m];
  for (int64_t ph = 0; ph < s; ++ph) {
    const T* i = in + ph * M;
    const int64_t* c = col + ph * M;
    const int64_t need = g.need[ph];
    for (int64_t m = 0; m < std::min(lo, need); ++m) out[c[m]] += i[m];
    for (int64_t m = hi; m < need; ++m) out[c[m]] += i[m];
  }
}

// Copy the rows [yo0 * s, yo0 * s + nrows) of the padded (reflected) map of one (b, n) slab into the scratch
// (nrows, D, s, M), subtracting the position map when given.
template <typename T>
void fill_rows(T* dst, const Slab<T>& src, const Slab<T>* pos, int64_t yo0, int64_t nrows, const Geom& g) {
  int64_t lo, hi;
  interior_slots(g, lo, hi);
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t r = reflect(yo0 * g.s + i - g.pad, g.H);
    for (int64_t d = 0; d < g.D; ++d) {
      T* out = dst + (i * g.D + d) * g.LR;
      const T* in = src.at(d, r);
      const T* pin = pos != nullptr ? pos->at(d, r) : nullptr;
      if (g.s == 1) {
        fill_line<T, 1>(out, in, pin, g, lo, hi);
      } else if (g.s == 2) {
        fill_line<T, 2>(out, in, pin, g, lo, hi);
      } else {
        fill_line<T, 0>(out, in, pin, g, lo, hi);
      }
    }
  }
}

// Adjoint of fill_rows: add the scratch (nrows, D, s, M) onto the real (D, H, W) slab through the reflection.
template <typename T>
void fold_rows(T* dst, const T* src, int64_t yo0, int64_t nrows, const Geom& g) {
  int64_t lo, hi;
  interior_slots(g, lo, hi);
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t r = reflect(yo0 * g.s + i - g.pad, g.H);
    for (int64_t d = 0; d < g.D; ++d) {
      const T* in = src + (i * g.D + d) * g.LR;
      T* out = dst + (d * g.H + r) * g.W;
      if (g.s == 1) {
        fold_line<T, 1>(out, in, g, lo, hi);
      } else if (g.s == 2) {
        fold_line<T, 2>(out, in, g, lo, hi);
      } else {
        fold_line<T, 0>(out, in, g, lo, hi);
      }
    }
  }
}

// 32 bytes of T as one value (GCC / Clang vector extension): the compiler maps it onto the host's SIMD registers
// (one AVX2 register; two SSE / NEON registers elsewhere), so the register-blocked kernels below are explicit about
// what stays in registers instead of relying on the auto-vectoriser. NL<T> queries are handled at once.
constexpr int kVecBytes = 32;
template <typename T>
struct Lanes {
  typedef T type __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using Vec = typename Lanes<T>::type;
template <typename T>
constexpr int NL = kVecBytes / sizeof(T);
static_assert(XB % NL<float> == 0 && XB % NL<double> == 0, "XB must be a multiple of the lane counts");

template <typename T>
inline Vec<T> loadu(const T* p) {
  Vec<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void storeu(T* p, const Vec<T>& v) {
  std::memcpy(p, &v, sizeof(v));
}

template <typename T>
struct IntLanes;
template <>
struct IntLanes<float> {
  typedef int32_t type __attribute__((vector_size(kVecBytes)));
};
template <>
struct IntLanes<double> {
  typedef int64_t type __attribute__((vector_size(kVecBytes)));
};

template <typename V, typename From>
inline V bitcast(const From& x) {
  static_assert(sizeof(V) == sizeof(From), "bitcast between equal sizes only");
  V y;
  std::memcpy(&y, &x, sizeof(y));
  return y;
}

template <typename T>
inline Vec<T> vmax(const Vec<T>& a, const Vec<T>& b) {
  return a > b ? a : b;
}

template <typename T>
inline Vec<T> vclamp(const Vec<T>& x, T lo, T hi) {
  const Vec<T> l = Vec<T>{} + lo, h = Vec<T>{} + hi;
  const Vec<T> y = x < l ? l : x;
  return y > h ? h : y;
}

// e^x for the lanes of the softmax (inputs <= 0), all in SIMD registers: a scalar libm call per logit would cost more
// than the dot products. Cody-Waite reduction x = n ln2 + r with n rounded to nearest by the 1.5 * 2^mantissa trick
// (which also leaves n in the low bits), a polynomial for e^r on [-ln2/2, ln2/2] (Cephes expf / exp), and 2^n
// written into the exponent bits. Relative error ~1 ulp; x is clamped to where 2^n stays normal.
template <typename T>
struct ExpConsts;
template <>
struct ExpConsts<float> {
  static constexpr float lo = -87.0f, hi = 88.0f, magic = 12582912.0f /* 1.5 * 2^23 */, log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f;  // ln2 = ln2_hi + ln2_lo
  static constexpr int bias = 127, mantissa = 23;
};
template <>
struct ExpConsts<double> {
  static constexpr double lo = -708.0, hi = 709.0, magic = 6755399441055744.0 /* 1.5 * 2^52 */;
  static constexpr double log2e = 1.4426950408889634074;
  static constexpr double ln2_hi = 6.93145751953125e-1, ln2_lo = 1.42860682030941723212e-6;  // ln2 = ln2_hi + ln2_lo
  static constexpr int bias = 1023, mantissa = 52;
};

// e^r for |r| <= ln2/2: Cephes expf's polynomial (float), Cephes exp's rational form (double)
inline Vec<float> exp_reduced(const Vec<float>& r) {
  Vec<float> p = Vec<float>{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

inline Vec<double> exp_reduced(const Vec<double>& r) {
  using V = Vec<double>;
  const V r2 = r * r;
  const V px = r * ((r2 * 1.26177193074810590878e-4 + 3.02994407707441961300e-2) * r2 + 9.99999999999999999910e-1);
  const V qx = ((r2 * 3.00198505138664455042e-6 + 2.52448340349684104192e-3) * r2 + 2.27265548208155028766e-1) * r2 +
               2.00000000000000000009e0;
  return 1.0 + 2.0 * px / (qx - px);
}

template <typename T>
inline Vec<T> vexp(Vec<T> x) {
  using V = Vec<T>;
  using I = typename IntLanes<T>::type;
  using C = ExpConsts<T>;
  x = vclamp<T>(x, C::lo, C::hi);
  const V t = x * C::log2e + C::magic;
  const V n = t - C::magic;
  const I ni = bitcast<I>(t) - bitcast<I>(V{} + C::magic);
  return exp_reduced(x - n * C::ln2_hi - n * C::ln2_lo) * bitcast<V>((ni + C::bias) << C::mantissa);
}

// out[u] = sum_d a[d] * line_d[off[u]] (NL<T> queries at once) for UB window columns: a is (D, lda) at the block's
// first query, lines is the scratch at (row, channel 0) shifted to the block's first query.
template <typename T, int UB>
inline void dot_block(const T* __restrict a, int64_t lda, const T* __restrict lines, int64_t LR, int64_t D,
                      const int64_t* __restrict off, T* __restrict out, int64_t ldo) {
  Vec<T> acc[UB];
  const T* lu[UB];
#pragma GCC unroll 8
  for (int u = 0; u < UB; ++u) acc[u] = Vec<T>{}, lu[u] = lines + off[u];
  for (int64_t d = 0; d < D; ++d) {
    const Vec<T> av = loadu(a + d * lda);
    const int64_t o = d * LR;
#pragma GCC unroll 8
    for (int u = 0; u < UB; ++u) acc[u] += av * loadu(lu[u] + o);
  }
#pragma GCC unroll 8
  for (int u = 0; u < UB; ++u) storeu(out + u * ldo, acc[u]);
}

// S[t] = sum_d a[d] * scratch[window position t][d] (NL<T> queries at once) for the k * k window positions
// t = tr * k + u; rows is the scratch at the query row's first window row, shifted to the block's first query.
template <typename T>
void window_dots(const T* a, int64_t lda, const T* rows, const Geom& g, T* S, int64_t lds) {
  const int64_t k = g.k;
  for (int64_t tr = 0; tr < k; ++tr) {
    const T* lines = rows + tr * g.D * g.LR;
    for (int64_t u0 = 0; u0 < k; u0 += UBMAX) {
      const int64_t* off = g.off.data() + u0;
      T* out = S + (tr * k + u0) * lds;
      switch (std::min<int64_t>(k - u0, UBMAX)) {
        case 1: dot_block<T, 1>(a, lda, lines, g.LR, g.D, off, out, lds); break;
        case 2: dot_block<T, 2>(a, lda, lines, g.LR, g.D, off, out, lds); break;
        case 3: dot_block<T, 3>(a, lda, lines, g.LR, g.D, off, out, lds); break;
        case 4: dot_block<T, 4>(a, lda, lines, g.LR, g.D, off, out, lds); break;
        case 5: dot_block<T, 5>(a, lda, lines, g.LR, g.D, off, out, lds); break;
        case 6: dot_block<T, 6>(a, lda, lines, g.LR, g.D, off, out, lds); break;
        case 7: dot_block<T, 7>(a, lda, lines, g.LR, g.D, off, out, lds); break;
        default: dot_block<T, 8>(a, lda, lines, g.LR, g.D, off, out, lds); break;
      }
    }
  }
}

// out[e] = sum_t P[t] * scratch[window position t][d0 + e] (NL<T> queries at once) for NB channels.
template <typename T, int NB>
inline void weighted_block(const T* __restrict P, int64_t ldp, const T* __restrict rows, const Geom& g, int64_t d0,
                           T* __restrict out) {
  Vec<T> acc[NB];
#pragma GCC unroll 8
  for (int e = 0; e < NB; ++e) acc[e] = Vec<T>{};
  const int64_t k = g.k, LR = g.LR;
  const int64_t* off = g.off.data();
  for (int64_t tr = 0; tr < k; ++tr) {
    const T* lines = rows + (tr * g.D + d0) * LR;
    const T* pr = P + tr * k * ldp;
    for (int64_t u = 0; u < k; ++u) {
      const Vec<T> pu = loadu(pr + u * ldp);
      const T* lu = lines + off[u];
#pragma GCC unroll 8
      for (int e = 0; e < NB; ++e) acc[e] += pu * loadu(lu + e * LR);
    }
  }
#pragma GCC unroll 8
  for (int e = 0; e < NB; ++e) storeu(out + e * NL<T>, acc[e]);
}

// out[d] = sum_t P[t] * scratch[window position t][d] for every channel; out is (D, NL<T>).
template <typename T>
void window_weighted(const T* P, int64_t ldp, const T* rows, const Geom& g, T* out) {
  int64_t d0 = 0;
  for (; d0 + DB <= g.D; d0 += DB) weighted_block<T, DB>(P, ldp, rows, g, d0, out + d0 * NL<T>);
  T* o = out + d0 * NL<T>;
  switch (g.D - d0) {
    case 1: weighted_block<T, 1>(P, ldp, rows, g, d0, o); break;
    case 2: weighted_block<T, 2>(P, ldp, rows, g, d0, o); break;
    case 3: weighted_block<T, 3>(P, ldp, rows, g, d0, o); break;
    case 4: weighted_block<T, 4>(P, ldp, rows, g, d0, o); break;
    case 5: weighted_block<T, 5>(P, ldp, rows, g, d0, o); break;
    case 6: weighted_block<T, 6>(P, ldp, rows, g, d0, o); break;
    case 7: weighted_block<T, 7>(P, ldp, rows, g, d0, o); break;
    default: break;
  }
}

// Slot-stationary accumulation into one scratch phase: for the NL<T> slots m of every channel d,
//   target[d][m] += sum_i w[i][m - i] * x[d][m - i]
// where w[i] is the weight row of the i-th window column of this phase (its slot shift is i). The NU weight vectors
// stay in registers while the channels stream through; every target vector is loaded and stored once.
template <typename T, int NU>
inline void scatter_block(const T* __restrict w, int64_t wstep, const T* __restrict x, int64_t LX,
                          T* __restrict target, int64_t LR, int64_t D) {
  Vec<T> wv[NU];
#pragma GCC unroll 8
  for (int i = 0; i < NU; ++i) wv[i] = loadu(w + i * wstep - i);
  for (int64_t d = 0; d < D; ++d) {
    const T* xd = x + d * LX;
    T* td = target + d * LR;
    Vec<T> acc = loadu(td);
#pragma GCC unroll 8
    for (int i = 0; i < NU; ++i) acc += wv[i] * loadu(xd - i);
    storeu(td, acc);
  }
}

// scratch[window position t of query j][d] += W[t][j] * X[d][j] for a whole output row: W (k * k, LX) and X (D, LX)
// are row buffers (PL zeros, then the row), rows is the scratch at the query row's first window row.
template <typename T>
void window_scatter(const T* W, const T* X, T* rows, const Geom& g) {
  const int64_t k = g.k, s = g.s, LX = g.LX;
  for (int64_t tr = 0; tr < k; ++tr) {
    T* lines = rows + tr * g.D * g.LR;
    for (int64_t ph = 0; ph < std::min(s, k); ++ph) {
      const int64_t nu = (k - ph + s - 1) / s;  // window columns u = ph + i * s, slot shift i
      for (int64_t i0 = 0; i0 < nu; i0 += UBMAX) {
        const int64_t wstep = s * LX;
        const T* w = W + (tr * k + ph + i0 * s) * LX + g.PL - i0;
        const T* x = X + g.PL - i0;
        for (int64_t m0 = 0; m0 < g.M; m0 += NL<T>) {
          T* target = lines + ph * g.M + m0;
          switch (std::min<int64_t>(nu - i0, UBMAX)) {
            case 1: scatter_block<T, 1>(w + m0, wstep, x + m0, LX, target, g.LR, g.D); break;
            case 2: scatter_block<T, 2>(w + m0, wstep, x + m0, LX, target, g.LR, g.D); break;
            case 3: scatter_block<T, 3>(w + m0, wstep, x + m0, LX, target, g.LR, g.D); break;
            case 4: scatter_block<T, 4>(w + m0, wstep, x + m0, LX, target, g.LR, g.D); break;
            case 5: scatter_block<T, 5>(w + m0, wstep, x + m0, LX, target, g.LR, g.D); break;
            case 6: scatter_block<T, 6>(w + m0, wstep, x + m0, LX, target, g.LR, g.D); break;
            case 7: scatter_block<T, 7>(w + m0, wstep, x + m0, LX, target, g.LR, g.D); break;
            default: scatter_block<T, 8>(w + m0, wstep, x + m0, LX, target, g.LR, g.D); break;
          }
        }
      }
    }
  }
}

// buf[d][PL + j] = mul * x[d][y][j * step] for j < Wo; the rest of the (D, LX) buffer stays zero.
template <typename T>
void load_row(T* buf, const Slab<T>& x, int64_t y, int64_t step, T mul, const Geom& g) {
  for (int64_t d = 0; d < g.D; ++d) {
    const T* in = x.at(d, y);
    T* out = buf + d * g.LX + g.PL;
    for (int64_t j = 0; j < g.Wo; ++j) out[j] = mul * in[j * step];
  }
}

template <typename T>
void forward_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor* pos,
                    const Geom& g, T scale, at::Tensor& out, at::Tensor& lse) {
  const int64_t tasks = g.B * g.N * g.nblk;
  const int64_t k2 = g.k * g.k;
  T* out_ptr = out.data_ptr<T>();
  T* lse_ptr = lse.data_ptr<T>();
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t scratch = g.rows(0, g.R) * g.D * g.LR;
    std::vector<T> ks(scratch), vs(scratch), qb(g.D * g.LX), S(k2 * NL<T>), acc(g.D * NL<T>);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bn = task / g.nblk, blk = task % g.nblk;
      const int64_t b = bn / g.N, n = bn % g.N;
      const int64_t yo0 = blk * g.R, yo1 = std::min(g.Ho, yo0 + g.R);
      const int64_t nrows = g.rows(yo0, yo1);
      const Slab<T> qs = slab<T>(q, b, n);
      Slab<T> pslab{};
      if (pos != nullptr) pslab = slab<T>(*pos, b, n);
      fill_rows<T>(ks.data(), slab<T>(k, b, n), pos != nullptr ? &pslab : nullptr, yo0, nrows, g);
      fill_rows<T>(vs.data(), slab<T>(v, b, n), nullptr, yo0, nrows, g);
      T* out_bn = out_ptr + bn * g.D * g.Ho * g.Wo;
      T* lse_bn = lse_ptr + bn * g.Ho * g.Wo;
      for (int64_t yo = yo0; yo < yo1; ++yo) {
        load_row<T>(qb.data(), qs, yo * g.s, g.s, scale, g);
        const int64_t row_off = (yo - yo0) * g.s * g.D * g.LR;
        for (int64_t x0 = 0; x0 < g.Wo; x0 += NL<T>) {
          window_dots<T>(qb.data() + g.PL + x0, g.LX, ks.data() + row_off + x0, g, S.data(), NL<T>);
          Vec<T> mx = loadu(S.data()), sum{};
          for (int64_t t = 1; t < k2; ++t) mx = vmax<T>(mx, loadu(S.data() + t * NL<T>));
          for (int64_t t = 0; t < k2; ++t) {
            const Vec<T> e = vexp<T>(loadu(S.data() + t * NL<T>) - mx);
            storeu(S.data() + t * NL<T>, e);
            sum += e;
          }
          window_weighted<T>(S.data(), NL<T>, vs.data() + row_off + x0, g, acc.data());
          const int64_t nv = std::min<int64_t>(NL<T>, g.Wo - x0);
          const Vec<T> inv = T(1) / sum;
          for (int64_t j = 0; j < nv; ++j) lse_bn[yo * g.Wo + x0 + j] = mx[j] + std::log(sum[j]);
          for (int64_t d = 0; d < g.D; ++d) {
            const Vec<T> o = loadu(acc.data() + d * NL<T>) * inv;
            T* dst = out_bn + (d * g.Ho + yo) * g.Wo + x0;
            for (int64_t j = 0; j < nv; ++j) dst[j] = o[j];
          }
        }
      }
    }
  });
}

template <typename T>
void backward_kernel(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor* pos, const at::Tensor& out, const at::Tensor& lse, const Geom& g, T scale,
                     int64_t groups, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv, at::Tensor& dk_parts,
                     at::Tensor& dv_parts) {
  const int64_t tasks = g.B * g.N * groups;
  const int64_t k2 = g.k * g.k;
  const int64_t slab_size = g.D * g.H * g.W;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    const int64_t scratch = g.rows(0, g.R) * g.D * g.LR;
    // row buffers (PL zeros, then the row): scaled queries, output gradient, weights A and logit gradients dS
    std::vector<T> ks(scratch), vs(scratch), dks(scratch), dvs(scratch), qb(g.D * g.LX), gb(g.D * g.LX),
        P(k2 * g.LX), dS(k2 * g.LX), acc(g.D * NL<T>), delta(g.Wop), lrow(g.Wop);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bn = task / groups, grp = task % groups;
      const int64_t b = bn / g.N, n = bn % g.N;
      const int64_t blk0 = grp * g.nblk / groups, blk1 = (grp + 1) * g.nblk / groups;
      T* dk_bn = grp == 0 ? dk.data_ptr<T>() + bn * slab_size
                          : dk_parts.data_ptr<T>() + ((grp - 1) * g.B * g.N + bn) * slab_size;
      T* dv_bn = grp == 0 ? dv.data_ptr<T>() + bn * slab_size
                          : dv_parts.data_ptr<T>() + ((grp - 1) * g.B * g.N + bn) * slab_size;
      T* dq_bn = dq.data_ptr<T>() + bn * slab_size;
      const Slab<T> qs = slab<T>(q, b, n), gs = slab<T>(dout, b, n), os = slab<T>(out, b, n);
      const T* lse_bn = lse.data_ptr<T>() + bn * g.Ho * g.Wo;
      Slab<T> pslab{};
      if (pos != nullptr) pslab = slab<T>(*pos, b, n);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t yo0 = blk * g.R, yo1 = std::min(g.Ho, yo0 + g.R);
        const int64_t nrows = g.rows(yo0, yo1);
        fill_rows<T>(ks.data(), slab<T>(k, b, n), pos != nullptr ? &pslab : nullptr, yo0, nrows, g);
        fill_rows<T>(vs.data(), slab<T>(v, b, n), nullptr, yo0, nrows, g);
        std::fill(dks.begin(), dks.begin() + nrows * g.D * g.LR, T(0));
        std::fill(dvs.begin(), dvs.begin() + nrows * g.D * g.LR, T(0));
        for (int64_t yo = yo0; yo < yo1; ++yo) {
          load_row<T>(qb.data(), qs, yo * g.s, g.s, scale, g);
          load_row<T>(gb.data(), gs, yo, 1, T(1), g);
          std::fill(delta.begin(), delta.end(), T(0));
          std::fill(lrow.begin(), lrow.end(), T(0));
          for (int64_t d = 0; d < g.D; ++d) {
            const T* o = os.at(d, yo);
            const T* gd = gb.data() + d * g.LX + g.PL;
            for (int64_t j = 0; j < g.Wo; ++j) delta[j] += gd[j] * o[j];  // sum_j A_ij dA_ij = dO_i . O_i
          }
          for (int64_t j = 0; j < g.Wo; ++j) lrow[j] = lse_bn[yo * g.Wo + j];
          const int64_t row_off = (yo - yo0) * g.s * g.D * g.LR;
          for (int64_t x0 = 0; x0 < g.Wo; x0 += NL<T>) {
            const int64_t nv = std::min<int64_t>(NL<T>, g.Wo - x0);
            Vec<T> mask;
            for (int j = 0; j < NL<T>; ++j) mask[j] = j < nv ? T(1) : T(0);
            T* Pc = P.data() + g.PL + x0;
            T* Sc = dS.data() + g.PL + x0;
            window_dots<T>(qb.data() + g.PL + x0, g.LX, ks.data() + row_off + x0, g, Pc, g.LX);  // logits
            window_dots<T>(gb.data() + g.PL + x0, g.LX, vs.data() + row_off + x0, g, Sc, g.LX);  // dA = dO . v
            const Vec<T> lx = loadu(lrow.data() + x0), dx = loadu(delta.data() + x0);
            for (int64_t t = 0; t < k2; ++t) {
              const Vec<T> a = vexp<T>(loadu(Pc + t * g.LX) - lx) * mask;
              storeu(Pc + t * g.LX, a);
              storeu(Sc + t * g.LX, a * (loadu(Sc + t * g.LX) - dx));  // d logit = A (dA - delta)
            }
            // dq (at the strided query positions) = scale * sum_t dS_t k'_t
            window_weighted<T>(Sc, g.LX, ks.data() + row_off + x0, g, acc.data());
            for (int64_t d = 0; d < g.D; ++d) {
              T* o = dq_bn + (d * g.H + yo * g.s) * g.W + x0 * g.s;
              for (int64_t j = 0; j < nv; ++j) o[j * g.s] = scale * acc[d * NL<T> + j];
            }
          }
          // dk'_t += dS_t (scale q), dv_t += A_t dO, into the scratch
          window_scatter<T>(dS.data(), qb.data(), dks.data() + row_off, g);
          window_scatter<T>(P.data(), gb.data(), dvs.data() + row_off, g);
        }
        fold_rows<T>(dk_bn, dks.data(), yo0, nrows, g);
        fold_rows<T>(dv_bn, dvs.data(), yo0, nrows, g);
      }
    }
  });
}

// Checks shared by both ops; returns q, k, v with a contiguous last dimension and the position map expanded to q's
// shape (zero strides where it broadcasts), or an undefined tensor.
void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t kernel_size, int64_t stride) {
  TORCH_CHECK(q.dim() == 5, "acmix_cpp: q must be (B, heads, head_dim, H, W), got ", q.sizes());
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(), "acmix_cpp: k and v must have q's shape ",
              q.sizes(), ", got ", k.sizes(), " and ", v.sizes());
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "acmix_cpp: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kDouble,
              "acmix_cpp: float32 or float64 expected, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "acmix_cpp: q, k, v must share a dtype");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "acmix_cpp: kernel_size must be a positive odd int, got ",
              kernel_size);
  TORCH_CHECK(stride >= 1, "acmix_cpp: stride must be >= 1, got ", stride);
  TORCH_CHECK(q.size(3) >= 1 && q.size(4) >= 1, "acmix_cpp: empty map ", q.sizes());
}

at::Tensor unit_last(const at::Tensor& t) { return t.stride(4) == 1 || t.size(4) == 1 ? t : t.contiguous(); }

at::Tensor expand_pos(const std::optional<at::Tensor>& rel_pos, const at::Tensor& q) {
  if (!rel_pos.has_value() || !rel_pos->defined()) return at::Tensor();
  at::Tensor p = *rel_pos;
  TORCH_CHECK(p.scalar_type() == q.scalar_type(), "acmix_cpp: rel_pos must have q's dtype ", q.scalar_type(),
              ", got ", p.scalar_type());
  TORCH_CHECK(p.device().is_cpu(), "acmix_cpp: rel_pos must be a CPU tensor");
  TORCH_CHECK((p.dim() == 3 || p.dim() == 5) && p.size(-3) == q.size(2) && p.size(-2) == q.size(3) &&
                  p.size(-1) == q.size(4),
              "acmix_cpp: rel_pos must be (head_dim, H, W) or 5-D broadcastable to q ", q.sizes(), ", got ",
              p.sizes());
  if (p.dim() == 3) p = p.unsqueeze(0).unsqueeze(0);
  return unit_last(p).expand(q.sizes());
}

std::tuple<at::Tensor, at::Tensor> local_attention_fwd(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in, const std::optional<at::Tensor>& rel_pos,
                                                       int64_t kernel_size, int64_t stride, double scale) {
  check_inputs(q_in, k_in, v_in, kernel_size, stride);
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor pos = expand_pos(rel_pos, q);
  const Geom g(q, kernel_size, stride, 2, q.element_size());
  at::Tensor out = at::empty({g.B, g.N, g.D, g.Ho, g.Wo}, q.options());
  at::Tensor lse = at::empty({g.B, g.N, g.Ho, g.Wo}, q.options());
  if (q.numel() == 0) return {out, lse};
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "acmix_cpp_local_attention_fwd", [&] {
    forward_kernel<scalar_t>(q, k, v, pos.defined() ? &pos : nullptr, g, static_cast<scalar_t>(scale), out, lse);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> local_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const std::optional<at::Tensor>& rel_pos, const at::Tensor& out_in, const at::Tensor& lse_in, int64_t kernel_size,
    int64_t stride, double scale) {
  check_inputs(q_in, k_in, v_in, kernel_size, stride);
  const at::Tensor q = unit_last(q_in), k = unit_last(k_in), v = unit_last(v_in);
  const at::Tensor pos = expand_pos(rel_pos, q);
  const Geom g(q, kernel_size, stride, 4, q.element_size());
  const std::vector<int64_t> out_shape{g.B, g.N, g.D, g.Ho, g.Wo};
  TORCH_CHECK(grad_out.sizes() == out_shape && out_in.sizes() == out_shape,
              "acmix_cpp: grad_out and out must be ", at::IntArrayRef(out_shape), ", got ", grad_out.sizes(), " and ",
              out_in.sizes());
  TORCH_CHECK(lse_in.sizes() == at::IntArrayRef({g.B, g.N, g.Ho, g.Wo}), "acmix_cpp: lse must be (B, N, Ho, Wo)");
  const at::Tensor dout = unit_last(grad_out.to(q.scalar_type()));
  const at::Tensor out = unit_last(out_in.to(q.scalar_type()));
  const at::Tensor lse = lse_in.to(q.scalar_type()).contiguous();
  // at stride 1 every query position is written; otherwise the positions between queries get no gradient
  at::Tensor dq = stride == 1 ? at::empty(q.sizes(), q.options()) : at::zeros(q.sizes(), q.options());
  at::Tensor dk = at::zeros(q.sizes(), q.options());
  at::Tensor dv = at::zeros(q.sizes(), q.options());
  if (q.numel() == 0) return {dq, dk, dv};
  const int64_t threads = at::get_num_threads();
  const int64_t bn = g.B * g.N;
  const int64_t groups = bn >= threads ? 1 : std::min<int64_t>((threads + bn - 1) / bn, g.nblk);
  at::Tensor dk_parts, dv_parts;
  if (groups > 1) {
    dk_parts = at::zeros({groups - 1, g.B, g.N, g.D, g.H, g.W}, q.options());
    dv_parts = at::zeros({groups - 1, g.B, g.N, g.D, g.H, g.W}, q.options());
  }
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "acmix_cpp_local_attention_bwd", [&] {
    backward_kernel<scalar_t>(dout, q, k, v, pos.defined() ? &pos : nullptr, out, lse, g,
                              static_cast<scalar_t>(scale), groups, dq, dk, dv, dk_parts, dv_parts);
  });
  if (groups > 1) {
    dk.add_(dk_parts.sum(0));
    dv.add_(dv_parts.sum(0));
  }
  return {dq, dk, dv};
}

}  // namespace
}  // namespace acmix_cpp

TORCH_LIBRARY(acmix_cpp, m) {
  m.def(
      "local_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? rel_pos, int kernel_size, int stride, float scale)"
      " -> (Tensor, Tensor)");
  m.def(
      "local_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? rel_pos, Tensor out, Tensor lse,"
      " int kernel_size, int stride, float scale) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(acmix_cpp, CPU, m) {
  m.impl("local_attention_fwd", &acmix_cpp::local_attention_fwd);
  m.impl("local_attention_bwd", &acmix_cpp::local_attention_bwd);
}
