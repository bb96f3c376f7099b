// Celo2's learned rule on a matrix, fused: accumulators, features, their norms and the MLP,
// as an XLA FFI handler for the CPU (the direction before Newton-Schulz).
//
// For every lane (a task under vmap, or a leading index of the parameter) and a matrix of
// R x C entries (row-major) with parameter p, gradient grad, momenta m (R x C x 3,
// decays 0.9 / 0.99 / 0.999), second moment v (R x C x 1, decay 0.95) and Adafactor's row
// and column statistics (3 decays each), it computes, as spmd_lopt/learned_optimizers/
// celo2.py does with XLA ops:
//   g = clip(grad, +-1000); m_k <- b_k m_k + (1 - b_k) g; v <- 0.95 v + 0.05 g^2;
//   the factored statistics of g^2 + 1e-30 and their factors rf, cf (so fac_g = g rf cf);
//   18 full-size feature columns (g, clip(g, +-0.1), p, m, v, m s, s, fac_g, g s, m rf cf
//   with s = rsqrt(v + 1e-8)) and 12 row/column ones (the statistics and their rsqrt),
//   each scaled to unit RMS over the matrix;
//   h = relu(x W0 + b0); h = relu(h W1 + b1); direction = h W2[:, 0] + b2[0]  (hidden 8).
// Outputs: m, v, the two statistics (updated) and the direction (R x C).
//
// Three passes over the matrix, each a loop over rows and 16-entry tiles of a row (entries
// in vector lanes, the 329 weights it uses broadcast): (1) the accumulators, the sums
// behind the statistics and the sums of squares of the 12 columns that do not need the
// statistics; (2) the sums of squares of the 6 columns that do (fac_g, m rf cf); (3) the
// features again, the norms folded into the first layer (n_c W0[c]), the row/column
// columns' contributions as two tables (one per row, one per column) and the MLP in
// registers. A small lane's matrix stays in cache between passes; nothing per entry is
// written but the results. XLA ran the same math as ~100 fused loops, transposes and
// products per matrix. A vector (rank 1) runs as a 1 x n matrix with its full second
// moments in the row statistic's place (Shape::vector).
//
// Vectors are GCC's generic extension (__builtin_shuffle is GCC's; -march=native picks
// the ISA). The momenta's trailing decay axis is de-interleaved by shuffles.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads
typedef int32_t i16v __attribute__((vector_size(64)));

constexpr int kW = 16;       // entries per tile (vector lanes)
constexpr int kH = 8;        // hidden units
constexpr int kIn = 30;      // first-layer rows: the 14 feature groups' widths summed
constexpr int kFull = 18;    // full-size feature columns
constexpr int kTheta = kIn * kH + kH + kH * kH + kH + kH + 1;  // packed weights: 329
constexpr float kDecay[3] = {0.9f, 0.99f, 0.999f};
constexpr float kRmsDecay = 0.95f;

// First-layer rows of the groups (celo2.GROUP_WIDTHS' order).
enum Row {
  kG = 0, kClip = 1, kP = 2, kM = 3, kV = 6, kMs = 7, kS = 10, kFac = 11, kGs = 14,
  kStatRow = 15, kStatCol = 18, kRsqrtRow = 21, kRsqrtCol = 24, kMrc = 27,
};
// The 18 full-size columns, in the order the kernel's folded weights keep them.
constexpr int kFullRows[kFull] = {kG,      kClip,    kP,      kM,      kM + 1,  kM + 2,
                                  kV,      kMs,      kMs + 1, kMs + 2, kS,      kFac,
                                  kFac + 1, kFac + 2, kGs,    kMrc,    kMrc + 1, kMrc + 2};

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }
inline v16 splat(float x) { return v16{} + x; }
// A NaN in `a` comes through, as XLA's max/min (so clip and relu) let it: a diverged inner
// task's NaN gradient must give NaN steps here too, not finite ones.
inline v16 vmax(v16 a, v16 b) { return a < b ? b : a; }
inline v16 vmin(v16 a, v16 b) { return a > b ? b : a; }
inline v16 relu(v16 x) { return vmax(x, v16{}); }
inline v16 clip(v16 x, float lim) { return vmin(vmax(x, splat(-lim)), splat(lim)); }
inline v16 rsqrt(v16 x) {  // vectorised by -fno-math-errno
  v16 r;
  for (int q = 0; q < kW; ++q) r[q] = 1.0f / std::sqrt(x[q]);
  return r;
}
inline float hsum(v16 x) {
  float s = 0.0f;
  for (int q = 0; q < kW; ++q) s += x[q];
  return s;
}

