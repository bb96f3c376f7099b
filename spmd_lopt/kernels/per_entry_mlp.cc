// The per-entry MLP of a learned optimizer, fused, as an XLA FFI handler for the CPU.
//
// For every lane l (a task under vmap) and entry i of a tensor, with the entry's features
// x_i = concat_f(feature_f[l, i, :]) (F numbers), the first layer W0[l] (F x H), b0[l]
// (H) and the later layers packed in tail[l] as
//   [{Wk (H x H), bk (H)} x (layers - 1), WL (H x O), bL (O)]
// (row-major), it computes
//   h = relu(x_i W0 + b0);  h = relu(h Wk + bk) for each hidden layer;  out = h WL + bL
// and writes out[l, i, :] (O numbers).
//
// Why a kernel: XLA's CPU backend runs this as separate batched products whose [n, H]
// activations go through memory between layers, and its per-lane (batched) products with
// K, N <= 32 reach ~7% of one core's matmul peak. Here a tile of R entries keeps its
// activations in vector registers and L1 from the features to the output.
//
// Layout in registers: an entry's H hidden units are H / 16 vectors of 16 floats; a tile
// holds R entries x H / 16 accumulators and each layer is, per input unit k, one broadcast
// of the entry's k-th activation times row k of the weight (R x H/16 FMAs for R broadcasts
// and H/16 loads). The output layer's O dot products per entry are summed 16 at a time by
// a shuffle tree. Vectors are GCC's generic extension (GCC builds it; __builtin_shuffle is
// GCC's): the compiler picks the ISA (-march=native).
#include <algorithm>
#include <cmath>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4)));  // unaligned loads
typedef int32_t i16v __attribute__((vector_size(64)));

inline v16 load(const float* p) { return *reinterpret_cast<const v16u*>(p); }
inline v16 relu(v16 x) {  // NaN comes through, as in XLA's max(x, 0)
  const v16 zero = {};
  return x < zero ? zero : x;
}

// Lane i of the result: the sum of t[i]'s 16 lanes. A transpose-and-add tree: each level
// adds the two halves of every block, pairing vectors (30 shuffles and 15 adds for 16
// sums, where one horizontal sum each costs ~8 operations).
inline v16 SumEach(const v16 (&t)[16]) {
  const i16v lo1 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const i16v hi1 = lo1 + 8;
  const i16v lo2 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const i16v hi2 = lo2 + 4;
  const i16v lo3 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const i16v hi3 = lo3 + 2;
  const i16v lo4 = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const i16v hi4 = lo4 + 1;
  v16 u[8], w[4], x[2];
  for (int i = 0; i < 8; ++i)
    u[i] = __builtin_shuffle(t[2 * i], t[2 * i + 1], lo1) +
           __builtin_shuffle(t[2 * i], t[2 * i + 1], hi1);
  for (int i = 0; i < 4; ++i)
    w[i] = __builtin_shuffle(u[2 * i], u[2 * i + 1], lo2) +
           __builtin_shuffle(u[2 * i], u[2 * i + 1], hi2);
  for (int i = 0; i < 2; ++i)
    x[i] = __builtin_shuffle(w[2 * i], w[2 * i + 1], lo3) +
           __builtin_shuffle(w[2 * i], w[2 * i + 1], hi3);
  return __builtin_shuffle(x[0], x[1], lo4) + __builtin_shuffle(x[0], x[1], hi4);
}

constexpr int kRows = 8;         // entries per tile (4 and 12 were no faster)
constexpr int kMaxFeatures = 64;
constexpr int kMaxOut = 8;
constexpr int kMaxFeatureArrays = 16;

