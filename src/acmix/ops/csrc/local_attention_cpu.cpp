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
// of consecutive queries are consecutive in memory at every stride. Queries are then handled XB at a time along the
// output row: the k * k logits of XB queries live in registers / L1, the softmax and its log-sum-exp follow, and the
// output is accumulated from the same scratch. Only the log-sum-exp (B, N, Ho, Wo) is kept for the backward, which
// recomputes the weights (FlashAttention) and accumulates dk / dv in the scratch before folding them back through the
// reflection onto the real map.
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

namespace acmix_cpp {
namespace {

constexpr int XB = 8;           // queries per block along the output row (one AVX2 float vector)
constexpr int UBMAX = 8;        // window columns whose logits are accumulated together
constexpr int DB = 4;           // channels accumulated together in the weighted sums
constexpr int64_t kScratchBytes = 384 * 1024;  // target size of one task's row scratch (fits in L2)

inline int64_t reflect(int64_t i, int64_t n) {
  if (n == 1) return 0;
  const int64_t period = 2 * (n - 1);
  i %= period;
  if (i < 0) i += period;
  return i >= n ? period - i : i;
}

// exp for the softmax, written so that GCC / Clang vectorise it (no libm call, no branch): Cody-Waite range
// reduction x = n ln2 + r, a polynomial for e^r (Cephes), and 2^n built in the exponent bits. Inputs are <= 0 here.
inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

inline double exp_poly(double x) {
  x = std::min(std::max(x, -708.0), 709.0);
  const double n = std::floor(x * 1.4426950408889634074 + 0.5);
  const double r = x - n * 6.93145751953125e-1 - n * 1.42860682030941723212e-6;
  const double r2 = r * r;
  const double px = r * ((1.26177193074810590878e-4 * r2 + 3.02994407707441961300e-2) * r2 + 9.99999999999999999910e-1);
  const double qx = ((3.00198505138664455042e-6 * r2 + 2.52448340349684104192e-3) * r2 + 2.27265548208155028766e-1) * r2 +
                    2.00000000000000000009e0;
  const double y = 1.0 + 2.0 * px / (qx - px);
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;
  double two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return y * two_n;
}

// Geometry of one call, shared by all tasks.
struct Geom {
  int64_t B, N, D, H, W, k, s, pad, Ho, Wo;
  int64_t Wop;   // Wo rounded up to XB
  int64_t M;     // slots per phase: Wop + (k - 1) / s + 1
  int64_t LR;    // scratch length of one (row, channel): s * M
  int64_t R;     // output rows per block
  int64_t nblk;  // blocks per (b, n)
  std::vector<int64_t> col;  // (s * M): real column of phase c / M, slot c % M
  std::vector<int64_t> off;  // (k): offset of window column u inside a scratch line: (u % s) * M + u / s