// Element 3q + k of three consecutive vectors a, b, c (48 interleaved floats) -> lane q of
// out[k], and back.
inline void Deinterleave(v16 a, v16 b, v16 c, v16 (&out)[3]) {
  const i16v f0 = {0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 0, 0, 0, 0, 0};
  const i16v s0 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 17, 20, 23, 26, 29};
  const i16v f1 = {1, 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 0, 0, 0, 0, 0};
  const i16v s1 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 18, 21, 24, 27, 30};
  const i16v f2 = {2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 0, 0, 0, 0, 0, 0};
  const i16v s2 = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 19, 22, 25, 28, 31};
  out[0] = __builtin_shuffle(__builtin_shuffle(a, b, f0), c, s0);
  out[1] = __builtin_shuffle(__builtin_shuffle(a, b, f1), c, s1);
  out[2] = __builtin_shuffle(__builtin_shuffle(a, b, f2), c, s2);
}
inline void Interleave(const v16 (&m)[3], v16& a, v16& b, v16& c) {
  const i16v f0 = {0, 16, 0, 1, 17, 0, 2, 18, 0, 3, 19, 0, 4, 20, 0, 5};
  const i16v s0 = {0, 1, 16, 3, 4, 17, 6, 7, 18, 9, 10, 19, 12, 13, 20, 15};
  const i16v f1 = {21, 0, 6, 22, 0, 7, 23, 0, 8, 24, 0, 9, 25, 0, 10, 26};
  const i16v s1 = {0, 21, 2, 3, 22, 5, 6, 23, 8, 9, 24, 11, 12, 25, 14, 15};
  const i16v f2 = {0, 11, 27, 0, 12, 28, 0, 13, 29, 0, 14, 30, 0, 15, 31, 0};
  const i16v s2 = {26, 1, 2, 27, 4, 5, 28, 7, 8, 29, 10, 11, 30, 13, 14, 31};
  a = __builtin_shuffle(__builtin_shuffle(m[0], m[1], f0), m[2], s0);
  b = __builtin_shuffle(__builtin_shuffle(m[0], m[1], f1), m[2], s1);
  c = __builtin_shuffle(__builtin_shuffle(m[0], m[1], f2), m[2], s2);
}

// The first n (0..16) floats at p, the rest zero; and the first n lanes of x stored to p.
// Masked instructions where the ISA has them (a row's last tile with C = 10 cost ~20 ns
// per entry as scalar loops).
inline v16 LoadN(const float* p, int n) {
#ifdef __AVX512F__
  return (v16)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n) - 1), p);
#else
  v16 x = {};
  for (int q = 0; q < n; ++q) x[q] = p[q];
  return x;
#endif
}
inline void StoreN(float* p, v16 x, int n) {
#ifdef __AVX512F__
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << n) - 1), (__m512)x);
#else
  for (int q = 0; q < n; ++q) p[q] = x[q];
#endif
}
inline int Clamp16(int n) { return n < 0 ? 0 : (n > kW ? kW : n); }