// acc[r] = b + sum_c x_c[r] w[c, :] with the tile's feature columns read in place from the
// feature arrays (entry r of array a at src[a][r * width[a] + j]); no gathered copy.
template <int HV>
inline void FirstLayerTile(const float* const* src, const int64_t* widths, int num_arrays,
                           const float* w, const float* b, v16 (&acc)[kRows][HV]) {
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < HV; ++v) acc[r][v] = load(b + 16 * v);
  for (int a = 0; a < num_arrays; ++a) {
    const int64_t d = widths[a];
    for (int64_t j = 0; j < d; ++j, w += HV * 16) {
      v16 wk[HV];
      for (int v = 0; v < HV; ++v) wk[v] = load(w + v * 16);
      const float* col = src[a] + j;
      for (int r = 0; r < kRows; ++r) {
        const float s = col[r * d];
        for (int v = 0; v < HV; ++v) acc[r][v] += s * wk[v];
      }
    }
  }
}

// acc[r] = b + sum_k x[r, k] w[k, :] for the R rows of x ([R, K], row stride K).
template <int HV>
inline void DenseTile(const float* x, int K, const float* w, const float* b,
                      v16 (&acc)[kRows][HV]) {
  for (int r = 0; r < kRows; ++r)
    for (int v = 0; v < HV; ++v) acc[r][v] = load(b + 16 * v);
  for (int k = 0; k < K; ++k) {
    v16 wk[HV];
    for (int v = 0; v < HV; ++v) wk[v] = load(w + (k * HV + v) * 16);
    for (int r = 0; r < kRows; ++r) {
      const float s = x[r * K + k];
      for (int v = 0; v < HV; ++v) acc[r][v] += s * wk[v];
    }
  }
}

struct Shapes {
  int features, hidden, hidden_layers, out;
  int64_t entries, tail_size;
};

// One lane: entries [0, n) of its feature arrays through the MLP with its weights. Each
// tile's outputs go to sink(i0, rows, p0, sums): lane i of sums is output o of entry
// i0 + r for p0 + i = r * O + o (entries past rows are padding).
template <int HV, typename Sink>
void MlpTiles(const Shapes& s, const float* w0, const float* b0, const float* tail,
              const float* const* feats, const int64_t* widths, int num_arrays,
              Sink&& sink) {
  constexpr int H = HV * 16;
  const int F = s.features, O = s.out;
  const float* wh = tail;
  const float* wl = wh + (s.hidden_layers - 1) * (H * H + H);
  const float* bl = wl + H * O;
  alignas(64) float x[kRows * kMaxFeatures];
  alignas(64) float h[kRows * H];
  v16 acc[kRows][HV];
  // The last layer is O dot products per entry: its columns as vectors over hidden units.
  v16 wl_cols[kMaxOut][HV];
  for (int o = 0; o < O; ++o)
    for (int v = 0; v < HV; ++v)
      for (int j = 0; j < 16; ++j) wl_cols[o][v][j] = wl[(16 * v + j) * O + o];
  // The output bias in the order the outputs are summed (product p = r * O + o).
  v16 bl_lanes[kRows * kMaxOut / 16] = {};
  for (int p = 0; p < kRows * O; ++p) bl_lanes[p / 16][p % 16] = bl[p % O];

  for (int64_t i0 = 0; i0 < s.entries; i0 += kRows) {
    const int rows = static_cast<int>(std::min<int64_t>(kRows, s.entries - i0));
    if (rows == kRows) {
      const float* tile[kMaxFeatureArrays];
      for (int a = 0; a < num_arrays; ++a) tile[a] = feats[a] + i0 * widths[a];
      FirstLayerTile<HV>(tile, widths, num_arrays, w0, b0, acc);
    } else {
      // The last, partial tile: its features gathered, rows past the end zero (computed,
      // not written).
      for (int r = 0; r < kRows; ++r) {
        int c = 0;
        for (int a = 0; a < num_arrays; ++a) {
          const int64_t d = widths[a];
          const float* src = feats[a] + (i0 + r) * d;
          for (int j = 0; j < d; ++j, ++c) x[r * F + c] = r < rows ? src[j] : 0.f;
        }
      }
      DenseTile<HV>(x, F, w0, b0, acc);
    }
    for (int layer = 0; layer < s.hidden_layers - 1; ++layer) {
      for (int r = 0; r < kRows; ++r)
        for (int v = 0; v < HV; ++v)
          *reinterpret_cast<v16*>(h + r * H + 16 * v) = relu(acc[r][v]);
      const float* w = wh + layer * (H * H + H);
      DenseTile<HV>(h, H, w, w + H * H, acc);
    }
    // The output layer: O dot products per entry, (entry r, output o) -> t[r * O + o],
    // summed 16 at a time.
    const int products = kRows * O;
    for (int p0 = 0; p0 < products; p0 += 16) {
      v16 t[16];
      for (int i = 0; i < 16; ++i) {
        const int p = p0 + i, r = p / O, o = p % O;
        t[i] = v16{};
        if (p < products)
          for (int v = 0; v < HV; ++v) t[i] += relu(acc[r][v]) * wl_cols[o][v];
      }
      sink(i0, rows, p0, SumEach(t) + bl_lanes[p0 / 16]);
    }
  }
}

