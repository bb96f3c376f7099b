// Newton-Schulz orthogonalisation of a batch of small matrices (Celo2's item 6, Muon's
// quintic iteration), fused, as an XLA FFI handler for the CPU.
//
// For every lane (leading index) of x [..., R, C]: Y = x (transposed if R > C, so Y is
// m x n with m <= n), Y /= ||Y||_F + 1e-8, then `iters` times
//   A = Y Y^T;  B = b A + c A A;  Y = a Y + B Y       ((a, b, c) = (3.4445, -4.775, 2.0315))
// and the result is Y (transposed back). XLA runs each product as its own library call
// (~35 per 5 iterations, each reading and writing its operands); here a lane's matrices
// stay in L1/L2 for all iterations and every product is a register-tiled loop: a tile of
// 8 output rows x V vectors of 16 accumulates, for each k, one broadcast of the left
// operand per row times V vectors of row k of the right one. The iteration runs on
// Z = Y^T only (A = Z^T Z, and Y' = a Y + B Y is Z' = a Z + Z B since B is symmetric), so
// no matrix is transposed between iterations (transposing Y each time cost 14%).
//
// Z is kept zero-padded to NP x MP (multiples of 16): padded rows and columns stay zero
// through every product, so no loop needs a remainder.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));

constexpr int kW = 16;
constexpr int kRows = 8;  // output rows per tile

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline void store(float* p, v16 x) { *reinterpret_cast<v16u*>(p) = x; }

// C[i, j0:j0+16V] = alpha * D[i, ...] + sum_{k < K} L(i, k) * Rt[k, j0:j0+16V] for rows
// i in [0, M) (M a multiple of 8) and column block j0, with L(i, k) = L[i * lsr + k * lsc]
// (a transposed left operand is only other strides: its elements are broadcast one at a
// time anyway); D may be null.
template <int V>
inline void GemmBlock(int M, int K, const float* L, int lsr, int lsc, const float* Rt,
                      int ldr, float* C, int ldc, int j0, const float* D, float alpha) {
  for (int i0 = 0; i0 < M; i0 += kRows) {
    v16 acc[kRows][V];
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < V; ++v)
        acc[r][v] = D ? alpha * load(D + (i0 + r) * ldc + j0 + kW * v) : v16{};
    for (int k = 0; k < K; ++k) {
      v16 b[V];
      for (int v = 0; v < V; ++v) b[v] = load(Rt + k * ldr + j0 + kW * v);
      for (int r = 0; r < kRows; ++r) {
        const float a = L[(i0 + r) * lsr + k * lsc];
        for (int v = 0; v < V; ++v) acc[r][v] += a * b[v];
      }
    }
    for (int r = 0; r < kRows; ++r)
      for (int v = 0; v < V; ++v) store(C + (i0 + r) * ldc + j0 + kW * v, acc[r][v]);
  }
}

// C = alpha D + L R over all NC columns (a multiple of 16), in blocks of 2 vectors.
inline void Gemm(int M, int K, int NC, const float* L, int lsr, int lsc, const float* R,
                 int ldr, float* C, int ldc, const float* D = nullptr, float alpha = 0.0f) {
  int j0 = 0;
  for (; j0 + 2 * kW <= NC; j0 += 2 * kW)
    GemmBlock<2>(M, K, L, lsr, lsc, R, ldr, C, ldc, j0, D, alpha);
  if (j0 < NC) GemmBlock<1>(M, K, L, lsr, lsc, R, ldr, C, ldc, j0, D, alpha);
}

struct Work {
  std::vector<float> yt, yt2, a, b;
};

// The iteration on Z = Y^T (n x m, padded to NP x MP) only, so no transpose per iteration:
// A = Z^T Z, B = b A + c A A (symmetric), and Y' = a Y + B Y is Z' = a Z + Z B.
void RunLane(const float* x, float* out, int64_t R, int64_t C, int iters, Work& w) {
  const bool tall = R > C;  // then x is already Z (n x m); else x is Y (m x n)
  const int m = static_cast<int>(tall ? C : R), n = static_cast<int>(tall ? R : C);
  const int MP = (m + kW - 1) / kW * kW, NP = (n + kW - 1) / kW * kW;
  float* z = w.yt.data();
  float* z2 = w.yt2.data();
  std::fill(w.yt.begin(), w.yt.end(), 0.0f);
  float ss = 0.0f;
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) {
      const float v = x[i * C + j];
      ss += v * v;
      if (tall) {
        z[i * MP + j] = v;
      } else {
        z[j * MP + i] = v;
      }
    }
  const float scale = 1.0f / (std::sqrt(ss) + 1e-8f);
  for (int e = 0; e < NP * MP; ++e) z[e] *= scale;
  const float ca = 3.4445f, cb = -4.7750f, cc = 2.0315f;
  for (int it = 0; it < iters; ++it) {
    Gemm(MP, n, MP, z, 1, MP, z, MP, w.a.data(), MP);                // A = Z^T Z
    Gemm(MP, m, MP, w.a.data(), MP, 1, w.a.data(), MP, w.b.data(), MP);  // A A
    for (int e = 0; e < MP * MP; ++e) w.b[e] = cb * w.a[e] + cc * w.b[e];
    Gemm(NP, m, MP, z, MP, 1, w.b.data(), MP, z2, MP, z, ca);        // Z' = a Z + Z B
    std::swap(z, z2);
  }
  for (int64_t i = 0; i < R; ++i)
    for (int64_t j = 0; j < C; ++j) out[i * C + j] = tall ? z[i * MP + j] : z[j * MP + i];
}

ffi::Error NewtonSchulzImpl(ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> out,
                            int64_t iters) {
  auto dims = x.dimensions();
  if (dims.size() < 2 || iters < 0)
    return ffi::Error::InvalidArgument("newton_schulz: x must be [..., R, C]");
  const int64_t R = dims[dims.size() - 2], C = dims[dims.size() - 1];
  if (R < 1 || C < 1 || out->element_count() != x.element_count())
    return ffi::Error::InvalidArgument("newton_schulz: sizes");
  const int64_t lanes = x.element_count() / (R * C);
  const int64_t m = std::min(R, C), n = std::max(R, C);
  const int64_t MP = (m + kW - 1) / kW * kW, NP = (n + kW - 1) / kW * kW;
  Work w;
  w.yt.assign(NP * MP, 0.0f);
  w.yt2.assign(NP * MP, 0.0f);
  w.a.assign(MP * MP, 0.0f);
  w.b.assign(MP * MP, 0.0f);
  for (int64_t l = 0; l < lanes; ++l)
    RunLane(x.typed_data() + l * R * C, out->typed_data() + l * R * C, R, C,
            static_cast<int>(iters), w);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpmdLoptNewtonSchulz, NewtonSchulzImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("iters"));