// Three interleaved values per entry (m, or v_full in vector mode) for n entries from e0.
inline void Load3(const float* x, int64_t e0, int n, v16 (&out)[3]) {
  const float* b = x + 3 * e0;
  if (n == kW) return Deinterleave(load(b), load(b + kW), load(b + 2 * kW), out);
  const int n3 = 3 * n;
  Deinterleave(LoadN(b, Clamp16(n3)), LoadN(b + kW, Clamp16(n3 - kW)),
               LoadN(b + 2 * kW, Clamp16(n3 - 2 * kW)), out);
}
inline void Store3(float* x, int64_t e0, int n, const v16 (&in)[3]) {
  float* b = x + 3 * e0;
  v16 u, v, w;
  Interleave(in, u, v, w);
  if (n == kW) {
    store(b, u);
    store(b + kW, v);
    store(b + 2 * kW, w);
    return;
  }
  const int n3 = 3 * n;
  StoreN(b, u, Clamp16(n3));
  StoreN(b + kW, v, Clamp16(n3 - kW));
  StoreN(b + 2 * kW, w, Clamp16(n3 - 2 * kW));
}

// A tile's per-entry inputs; lanes past n (a row's last, partial tile) are zero.
struct Tile {
  v16 g, p, v, m[3];
};

// Entries e0 .. e0 + n - 1 of a lane's arrays (n <= 16); grad is clipped.
inline void LoadTile(const float* grad, const float* p, const float* m, const float* v,
                     int64_t e0, int n, bool want_p, Tile& t) {
  if (n == kW) {
    t.g = clip(load(grad + e0), 1000.0f);
    if (want_p) t.p = load(p + e0);
    t.v = load(v + e0);
  } else {
    t.g = clip(LoadN(grad + e0, n), 1000.0f);
    if (want_p) t.p = LoadN(p + e0, n);
    t.v = LoadN(v + e0, n);
  }
  Load3(m, e0, n, t.m);
}

inline void StoreAccumulators(const Tile& t, int64_t e0, int n, float* m, float* v) {
  if (n == kW) {
    store(v + e0, t.v);
  } else {
    StoreN(v + e0, t.v, n);
  }
  Store3(m, e0, n, t.m);
}

inline v16 Mask(int n) {
  v16 mask;
  for (int q = 0; q < kW; ++q) mask[q] = q < n ? 1.0f : 0.0f;
  return mask;
}

struct Scratch {
  // Per column j (padded to whole tiles): the statistic's sum, then the column factors
  // B_k[j], then the per-column table TJ[h][j].
  std::vector<float> col_sum, col_factor, col_table;
  // Per row i: the row factors A_k[i] and the per-row table TI[i][h].
  std::vector<float> row_sum, row_factor, row_table;
};

struct Shape {
  int64_t rows, cols, cols_padded;
  bool d_row_last;  // Adafactor's "row" statistic (mean over its largest axis) is per row i
  // A vector (rank 1, as rows = 1): Adafactor keeps full second moments v_full (n x 3, in
  // the "row" statistic's place) and fac_g = g rsqrt(max(v_full + 1e-9, 1e-9)); there are
  // no row/column columns and no m rf cf (15 features).
  bool vector;
};

// The 12 row/column columns' first-layer contribution per index of one statistic
// (stat: [n, 3] after the update): sum_k n_k W0[stat_row + k] stat_k + n'_k W0[rsqrt_row + k]
// rsqrt(stat_k + 1e-8), each column normalised over its n values.
void StatTable(const float* stat, int64_t n, const float* w0, int stat_row, int rsqrt_row,
               float* table, int64_t stride_idx, int64_t stride_h) {
  float norm[3], rnorm[3];
  for (int k = 0; k < 3; ++k) {
    float s = 0.0f, r = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float x = stat[3 * i + k];
      const float y = 1.0f / std::sqrt(x + 1e-8f);
      s += x * x;
      r += y * y;
    }
    norm[k] = 1.0f / std::sqrt(1e-9f + s / static_cast<float>(n));
    rnorm[k] = 1.0f / std::sqrt(1e-9f + r / static_cast<float>(n));
  }
  for (int64_t i = 0; i < n; ++i)
    for (int h = 0; h < kH; ++h) {
      float acc = 0.0f;
      for (int k = 0; k < 3; ++k) {
        const float x = stat[3 * i + k];
        acc += norm[k] * w0[(stat_row + k) * kH + h] * x +
               rnorm[k] * w0[(rsqrt_row + k) * kH + h] * (1.0f / std::sqrt(x + 1e-8f));
      }
      table[i * stride_idx + h * stride_h] += acc;
    }
}