// The MLP's outputs of one lane as rows of out ([n, O]).
template <int HV>
void RunLane(const Shapes& s, const float* w0, const float* b0, const float* tail,
             const float* const* feats, const int64_t* widths, int num_arrays, float* out) {
  const int O = s.out;
  MlpTiles<HV>(s, w0, b0, tail, feats, widths, num_arrays,
               [out, O](int64_t i0, int rows, int p0, v16 sums) {
                 const int valid = std::min(16, rows * O - p0);
                 if (valid == 16) {
                   *reinterpret_cast<v16u*>(out + i0 * O + p0) = sums;
                 } else {
                   for (int i = 0; i < valid; ++i) out[i0 * O + p0 + i] = sums[i];
                 }
               });
}

void RunLaneDispatch(const Shapes& s, const float* w0, const float* b0, const float* tail,
                     const float* const* feats, const int64_t* widths, int num_arrays,
                     float* out) {
  switch (s.hidden / 16) {
    case 1: return RunLane<1>(s, w0, b0, tail, feats, widths, num_arrays, out);
    case 2: return RunLane<2>(s, w0, b0, tail, feats, widths, num_arrays, out);
    case 3: return RunLane<3>(s, w0, b0, tail, feats, widths, num_arrays, out);
    case 4: return RunLane<4>(s, w0, b0, tail, feats, widths, num_arrays, out);
  }
}

// run(l) for every lane l in [0, lanes). Lanes are independent: on a multi-threaded device
// (one device using the whole CPU) the caller and the pool's threads take lanes from a
// shared counter. The state is shared with the scheduled tasks, which may start after the
// caller has returned. Only worth it for calls of tens of MFLOP (~0.5 ms): below, waking a
// second thread cost more than it saved (quadratic tasks: 7 MFLOP calls, 0.92x with
// threads).
template <typename Run>
void RunLanes(ffi::ThreadPool& pool, int64_t lanes, int64_t flops, Run& run,
              int min_log2 = 26) {
  const int64_t threads =
      flops < (int64_t{1} << min_log2) ? 0 : std::min<int64_t>(pool.num_threads(), lanes - 1);
  if (threads <= 0) {
    for (int64_t l = 0; l < lanes; ++l) run(l);
    return;
  }
  struct Shared {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, lanes, &run] {
    int64_t l;
    while ((l = shared->next.fetch_add(1)) < lanes) {
      run(l);
      if (shared->done.fetch_add(1) + 1 == lanes) {
        std::lock_guard<std::mutex> lock(shared->mu);
        shared->cv.notify_all();
      }
    }
  };
  for (int64_t t = 0; t < threads; ++t) pool.Schedule([work] { work(); });
  work();
  std::unique_lock<std::mutex> lock(shared->mu);
  shared->cv.wait(lock, [&] { return shared->done.load() == lanes; });
}