  Geom(const at::Tensor& q, int64_t kernel, int64_t stride, int64_t arrays, int64_t elem) {
    B = q.size(0), N = q.size(1), D = q.size(2), H = q.size(3), W = q.size(4);
    k = kernel, s = stride, pad = kernel / 2;
    Ho = (H + s - 1) / s, Wo = (W + s - 1) / s;
    Wop = (Wo + XB - 1) / XB * XB;
    M = Wop + (k - 1) / s + 1;
    LR = s * M;
    col.resize(LR);
    for (int64_t ph = 0; ph < s; ++ph)
      for (int64_t m = 0; m < M; ++m) col[ph * M + m] = reflect(m * s + ph - pad, W);
    off.resize(k);
    for (int64_t u = 0; u < k; ++u) off[u] = (u % s) * M + u / s;
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

// Copy the rows [yo0 * s, yo0 * s + nrows) of the padded (reflected) map of one (b, n) slab into the scratch
// (nrows, D, s, M), subtracting the position map when given.
template <typename T>
void fill_rows(T* dst, const Slab<T>& src, const Slab<T>* pos, int64_t yo0, int64_t nrows, const Geom& g) {
  const int64_t* col = g.col.data();
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t r = reflect(yo0 * g.s + i - g.pad, g.H);
    for (int64_t d = 0; d < g.D; ++d) {
      T* out = dst + (i * g.D + d) * g.LR;
      const T* in = src.at(d, r);
      if (pos != nullptr) {
        const T* pin = pos->at(d, r);
        for (int64_t c = 0; c < g.LR; ++c) out[c] = in[col[c]] - pin[col[c]];
      } else {
        for (int64_t c = 0; c < g.LR; ++c) out[c] = in[col[c]];
      }
    }
  }
}

// Adjoint of fill_rows: add the scratch (nrows, D, s, M) onto the real (D, H, W) slab through the reflection.
template <typename T>
void fold_rows(T* dst, const T* src, int64_t yo0, int64_t nrows, const Geom& g) {
  const int64_t* col = g.col.data();
  for (int64_t i = 0; i < nrows; ++i) {
    const int64_t r = reflect(yo0 * g.s + i - g.pad, g.H);
    for (int64_t d = 0; d < g.D; ++d) {
      const T* in = src + (i * g.D + d) * g.LR;
      T* out = dst + (d * g.H + r) * g.W;
      for (int64_t c = 0; c < g.LR; ++c) out[col[c]] += in[c];
    }
  }
}

// acc[u][j] = sum_d a[d][j] * line_d[off[u] + j] for UB window columns: a is (D, Wop) at the block's first query,
// lines is the scratch at (row, channel 0) shifted to the block's first query.
template <typename T, int UB>
inline void dot_block(const T* __restrict a, int64_t lda, const T* __restrict lines, int64_t LR, int64_t D,
                      const int64_t* __restrict off, T* __restrict out) {
  T acc[UB][XB];
  for (int u = 0; u < UB; ++u)
    for (int j = 0; j < XB; ++j) acc[u][j] = T(0);
  for (int64_t d = 0; d < D; ++d) {
    const T* ad = a + d * lda;
    const T* ld = lines + d * LR;
#pragma GCC unroll 8
    for (int u = 0; u < UB; ++u) {
      const T* lu = ld + off[u];
#pragma GCC unroll 8
      for (int j = 0; j < XB; ++j) acc[u][j] += ad[j] * lu[j];
    }
  }
  for (int u = 0; u < UB; ++u)
    for (int j = 0; j < XB; ++j) out[u * XB + j] = acc[u][j];
}

// S[t][j] = sum_d a[d][j] * scratch[window position t of query j][d] for the k * k window positions t = tr * k + u.
template <typename T>
void window_dots(const T* a, int64_t lda, const T* rows, const Geom& g, T* S) {
  const int64_t k = g.k;
  for (int64_t tr = 0; tr < k; ++tr) {
    const T* lines = rows + tr * g.D * g.LR;
    for (int64_t u0 = 0; u0 < k; u0 += UBMAX) {
      const int64_t* off = g.off.data() + u0;
      T* out = S + (tr * k + u0) * XB;
      switch (std::min<int64_t>(k - u0, UBMAX)) {
        case 1: dot_block<T, 1>(a, lda, lines, g.LR, g.D, off, out); break;
        case 2: dot_block<T, 2>(a, lda, lines, g.LR, g.D, off, out); break;
        case 3: dot_block<T, 3>(a, lda, lines, g.LR, g.D, off, out); break;
        case 4: dot_block<T, 4>(a, lda, lines, g.LR, g.D, off, out); break;
        case 5: dot_block<T, 5>(a, lda, lines, g.LR, g.D, off, out); break;
        case 6: dot_block<T, 6>(a, lda, lines, g.LR, g.D, off, out); break;
        case 7: dot_block<T, 7>(a, lda, lines, g.LR, g.D, off, out); break;
        default: dot_block<T, 8>(a, lda, lines, g.LR, g.D, off, out); break;
      }
    }
  }
}

// acc[e][j] = sum_t P[t][j] * scratch[window position t of query j][d0 + e] for NB channels.
template <typename T, int NB>
inline void weighted_block(const T* __restrict P, const T* __restrict rows, const Geom& g, int64_t d0,
                           T* __restrict acc_out) {
  T acc[NB][XB];
  for (int e = 0; e < NB; ++e)
    for (int j = 0; j < XB; ++j) acc[e][j] = T(0);
  const int64_t k = g.k, LR = g.LR;
  const int64_t* off = g.off.data();
  for (int64_t tr = 0; tr < k; ++tr) {
    const T* lines = rows + (tr * g.D + d0) * LR;
    for (int64_t u = 0; u < k; ++u) {
      const T* pu = P + (tr * k + u) * XB;
      const T* lu = lines + off[u];
#pragma GCC unroll 4
      for (int e = 0; e < NB; ++e) {
        const T* le = lu + e * LR;
#pragma GCC unroll 8
        for (int j = 0; j < XB; ++j) acc[e][j] += pu[j] * le[j];
      }
    }
  }
  for (int e = 0; e < NB; ++e)
    for (int j = 0; j < XB; ++j) acc_out[e * XB + j] = acc[e][j];
}

// out[d][j] = sum_t P[t][j] * scratch[...][d] for every channel; out is (D, XB).
template <typename T>
void window_weighted(const T* P, const T* rows, const Geom& g, T* out) {
  int64_t d0 = 0;
  for (; d0 + DB <= g.D; d0 += DB) weighted_block<T, DB>(P, rows, g, d0, out + d0 * XB);
  switch (g.D - d0) {
    case 1: weighted_block<T, 1>(P, rows, g, d0, out + d0 * XB); break;
    case 2: weighted_block<T, 2>(P, rows, g, d0, out + d0 * XB); break;
    case 3: weighted_block<T, 3>(P, rows, g, d0, out + d0 * XB); break;
    default: break;
  }
}

// buf[d][j] = mul * x[d][y][j * s] for j < Wo, 0 beyond: one strided row of a (D, H, W) slab, contiguous, padded.
template <typename T>
void load_row(T* buf, const Slab<T>& x, int64_t y, int64_t step, T mul, const Geom& g) {
  for (int64_t d = 0; d < g.D; ++d) {
    const T* in = x.at(d, y);
    T* out = buf + d * g.Wop;
    for (int64_t j = 0; j < g.Wo; ++j) out[j] = mul * in[j * step];
    for (int64_t j = g.Wo; j < g.Wop; ++j) out[j] = T(0);
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
    const int64_t max_rows = g.rows(0, g.R);
    std::vector<T> ks(max_rows * g.D * g.LR), vs(max_rows * g.D * g.LR), qb(g.D * g.Wop), S(k2 * XB),
        acc(g.D * XB);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bn = task / g.nblk, blk = task % g.nblk;
      const int64_t b = bn / g.N, n = bn % g.N;
      const int64_t yo0 = blk * g.R, yo1 = std::min(g.Ho, yo0 + g.R);
      const int64_t nrows = g.rows(yo0, yo1);
      const Slab<T> qs = slab<T>(q, b, n), kslab = slab<T>(k, b, n), vslab = slab<T>(v, b, n);
      Slab<T> pslab{};
      if (pos != nullptr) pslab = slab<T>(*pos, b, n);
      fill_rows<T>(ks.data(), kslab, pos != nullptr ? &pslab : nullptr, yo0, nrows, g);
      fill_rows<T>(vs.data(), vslab, nullptr, yo0, nrows, g);
      T* out_bn = out_ptr + bn * g.D * g.Ho * g.Wo;
      T* lse_bn = lse_ptr + bn * g.Ho * g.Wo;
      for (int64_t yo = yo0; yo < yo1; ++yo) {
        load_row<T>(qb.data(), qs, yo * g.s, g.s, scale, g);
        const int64_t row_off = (yo - yo0) * g.s * g.D * g.LR;
        for (int64_t x0 = 0; x0 < g.Wo; x0 += XB) {
          window_dots<T>(qb.data() + x0, g.Wop, ks.data() + row_off + x0, g, S.data());
          T mx[XB], sum[XB];
          for (int j = 0; j < XB; ++j) mx[j] = -std::numeric_limits<T>::infinity(), sum[j] = T(0);
          for (int64_t t = 0; t < k2; ++t)
            for (int j = 0; j < XB; ++j) mx[j] = std::max(mx[j], S[t * XB + j]);
          for (int64_t t = 0; t < k2; ++t) {
            T* st = S.data() + t * XB;
#pragma GCC unroll 8
            for (int j = 0; j < XB; ++j) {
              const T e = exp_poly(st[j] - mx[j]);
              st[j] = e;
              sum[j] += e;
            }
          }
          window_weighted<T>(S.data(), vs.data() + row_off + x0, g, acc.data());
          const int64_t nv = std::min<int64_t>(XB, g.Wo - x0);
          for (int64_t j = 0; j < nv; ++j) lse_bn[yo * g.Wo + x0 + j] = mx[j] + std::log(sum[j]);
          for (int64_t d = 0; d < g.D; ++d) {
            T* o = out_bn + (d * g.Ho + yo) * g.Wo + x0;
            for (int64_t j = 0; j < nv; ++j) o[j] = acc[d * XB + j] / sum[j];
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
    const int64_t max_rows = g.rows(0, g.R);
    const int64_t scratch = max_rows * g.D * g.LR;
    std::vector<T> ks(scratch), vs(scratch), dks(scratch), dvs(scratch), qb(g.D * g.Wop), gb(g.D * g.Wop),
        P(k2 * XB), dS(k2 * XB), acc(g.D * XB), delta(g.Wop), lrow(g.Wop);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bn = task / groups, grp = task % groups;
      const int64_t b = bn / g.N, n = bn % g.N;
      const int64_t blk0 = grp * g.nblk / groups, blk1 = (grp + 1) * g.nblk / groups;
      T* dk_bn = grp == 0 ? dk.data_ptr<T>() + bn * slab_size : dk_parts.data_ptr<T>() + ((grp - 1) * g.B * g.N + bn) * slab_size;
      T* dv_bn = grp == 0 ? dv.data_ptr<T>() + bn * slab_size : dv_parts.data_ptr<T>() + ((grp - 1) * g.B * g.N + bn) * slab_size;
      T* dq_bn = dq.data_ptr<T>() + bn * slab_size;
      const Slab<T> qs = slab<T>(q, b, n), kslab = slab<T>(k, b, n), vslab = slab<T>(v, b, n);
      const Slab<T> gs = slab<T>(dout, b, n), os = slab<T>(out, b, n);
      const T* lse_bn = lse.data_ptr<T>() + bn * g.Ho * g.Wo;
      Slab<T> pslab{};
      if (pos != nullptr) pslab = slab<T>(*pos, b, n);
      for (int64_t blk = blk0; blk < blk1; ++blk) {
        const int64_t yo0 = blk * g.R, yo1 = std::min(g.Ho, yo0 + g.R);
        const int64_t nrows = g.rows(yo0, yo1);
        fill_rows<T>(ks.data(), kslab, pos != nullptr ? &pslab : nullptr, yo0, nrows, g);
        fill_rows<T>(vs.data(), vslab, nullptr, yo0, nrows, g);
        std::fill(dks.begin(), dks.begin() + nrows * g.D * g.LR, T(0));
        std::fill(dvs.begin(), dvs.begin() + nrows * g.D * g.LR, T(0));
        for (int64_t yo = yo0; yo < yo1; ++yo) {
          load_row<T>(qb.data(), qs, yo * g.s, g.s, scale, g);
          load_row<T>(gb.data(), gs, yo, 1, T(1), g);
          for (int64_t j = 0; j < g.Wop; ++j) delta[j] = T(0), lrow[j] = T(0);
          for (int64_t d = 0; d < g.D; ++d) {
            const T* o = os.at(d, yo);
            const T* gd = gb.data() + d * g.Wop;
            for (int64_t j = 0; j < g.Wo; ++j) delta[j] += gd[j] * o[j];
          }
          for (int64_t j = 0; j < g.Wo; ++j) lrow[j] = lse_bn[yo * g.Wo + j];
          const int64_t row_off = (yo - yo0) * g.s * g.D * g.LR;
          for (int64_t x0 = 0; x0 < g.Wo; x0 += XB) {
            const int64_t nv = std::min<int64_t>(XB, g.Wo - x0);
            T mask[XB];
            for (int j = 0; j < XB; ++j) mask[j] = j < nv ? T(1) : T(0);
            window_dots<T>(qb.data() + x0, g.Wop, ks.data() + row_off + x0, g, P.data());  // logits
            window_dots<T>(gb.data() + x0, g.Wop, vs.data() + row_off + x0, g, dS.data());  // dP = dO . v
            const T* lx = lrow.data() + x0;
            const T* dx = delta.data() + x0;
            for (int64_t t = 0; t < k2; ++t) {
              T* pt = P.data() + t * XB;
              T* st = dS.data() + t * XB;
#pragma GCC unroll 8
              for (int j = 0; j < XB; ++j) {
                const T a = exp_poly(pt[j] - lx[j]) * mask[j];
                pt[j] = a;
                st[j] = a * (st[j] - dx[j]);  // d logit = A (dA - delta)
              }
            }
            // dq (at the strided query positions) = scale * sum_t dS_t k'_t
            window_weighted<T>(dS.data(), ks.data() + row_off + x0, g, acc.data());
            for (int64_t d = 0; d < g.D; ++d) {
              T* o = dq_bn + (d * g.H + yo * g.s) * g.W + x0 * g.s;
              for (int64_t j = 0; j < nv; ++j) o[j * g.s] = scale * acc[d * XB + j];
            }
            // dk'_t += dS_t (scale q), dv_t += A_t dO, into the scratch
            for (int64_t tr = 0; tr < g.k; ++tr) {
              T* dk_lines = dks.data() + row_off + tr * g.D * g.LR + x0;
              T* dv_lines = dvs.data() + row_off + tr * g.D * g.LR + x0;
              for (int64_t d = 0; d < g.D; ++d) {
                const T* qd = qb.data() + d * g.Wop + x0;
                const T* gd = gb.data() + d * g.Wop + x0;
                T* dkd = dk_lines + d * g.LR;
                T* dvd = dv_lines + d * g.LR;
                for (int64_t u = 0; u < g.k; ++u) {
                  const T* st = dS.data() + (tr * g.k + u) * XB;
                  const T* pt = P.data() + (tr * g.k + u) * XB;
                  T* dku = dkd + g.off[u];
                  T* dvu = dvd + g.off[u];
#pragma GCC unroll 8
                  for (int j = 0; j < XB; ++j) {
                    dku[j] += st[j] * qd[j];
                    dvu[j] += pt[j] * gd[j];
                  }
                }
              }
            }
          }
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
  at::Tensor dq = at::zeros(q.sizes(), q.options());
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