// Adafactor's statistics (means of g^2 + 1e-30 over j per row and over i per column, from
// pass 1's sums) and their factors rf = rsqrt(max(v_row / (mean(v_row) + 1e-9), 1e-9)),
// cf = rsqrt(max(v_col, 1e-9)) as A (per row, [3][R]) and B (per column, [3][CP], zero
// past C). Celo2's "row" statistic averages over the largest axis: per column j when R > C.
void StatFactors(const Shape& s, Scratch& w, const float* vrow_in, const float* vcol_in,
                 float* vrow, float* vcol) {
  const int64_t R = s.rows, C = s.cols, CP = s.cols_padded;
  float* per_i = s.d_row_last ? vrow : vcol;
  float* per_j = s.d_row_last ? vcol : vrow;
  const float* per_i_in = s.d_row_last ? vrow_in : vcol_in;
  const float* per_j_in = s.d_row_last ? vcol_in : vrow_in;
  for (int k = 0; k < 3; ++k) {
    const float b = kDecay[k], a = 1.0f - kDecay[k];
    for (int64_t i = 0; i < R; ++i)
      per_i[3 * i + k] = b * per_i_in[3 * i + k] + a * (w.row_sum[i] / static_cast<float>(C));
    for (int64_t j = 0; j < C; ++j)
      per_j[3 * j + k] = b * per_j_in[3 * j + k] + a * (w.col_sum[j] / static_cast<float>(R));
  }
  const int64_t n_vrow = s.d_row_last ? R : C, n_vcol = s.d_row_last ? C : R;
  float* rf = s.d_row_last ? w.row_factor.data() : w.col_factor.data();
  float* cf = s.d_row_last ? w.col_factor.data() : w.row_factor.data();
  const int64_t rf_stride = s.d_row_last ? R : CP, cf_stride = s.d_row_last ? CP : R;
  std::fill(w.col_factor.begin(), w.col_factor.end(), 0.0f);
  for (int k = 0; k < 3; ++k) {
    float mean = 0.0f;
    for (int64_t i = 0; i < n_vrow; ++i) mean += vrow[3 * i + k];
    mean /= static_cast<float>(n_vrow);
    for (int64_t i = 0; i < n_vrow; ++i)
      rf[k * rf_stride + i] =
          1.0f / std::sqrt(std::max(vrow[3 * i + k] / (mean + 1e-9f), 1e-9f));
    for (int64_t i = 0; i < n_vcol; ++i)
      cf[k * cf_stride + i] = 1.0f / std::sqrt(std::max(vcol[3 * i + k], 1e-9f));
  }
}

// The vector case's factors: A = 1, B[k][j] = rsqrt(max(v_full[j, k] + 1e-9, 1e-9)).
void FullFactors(const Shape& s, Scratch& w, const float* v_full) {
  std::fill(w.col_factor.begin(), w.col_factor.end(), 0.0f);
  for (int k = 0; k < 3; ++k) {
    w.row_factor[k] = 1.0f;
    for (int64_t j = 0; j < s.cols; ++j)
      w.col_factor[k * s.cols_padded + j] =
          1.0f / std::sqrt(std::max(v_full[3 * j + k] + 1e-9f, 1e-9f));
  }
}