ffi::Error PerEntryMlpImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> kernel0,
                           ffi::Buffer<ffi::F32> bias0, ffi::Buffer<ffi::F32> tail,
                           ffi::RemainingArgs features, ffi::ResultBuffer<ffi::F32> out,
                           int64_t num_features, int64_t hidden, int64_t hidden_layers,
                           int64_t num_out) {
  Shapes s;
  s.features = static_cast<int>(num_features);
  s.hidden = static_cast<int>(hidden);
  s.hidden_layers = static_cast<int>(hidden_layers);
  s.out = static_cast<int>(num_out);
  // The Python wrapper checks these before it calls; this guards the memory accesses.
  if (s.features < 1 || s.features > kMaxFeatures || s.hidden % 16 != 0 || s.hidden < 16 ||
      s.hidden > 64 || s.hidden_layers < 1 || s.out < 1 || s.out > kMaxOut)
    return ffi::Error::InvalidArgument("per_entry_mlp: unsupported sizes");
  const int64_t H = s.hidden;
  s.tail_size = (s.hidden_layers - 1) * (H * H + H) + H * s.out + s.out;
  auto out_dims = out->dimensions();
  if (out_dims.size() < 2 || out_dims[out_dims.size() - 1] != s.out)
    return ffi::Error::InvalidArgument("per_entry_mlp: output must be [..., n, num_out]");
  s.entries = out_dims[out_dims.size() - 2];
  const int64_t lanes = kernel0.element_count() / (s.features * H);
  if (kernel0.element_count() != lanes * s.features * H ||
      bias0.element_count() != lanes * H || tail.element_count() != lanes * s.tail_size)
    return ffi::Error::InvalidArgument("per_entry_mlp: weight sizes mismatch");
  if (out->element_count() != lanes * s.entries * s.out)
    return ffi::Error::InvalidArgument("per_entry_mlp: output size mismatch");

  const int num_arrays = static_cast<int>(features.size());
  if (num_arrays < 1 || num_arrays > kMaxFeatureArrays)
    return ffi::Error::InvalidArgument("per_entry_mlp: 1 to 16 feature arrays");
  const float* data[kMaxFeatureArrays];
  int64_t widths[kMaxFeatureArrays];
  int64_t total = 0;
  for (int a = 0; a < num_arrays; ++a) {
    auto b = features.get<ffi::Buffer<ffi::F32>>(a);
    if (!b.has_value()) return ffi::Error::InvalidArgument("per_entry_mlp: features: f32");
    const int64_t per_lane = lanes * s.entries;
    if (per_lane == 0 || b->element_count() % per_lane != 0)
      return ffi::Error::InvalidArgument("per_entry_mlp: feature size mismatch");
    data[a] = b->typed_data();
    widths[a] = b->element_count() / per_lane;
    total += widths[a];
  }
  if (total != s.features)
    return ffi::Error::InvalidArgument("per_entry_mlp: feature widths do not sum to F");

  auto run = [&, w0 = kernel0.typed_data(), b0 = bias0.typed_data(),
              tl = tail.typed_data(), o = out->typed_data()](int64_t l) {
    const float* lane_feats[kMaxFeatureArrays];
    for (int a = 0; a < num_arrays; ++a) lane_feats[a] = data[a] + l * s.entries * widths[a];
    RunLaneDispatch(s, w0 + l * s.features * H, b0 + l * H, tl + l * s.tail_size, lane_feats,
                    widths, num_arrays, o + l * s.entries * s.out);
  };
  RunLanes(pool, lanes, 2 * lanes * s.entries * (s.features * H + s.tail_size), run);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------
// MLPLOpt's step for one tensor: the norms of its features, the MLP and the step.

constexpr int kMaxMomenta = 8;

// e^x for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by a degree-6 polynomial
// (Cephes' expf, ~1 ulp), 2^n through the exponent bits; above 88 as e^(x - ln2) * 2, so
// 2^n stays a normal float up to the overflow at ~88.72 (inf above, as XLA's exp). Below
// float's normal range (x < -87.3) it gives about FLT_MIN where XLA gives denormals, and
// 0 below -103.97; NaN gives NaN.
inline v16 Exp(v16 x) {
  const v16 zero = {};
  const v16 big = __builtin_convertvector(x > 88.0f, v16);  // -1 where x > 88, else 0
  const v16 xs = x + big * 0.693147180559945f;
  const v16 hi = xs < 88.3762626647949f ? xs : 88.3762626647949f;
  const v16 c = hi > -87.3365478515625f ? hi : -87.3365478515625f;  // NaN stays NaN
  v16 fx = c * 1.44269504088896341f + 0.5f;
  v16 n = __builtin_convertvector(__builtin_convertvector(fx, i16v), v16);
  n += __builtin_convertvector(n > fx, v16);  // floor: true is -1
  const v16 r = c - n * 0.693359375f + n * 2.12194440e-4f;
  const v16 z = r * r;
  v16 y = 1.9875691500e-4f * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  const i16v bits = (__builtin_convertvector(n, i16v) + 127) << 23;
  y = y * reinterpret_cast<const v16&>(bits) * (1.0f - big);  // 2^n; twice that above 88
  y = x > 88.72283935546875f ? zero + __builtin_inff() : y;
  return x < -103.972076416015625f ? zero : y;
}

// The sums of squares over one lane's tensor of n entries of g (sq[0]), p (sq[1]) and each
// momentum m_k (sq[2 + k]; m [n, K] row-major). A block of 16 entries holds 16 K momenta,
// K vectors; float q = 16 j + l of the block is momentum q % K.
template <int K>
void SumsOfSquares(int64_t n, const float* g, const float* p, const float* m, float* sq) {
  v16 acc[K], acc_g = {}, acc_p = {};
  for (int j = 0; j < K; ++j) acc[j] = v16{};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const v16 gv = load(g + i), pv = load(p + i);
    acc_g += gv * gv;
    acc_p += pv * pv;
    for (int j = 0; j < K; ++j) {
      const v16 mv = load(m + K * i + 16 * j);
      acc[j] += mv * mv;
    }
  }
  for (int k = 0; k < 2 + K; ++k) sq[k] = 0.0f;
  for (int l = 0; l < 16; ++l) {
    sq[0] += acc_g[l];
    sq[1] += acc_p[l];
    for (int j = 0; j < K; ++j) sq[2 + (16 * j + l) % K] += acc[j][l];
  }
  for (; i < n; ++i) {
    sq[0] += g[i] * g[i];
    sq[1] += p[i] * p[i];
    for (int k = 0; k < K; ++k) sq[2 + k] += m[K * i + k] * m[K * i + k];
  }
}