void RunLane(const Shape& s, const float* theta, const float* p, const float* grad,
             const float* m_in, const float* v_in, const float* vrow_in, const float* vcol_in,
             float* m, float* v, float* vrow, float* vcol, float* out, Scratch& w) {
  const int64_t R = s.rows, C = s.cols, CP = s.cols_padded;
  const float count = static_cast<float>(R * C);
  // --- pass 1: accumulators, the statistics' sums, 12 columns' sums of squares.
  std::fill(w.col_sum.begin(), w.col_sum.end(), 0.0f);
  v16 sq[12] = {};
  for (int64_t i = 0; i < R; ++i) {
    v16 row = {};
    for (int64_t j0 = 0; j0 < C; j0 += kW) {
      const int n = static_cast<int>(std::min<int64_t>(kW, C - j0));
      const int64_t e0 = i * C + j0;
      Tile t;
      LoadTile(grad, p, m_in, v_in, e0, n, true, t);
      const v16 g2 = t.g * t.g;
      for (int k = 0; k < 3; ++k) t.m[k] = kDecay[k] * t.m[k] + (1.0f - kDecay[k]) * t.g;
      t.v = kRmsDecay * t.v + (1.0f - kRmsDecay) * g2;
      StoreAccumulators(t, e0, n, m, v);
      if (s.vector) {  // v_full <- b v_full + (1 - b) (g^2 + 1e-30), in the v_row slot
        v16 full[3];
        Load3(vrow_in, e0, n, full);
        for (int k = 0; k < 3; ++k)
          full[k] = kDecay[k] * full[k] + (1.0f - kDecay[k]) * (g2 + 1e-30f);
        Store3(vrow, e0, n, full);
      }
      const v16 mask = n == kW ? splat(1.0f) : Mask(n);
      const v16 s2 = (g2 + 1e-30f) * mask;
      row += s2;
      store(&w.col_sum[j0], load(&w.col_sum[j0]) + s2);
      const v16 sv = rsqrt(t.v + 1e-8f) * mask;
      const v16 cg = clip(t.g, 0.1f);
      sq[0] += t.g * t.g;
      sq[1] += cg * cg;
      sq[2] += t.p * t.p;
      for (int k = 0; k < 3; ++k) {
        sq[3 + k] += t.m[k] * t.m[k];
        const v16 ms = t.m[k] * sv;
        sq[7 + k] += ms * ms;
      }
      sq[6] += t.v * t.v;
      sq[10] += sv * sv;
      const v16 gs = t.g * sv;
      sq[11] += gs * gs;
    }
    w.row_sum[i] = hsum(row);
  }
  if (s.vector) {
    FullFactors(s, w, vrow);
  } else {
    StatFactors(s, w, vrow_in, vcol_in, vrow, vcol);
  }
  const float* A = w.row_factor.data();  // [3][R]
  const float* B = w.col_factor.data();  // [3][CP]
  // --- pass 2: sums of squares of fac_g = g A B and m A B.
  v16 sq2[6] = {};
  for (int64_t i = 0; i < R; ++i) {
    const float a[3] = {A[i], A[R + i], A[2 * R + i]};
    for (int64_t j0 = 0; j0 < C; j0 += kW) {
      const int n = static_cast<int>(std::min<int64_t>(kW, C - j0));
      Tile t;
      LoadTile(grad, p, m, v, i * C + j0, n, false, t);
      for (int k = 0; k < 3; ++k) {
        const v16 f = t.g * a[k] * load(&B[k * CP + j0]);
        const v16 mf = t.m[k] * a[k] * load(&B[k * CP + j0]);
        sq2[k] += f * f;
        sq2[3 + k] += mf * mf;
      }
    }
  }
  // Norms folded into the first layer: wf[c][h] = n_c W0[kFullRows[c]][h].
  float norm[kFull];
  const float sums[kFull] = {hsum(sq[0]),  hsum(sq[1]),  hsum(sq[2]),  hsum(sq[3]),
                             hsum(sq[4]),  hsum(sq[5]),  hsum(sq[6]),  hsum(sq[7]),
                             hsum(sq[8]),  hsum(sq[9]),  hsum(sq[10]), hsum(sq2[0]),
                             hsum(sq2[1]), hsum(sq2[2]), hsum(sq[11]), hsum(sq2[3]),
                             hsum(sq2[4]), hsum(sq2[5])};
  for (int c = 0; c < kFull; ++c) norm[c] = 1.0f / std::sqrt(1e-9f + sums[c] / count);
  const float* w0 = theta;
  const float* b0 = w0 + kIn * kH;
  const float* w1 = b0 + kH;
  const float* b1 = w1 + kH * kH;
  const float* w2 = b1 + kH;
  const float b2 = w2[kH];
  float wf[kFull][kH];
  for (int c = 0; c < kFull; ++c)
    for (int h = 0; h < kH; ++h) wf[c][h] = norm[c] * w0[kFullRows[c] * kH + h];
  // Tables: TI[i][h] (per row) and TJ[h][j] (per column, with b0; zero past C).
  std::fill(w.row_table.begin(), w.row_table.end(), 0.0f);
  std::fill(w.col_table.begin(), w.col_table.end(), 0.0f);
  for (int h = 0; h < kH; ++h)
    for (int64_t j = 0; j < C; ++j) w.col_table[h * CP + j] = b0[h];
  if (s.vector) {  // no m rf cf column
    for (int c = kFull - 3; c < kFull; ++c)
      for (int h = 0; h < kH; ++h) wf[c][h] = 0.0f;
  } else {  // each statistic's groups go to the table of the axis it is indexed by
    const int64_t n_vrow = s.d_row_last ? R : C, n_vcol = s.d_row_last ? C : R;
    StatTable(vrow, n_vrow, w0, kStatRow, kRsqrtRow,
              s.d_row_last ? w.row_table.data() : w.col_table.data(),
              s.d_row_last ? kH : 1, s.d_row_last ? 1 : CP);
    StatTable(vcol, n_vcol, w0, kStatCol, kRsqrtCol,
              s.d_row_last ? w.col_table.data() : w.row_table.data(),
              s.d_row_last ? 1 : kH, s.d_row_last ? CP : 1);
  }
  // --- pass 3: features, the MLP, the direction.
  for (int64_t i = 0; i < R; ++i) {
    const float a[3] = {A[i], A[R + i], A[2 * R + i]};
    const float* ti = &w.row_table[i * kH];
    for (int64_t j0 = 0; j0 < C; j0 += kW) {
      const int n = static_cast<int>(std::min<int64_t>(kW, C - j0));
      const int64_t e0 = i * C + j0;
      Tile t;
      LoadTile(grad, p, m, v, e0, n, true, t);
      const v16 sv = rsqrt(t.v + 1e-8f);
      v16 ab[3];
      for (int k = 0; k < 3; ++k) ab[k] = a[k] * load(&B[k * CP + j0]);
      const v16 x[kFull] = {t.g,         clip(t.g, 0.1f), t.p,         t.m[0],
                            t.m[1],      t.m[2],          t.v,         t.m[0] * sv,
                            t.m[1] * sv, t.m[2] * sv,     sv,          t.g * ab[0],
                            t.g * ab[1], t.g * ab[2],     t.g * sv,    t.m[0] * ab[0],
                            t.m[1] * ab[1], t.m[2] * ab[2]};
      v16 h[kH];
      for (int u = 0; u < kH; ++u) h[u] = ti[u] + load(&w.col_table[u * CP + j0]);
      for (int c = 0; c < kFull; ++c)
        for (int u = 0; u < kH; ++u) h[u] += x[c] * wf[c][u];
      for (int u = 0; u < kH; ++u) h[u] = relu(h[u]);
      v16 h2[kH];
      for (int u = 0; u < kH; ++u) h2[u] = splat(b1[u]);
      for (int k = 0; k < kH; ++k)
        for (int u = 0; u < kH; ++u) h2[u] += h[k] * w1[k * kH + u];
      v16 o = splat(b2);
      for (int u = 0; u < kH; ++u) o += relu(h2[u]) * w2[u];
      if (n == kW) {
        store(out + e0, o);
      } else {
        StoreN(out + e0, o, n);
      }
    }
  }
}