void SumsOfSquaresDispatch(int K, int64_t n, const float* g, const float* p, const float* m,
                           float* sq) {
  switch (K) {
#define SPMD_LOPT_MOMENTA_CASE(k) \
  case k: return SumsOfSquares<k>(n, g, p, m, sq);
    SPMD_LOPT_MOMENTA_CASE(1) SPMD_LOPT_MOMENTA_CASE(2) SPMD_LOPT_MOMENTA_CASE(3)
    SPMD_LOPT_MOMENTA_CASE(4) SPMD_LOPT_MOMENTA_CASE(5) SPMD_LOPT_MOMENTA_CASE(6)
    SPMD_LOPT_MOMENTA_CASE(7) SPMD_LOPT_MOMENTA_CASE(8)
#undef SPMD_LOPT_MOMENTA_CASE
  }
}

struct StepConstants {
  int momenta;
  float exp_mult, step_mult;
};

// One lane's tensor: the sums of squares, the first layer's kernel scaled by the norms
// (rsqrt(1e-5 + mean(x^2)) per feature row), then the MLP on [g, p, m] read in place and
// step = d exp(s exp_mult) step_mult from its two outputs (d, s).
template <int HV>
void MlpLoptStepLane(const Shapes& s, const StepConstants& c, const float* tensor_kernel,
                     const float* step_bias, const float* tail, const float* g,
                     const float* p, const float* m, float* step) {
  constexpr int H = HV * 16;
  const int64_t n = s.entries;
  const int F = 2 + c.momenta;
  float sq[2 + kMaxMomenta];
  SumsOfSquaresDispatch(c.momenta, n, g, p, m, sq);
  alignas(64) float w0[(2 + kMaxMomenta) * H];
  for (int a = 0; a < F; ++a) {
    const float scale = 1.0f / std::sqrt(1e-5f + sq[a] / static_cast<float>(n));
    for (int h = 0; h < H; ++h) w0[a * H + h] = scale * tensor_kernel[a * H + h];
  }
  const float* feats[3] = {g, p, m};
  const int64_t widths[3] = {1, 1, c.momenta};
  // Lane q of the output sums is output q % 2 of the tile's entry q / 2 (kRows * 2 = 16).
  const i16v magnitude_of = {1, 1, 3, 3, 5, 5, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15};
  const float exp_mult = c.exp_mult, step_mult = c.step_mult;
  MlpTiles<HV>(s, w0, step_bias, tail, feats, widths, 3,
               [&](int64_t i0, int rows, int, v16 sums) {
                 const v16 scale = __builtin_shuffle(Exp(sums * exp_mult), magnitude_of);
                 const v16 steps = sums * scale * step_mult;
                 for (int r = 0; r < rows; ++r) step[i0 + r] = steps[2 * r];
               });
}