ffi::Error Celo2MatrixImpl(ffi::Buffer<ffi::F32> p, ffi::Buffer<ffi::F32> grad,
                           ffi::Buffer<ffi::F32> m, ffi::Buffer<ffi::F32> v,
                           ffi::Buffer<ffi::F32> vrow, ffi::Buffer<ffi::F32> vcol,
                           ffi::Buffer<ffi::F32> theta, ffi::ResultBuffer<ffi::F32> m_out,
                           ffi::ResultBuffer<ffi::F32> v_out,
                           ffi::ResultBuffer<ffi::F32> vrow_out,
                           ffi::ResultBuffer<ffi::F32> vcol_out,
                           ffi::ResultBuffer<ffi::F32> out, int64_t rows, int64_t cols,
                           int64_t d_row_last, int64_t vector) {
  Shape s;
  s.rows = rows;
  s.cols = cols;
  s.cols_padded = (cols + kW - 1) / kW * kW;
  s.d_row_last = d_row_last != 0;
  s.vector = vector != 0;
  if (rows < 1 || cols < 1 || (s.vector && (rows != 1 || !s.d_row_last)))
    return ffi::Error::InvalidArgument("celo2_matrix: bad sizes");
  const int64_t entries = rows * cols;
  const int64_t lanes = p.element_count() / entries;
  // Per lane: the "row" statistic (v_full for a vector) and the column one (none then).
  const int64_t n_vrow = s.vector ? cols : (s.d_row_last ? rows : cols);
  const int64_t n_vcol = s.vector ? 0 : (s.d_row_last ? cols : rows);
  // The Python wrapper checks these before it calls; this guards the memory accesses.
  if (p.element_count() != lanes * entries || grad.element_count() != lanes * entries ||
      m.element_count() != 3 * lanes * entries || v.element_count() != lanes * entries ||
      vrow.element_count() != 3 * lanes * n_vrow ||
      vcol.element_count() != 3 * lanes * n_vcol || theta.element_count() != lanes * kTheta ||
      out->element_count() != lanes * entries || m_out->element_count() != m.element_count() ||
      v_out->element_count() != lanes * entries ||
      vrow_out->element_count() != vrow.element_count() ||
      vcol_out->element_count() != vcol.element_count())
    return ffi::Error::InvalidArgument("celo2_matrix: sizes mismatch");
  Scratch w;
  w.col_sum.assign(s.cols_padded, 0.0f);
  w.col_factor.assign(3 * s.cols_padded, 0.0f);
  w.col_table.assign(kH * s.cols_padded, 0.0f);
  w.row_sum.assign(rows, 0.0f);
  w.row_factor.assign(3 * rows, 0.0f);
  w.row_table.assign(kH * rows, 0.0f);
  for (int64_t l = 0; l < lanes; ++l) {
    RunLane(s, theta.typed_data() + l * kTheta, p.typed_data() + l * entries,
            grad.typed_data() + l * entries, m.typed_data() + 3 * l * entries,
            v.typed_data() + l * entries, vrow.typed_data() + 3 * l * n_vrow,
            vcol.typed_data() + 3 * l * n_vcol, m_out->typed_data() + 3 * l * entries,
            v_out->typed_data() + l * entries, vrow_out->typed_data() + 3 * l * n_vrow,
            vcol_out->typed_data() + 3 * l * n_vcol, out->typed_data() + l * entries, w);
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpmdLoptCelo2Matrix, Celo2MatrixImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("rows")
                                  .Attr<int64_t>("cols")
                                  .Attr<int64_t>("d_row_last")
                                  .Attr<int64_t>("vector"));