void MlpLoptStepDispatch(const Shapes& s, const StepConstants& c, const float* tensor_kernel,
                         const float* step_bias, const float* tail, const float* g,
                         const float* p, const float* m, float* step) {
  switch (s.hidden / 16) {
    case 1: return MlpLoptStepLane<1>(s, c, tensor_kernel, step_bias, tail, g, p, m, step);
    case 2: return MlpLoptStepLane<2>(s, c, tensor_kernel, step_bias, tail, g, p, m, step);
    case 3: return MlpLoptStepLane<3>(s, c, tensor_kernel, step_bias, tail, g, p, m, step);
    case 4: return MlpLoptStepLane<4>(s, c, tensor_kernel, step_bias, tail, g, p, m, step);
  }
}

constexpr int kMaxTensors = 64;

// MLPLOpt's steps for all T tensors of a model (lanes: tasks, perturbations): weights
// tensor_kernel [lanes, F, H], step_bias [lanes, H], tail [lanes, tail_size]; then
// (p_t [lanes, n_t], g_t [lanes, n_t], m_t [lanes, n_t, K]) for each tensor t; results
// step_t [lanes, n_t]. One call for the whole model: its lanes x T items (the biggest
// tensors' first) keep both threads of a device busy where one call per tensor left the
// small tensors' calls to one thread.
ffi::Error MlpLoptStepImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> tensor_kernel,
                           ffi::Buffer<ffi::F32> step_bias, ffi::Buffer<ffi::F32> tail,
                           ffi::RemainingArgs tensors, ffi::RemainingRets steps,
                           int64_t momenta, int64_t hidden, int64_t hidden_layers,
                           float exp_mult, float step_mult) {
  Shapes s;
  StepConstants c;
  c.momenta = static_cast<int>(momenta);
  c.exp_mult = exp_mult;
  c.step_mult = step_mult;
  s.features = 2 + c.momenta;
  s.hidden = static_cast<int>(hidden);
  s.hidden_layers = static_cast<int>(hidden_layers);
  s.out = 2;
  // The Python wrapper checks these before it calls; this guards the memory accesses.
  if (c.momenta < 1 || c.momenta > kMaxMomenta || s.hidden % 16 != 0 || s.hidden < 16 ||
      s.hidden > 64 || s.hidden_layers < 1)
    return ffi::Error::InvalidArgument("mlp_lopt_step: unsupported sizes");
  const int64_t H = s.hidden, F = s.features;
  s.tail_size = (s.hidden_layers - 1) * (H * H + H) + H * s.out + s.out;
  const int64_t lanes = tensor_kernel.element_count() / (F * H);
  if (lanes < 1 || tensor_kernel.element_count() != lanes * F * H ||
      step_bias.element_count() != lanes * H || tail.element_count() != lanes * s.tail_size)
    return ffi::Error::InvalidArgument("mlp_lopt_step: weight sizes mismatch");
  const int num = static_cast<int>(steps.size());
  if (num < 1 || num > kMaxTensors || tensors.size() != 3 * steps.size())
    return ffi::Error::InvalidArgument("mlp_lopt_step: 1 to 64 tensors, (p, g, m) each");
  struct Tensor {
    const float *p, *g, *m;
    float* step;
    int64_t entries;
  };
  Tensor ts[kMaxTensors];
  int64_t total = 0;
  for (int t = 0; t < num; ++t) {
    auto p = tensors.get<ffi::Buffer<ffi::F32>>(3 * t);
    auto g = tensors.get<ffi::Buffer<ffi::F32>>(3 * t + 1);
    auto m = tensors.get<ffi::Buffer<ffi::F32>>(3 * t + 2);
    auto st = steps.get<ffi::Buffer<ffi::F32>>(t);
    if (!p.has_value() || !g.has_value() || !m.has_value() || !st.has_value())
      return ffi::Error::InvalidArgument("mlp_lopt_step: tensors must be f32");
    const int64_t n = p->element_count() / lanes;
    if (n < 1 || p->element_count() != lanes * n || g->element_count() != lanes * n ||
        m->element_count() != lanes * n * c.momenta || (*st)->element_count() != lanes * n)
      return ffi::Error::InvalidArgument("mlp_lopt_step: tensor sizes mismatch");
    ts[t] = {p->typed_data(), g->typed_data(), m->typed_data(), (*st)->typed_data(), n};
    total += n;
  }
  // Items from the biggest tensor down, so the last items a thread takes are short.
  int order[kMaxTensors];
  for (int t = 0; t < num; ++t) order[t] = t;
  std::sort(order, order + num,
            [&](int a, int b) { return ts[a].entries > ts[b].entries; });
  auto run = [&, tk = tensor_kernel.typed_data(), sb = step_bias.typed_data(),
              tl = tail.typed_data()](int64_t item) {
    const Tensor& t = ts[order[item / lanes]];
    const int64_t l = item % lanes, e = l * t.entries;
    Shapes st = s;
    st.entries = t.entries;
    MlpLoptStepDispatch(st, c, tk + l * F * H, sb + l * H, tl + l * s.tail_size, t.g + e,
                        t.p + e, t.m + e * c.momenta, t.step + e);
  };
  RunLanes(pool, lanes * num, 2 * lanes * total * (F * H + s.tail_size), run, 24);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpmdLoptPerEntryMlp, PerEntryMlpImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_features")
                                  .Attr<int64_t>("hidden")
                                  .Attr<int64_t>("hidden_layers")
                                  .Attr<int64_t>("num_out"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(SpmdLoptMlpLoptStep, MlpLoptStepImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tensor_kernel
                                  .Arg<ffi::Buffer<ffi::F32>>()  // step_bias
                                  .Arg<ffi::Buffer<ffi::F32>>()  // tail
                                  .RemainingArgs()               // (p, g, m) per tensor
                                  .RemainingRets()               // step per tensor
                                  .Attr<int64_t>("momenta")
                                  .Attr<int64_t>("hidden")
                                  .Attr<int64_t>("hidden_layers")
                                  .Attr<float>("exp_mult")
                                  .Attr<float>("step_mult"));
