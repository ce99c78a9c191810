// The steady-state token of favor.ops.local.fused.fused_step in one call (CPU): the same
// arithmetic, with every loop over the ring, the values and the far state written out so
// that each byte of the layer's state is read once per token and no op is dispatched per
// term. A decoding token's layer runs between weight matrices that evict the caches, and
// there each dispatched op and each Python line costs several microseconds: the Python step
// spends ~0.45 ms per SmolLM2 layer where its state's ~1.3 MB need ~0.13 ms of memory
// bandwidth.
//
// Layout and names are fused.py's (_Scratch, LeanState); the Python side packs the
// arguments once per scratch and state. Sums run in another order than fused.py's GEMMs:
// tests/ops/local/test_native.py holds both to each other (float64 1e-12, float32
// 1e-5) and fused_step's tests hold the pair to the exact_step reference.

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define FAVOR_AVX2 1
#endif
#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

constexpr double kLog2e = 1.4426950408889634;
constexpr double kLn2 = 0.6931471805599453;

// The rows a loop reads next, requested kAheadRows rows ahead (~4 KB for 64-dim heads): the
// hardware's stream prefetcher stops at each 4 KB page, and the step's state (~1.4 MB per
// SmolLM2 layer) comes from memory every token (the weights between two tokens evict it).
// 8, 16 and 32 rows measured alike in a model; 16 it is
constexpr int64_t kAheadRows = 16;

inline void prefetch_row(const void* p, int64_t bytes) {
#if defined(__GNUC__)
  const char* c = static_cast<const char*>(p);
  for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(c + o, 0, 3);
#endif
}

// dot(a, b) over n entries
template <typename T>
inline T dot(const T* a, const T* b, int64_t n) {
  T s = 0;
  for (int64_t d = 0; d < n; ++d) s += a[d] * b[d];
  return s;
}

#ifdef FAVOR_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
  return _mm_cvtss_f32(lo);
}
#endif

// out[c] = 2^x[c] for c < n. AVX2: 2^round(x) times a degree-7 Taylor polynomial of 2^f on
// |f| <= 1/2 (relative error < 1e-8, below float32's round-off); below -127 it gives 0 (the
// reference's denormals, < 1e-38 against weights of at least 1), NaN stays NaN; float64 and
// the tail: std::exp2
template <typename T>
inline void exp2_rows(const T* x, int64_t n, T* out) {
  for (int64_t c = 0; c < n; ++c) out[c] = std::exp2(x[c]);
}

#ifdef FAVOR_AVX2
inline __m256 exp2_avx(__m256 x) {
  const __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
  __m256 y = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(128.0f)), _mm256_set1_ps(-127.0f));
  const __m256 i = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(y, i), _mm256_set1_ps(0.6931471805599453f));  // f ln 2
  __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 720.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 120.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 24.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f / 6.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(i), _mm256_set1_epi32(127)), 23);
  return _mm256_blendv_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), x, nan);
}

template <>
inline void exp2_rows<float>(const float* x, int64_t n, float* out) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) _mm256_storeu_ps(out + c, exp2_avx(_mm256_loadu_ps(x + c)));
  for (; c < n; ++c) out[c] = std::exp2(x[c]);
}
#endif

// s_r (M) (+)= x_r (rows entries) times proj (rows, M) for R rows at once, 8 columns at a
// time held in registers: each proj row is loaded once for the R rows
template <typename T, int R>
void rows_times_proj(const T* const* x, int64_t rows, const T* proj, int64_t M, T* const* s, bool accumulate) {
  int64_t m0 = 0;
  for (; m0 + 8 <= M; m0 += 8) {
    T acc[R][8];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 8; ++c) acc[r][c] = accumulate ? s[r][m0 + c] : T(0);
    for (int64_t d = 0; d < rows; ++d) {
      const T* pd = proj + d * M + m0;
      for (int r = 0; r < R; ++r) {
        const T xr = x[r][d];
        for (int c = 0; c < 8; ++c) acc[r][c] += xr * pd[c];
      }
    }
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < 8; ++c) s[r][m0 + c] = acc[r][c];
  }
  for (int r = 0; r < R; ++r)
    for (int64_t m = m0; m < M; ++m) {
      T a = accumulate ? s[r][m] : T(0);
      for (int64_t d = 0; d < rows; ++d) a += x[r][d] * proj[d * M + m];
      s[r][m] = a;
    }
}

#ifdef FAVOR_AVX2
// float: 16 columns of R rows in 2 R registers, each proj row's 16 entries loaded once
template <int R>
void rows_times_proj_avx(const float* const* x, int64_t rows, const float* proj, int64_t M, float* const* s,
                         bool accumulate) {
  int64_t m0 = 0;
  for (; m0 + 16 <= M; m0 += 16) {
    __m256 lo[R], hi[R];
    for (int r = 0; r < R; ++r) {
      lo[r] = accumulate ? _mm256_loadu_ps(s[r] + m0) : _mm256_setzero_ps();
      hi[r] = accumulate ? _mm256_loadu_ps(s[r] + m0 + 8) : _mm256_setzero_ps();
    }
    for (int64_t d = 0; d < rows; ++d) {
      if (m0 == 0 && d + 4 < rows) prefetch_row(proj + (d + 4) * M, M * sizeof(float));
      const __m256 p0 = _mm256_loadu_ps(proj + d * M + m0), p1 = _mm256_loadu_ps(proj + d * M + m0 + 8);
      for (int r = 0; r < R; ++r) {
        const __m256 xr = _mm256_broadcast_ss(x[r] + d);
        lo[r] = _mm256_fmadd_ps(xr, p0, lo[r]);
        hi[r] = _mm256_fmadd_ps(xr, p1, hi[r]);
      }
    }
    for (int r = 0; r < R; ++r) {
      _mm256_storeu_ps(s[r] + m0, lo[r]);
      _mm256_storeu_ps(s[r] + m0 + 8, hi[r]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int64_t m = m0; m < M; ++m) {
      float a = accumulate ? s[r][m] : 0.0f;
      for (int64_t d = 0; d < rows; ++d) a += x[r][d] * proj[d * M + m];
      s[r][m] = a;
    }
}
#endif

template <typename T>
void many_times_proj(const T* const* x, int64_t count, int64_t rows, const T* proj, int64_t M, T* const* s,
                     bool accumulate) {
#ifdef FAVOR_AVX2
  if constexpr (std::is_same_v<T, float>) {
    for (int64_t r0 = 0; r0 < count; r0 += 4) {
      switch (std::min<int64_t>(count - r0, 4)) {
        case 4: rows_times_proj_avx<4>(x + r0, rows, proj, M, s + r0, accumulate); break;
        case 3: rows_times_proj_avx<3>(x + r0, rows, proj, M, s + r0, accumulate); break;
        case 2: rows_times_proj_avx<2>(x + r0, rows, proj, M, s + r0, accumulate); break;
        default: rows_times_proj_avx<1>(x + r0, rows, proj, M, s + r0, accumulate);
      }
    }
    return;
  }
#endif
  for (int64_t r0 = 0; r0 < count; r0 += 4) {
    switch (std::min<int64_t>(count - r0, 4)) {
      case 4: rows_times_proj<T, 4>(x + r0, rows, proj, M, s + r0, accumulate); break;
      case 3: rows_times_proj<T, 3>(x + r0, rows, proj, M, s + r0, accumulate); break;
      case 2: rows_times_proj<T, 2>(x + r0, rows, proj, M, s + r0, accumulate); break;
      default: rows_times_proj<T, 1>(x + r0, rows, proj, M, s + r0, accumulate);
    }
  }
}

// near[g * nstride + j] = off[g] + alpha * q_g . k_j for G query rows q (G, D) and n keys
// k (n, D): each key row read once for the G heads (the ring is the step's largest read)
template <typename T>
void near_logits(const T* q, int64_t qstride, const T* k, int64_t n, int64_t D, int64_t G, const T* off, T alpha,
                 T* near, int64_t nstride) {
  for (int64_t j = 0; j < n; ++j) {
    const T* kj = k + j * D;
    for (int64_t g = 0; g < G; ++g) near[g * nstride + j] = off[g] + alpha * dot(q + g * qstride, kj, D);
  }
}

#ifdef FAVOR_AVX2
template <>
void near_logits<float>(const float* q, int64_t qstride, const float* k, int64_t n, int64_t D, int64_t G,
                        const float* off, float alpha, float* near, int64_t nstride) {
  if (D % 8 != 0 || G > 16) {
    for (int64_t j = 0; j < n; ++j)
      for (int64_t g = 0; g < G; ++g) near[g * nstride + j] = off[g] + alpha * dot(q + g * qstride, k + j * D, D);
    return;
  }
  for (int64_t j = 0; j < n; ++j) {
    const float* kj = k + j * D;
    if (j + kAheadRows < n) prefetch_row(kj + kAheadRows * D, D * sizeof(float));
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * qstride;
      __m256 acc = _mm256_setzero_ps();
      for (int64_t d = 0; d < D; d += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + d), _mm256_loadu_ps(kj + d), acc);
      near[g * nstride + j] = off[g] + alpha * hsum(acc);
    }
  }
}
#endif

// out[:w] (+)= sum_r x[r] * m[r, :w] (rows of m ``stride`` apart): a vector times a
// row-major matrix, written as axpys so that the compiler vectorises over the columns
template <typename T>
inline void vec_mat(const T* x, int64_t rows, const T* m, int64_t stride, int64_t w, T* out, bool accumulate) {
  if (!accumulate)
    for (int64_t c = 0; c < w; ++c) out[c] = 0;
  const int64_t ahead = std::max<int64_t>(1, 4096 / int64_t(stride * sizeof(T)));
  for (int64_t r = 0; r < rows; ++r) {
    if (r + ahead < rows) prefetch_row(m + (r + ahead) * stride, w * sizeof(T));
    const T xr = x[r];
    const T* mr = m + r * stride;
    for (int64_t c = 0; c < w; ++c) out[c] += xr * mr[c];
  }
}

// acc[g W + c] = sum_r w[g wstride + r] v[r W + c] for G heads' weights over the same rows
// (the step's largest read, the ring's and pending values): each block of 4 vectors of
// columns of all G heads held in registers while the rows stream past, summed over r in
// order as the plain loop in weighted_rows. Written with GCC/Clang vector types: left to
// itself the compiler turns the loops around and keeps the sums in memory (3x slower).
#if defined(__GNUC__)
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int N = 32 / sizeof(T);
  static inline type load(const T* p) {
    type x;
    std::memcpy(&x, p, sizeof(x));
    return x;
  }
  static inline void store(T* p, type x) { std::memcpy(p, &x, sizeof(x)); }
};

template <typename T, int G>
void weighted_rows_blocked(const T* w, int64_t wstride, const T* v, int64_t rows, int64_t W, T* acc) {
  using V = Vec<T>;
  using Y = typename V::type;
  constexpr int NV = G <= 3 ? 4 : 2;  // registers: G NV sums, NV rows, one weight
  constexpr int CB = NV * V::N;
  int64_t c0 = 0;
  for (; c0 + CB <= W; c0 += CB) {
    Y a[G][NV];
    for (int g = 0; g < G; ++g)
      for (int k = 0; k < NV; ++k) a[g][k] = Y{};
    const T* vr = v + c0;
    for (int64_t r = 0; r < rows; ++r, vr += W) {
      if (c0 == 0 && r + kAheadRows < rows) prefetch_row(vr + kAheadRows * W, W * sizeof(T));
      Y x[NV];
      for (int k = 0; k < NV; ++k) x[k] = V::load(vr + k * V::N);
      for (int g = 0; g < G; ++g) {
        const T wg = w[g * wstride + r];
        for (int k = 0; k < NV; ++k) a[g][k] += wg * x[k];
      }
    }
    for (int g = 0; g < G; ++g)
      for (int k = 0; k < NV; ++k) V::store(acc + g * W + c0 + k * V::N, a[g][k]);
  }
  for (int64_t c = c0; c < W; ++c) {
    T a[G] = {};
    for (int64_t r = 0; r < rows; ++r)
      for (int g = 0; g < G; ++g) a[g] += w[g * wstride + r] * v[r * W + c];
    for (int g = 0; g < G; ++g) acc[g * W + c] = a[g];
  }
}
#endif

template <typename T>
void weighted_rows(const T* w, int64_t wstride, int64_t G, const T* v, int64_t rows, int64_t W, T* acc) {
#if defined(__GNUC__)
  switch (G) {
    case 1: return weighted_rows_blocked<T, 1>(w, wstride, v, rows, W, acc);
    case 2: return weighted_rows_blocked<T, 2>(w, wstride, v, rows, W, acc);
    case 3: return weighted_rows_blocked<T, 3>(w, wstride, v, rows, W, acc);
    case 4: return weighted_rows_blocked<T, 4>(w, wstride, v, rows, W, acc);
    default: break;
  }
#endif
  for (int64_t c = 0; c < G * W; ++c) acc[c] = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const T* vr = v + r * W;
    for (int64_t g = 0; g < G; ++g) {
      const T wgt = w[g * wstride + r];
      T* ag = acc + g * W;
      for (int64_t c = 0; c < W; ++c) ag[c] += wgt * vr[c];
    }
  }
}

template <typename T>
inline const T* ptr(const at::Tensor& t) {
  return t.numel() ? t.data_ptr<T>() : nullptr;
}

// Subnormal floats flushed to zero (and read as zero) for the step's duration: the far
// state and the weights of keys far below the running max reach the subnormal range, where
// x86 arithmetic slows down many times; what is lost is below 2^-126 against a row whose
// largest weight is 2^HEADROOM (row_features)
struct FlushSubnormals {
#if defined(__SSE__)
  unsigned int saved = _mm_getcsr();
  FlushSubnormals() { _mm_setcsr(saved | 0x8040); }  // FTZ | DAZ
  ~FlushSubnormals() { _mm_setcsr(saved); }
#endif
};

inline at::Tensor need(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_contiguous(), "fused_native: ", name, " must be contiguous");
  return t;
}

// One layer's compiled step: fused.py's constants (_Scratch) and state (LeanState) held
// once, so that a token passes only its query, key, value and two slot numbers
class Stepper {
 public:
  Stepper(const std::vector<at::Tensor>& consts, const std::vector<at::Tensor>& state, int64_t batch, bool shared,
          bool simple, const std::vector<double>& f)
      : batch_(batch), shared_(shared), simple_(simple), f_(f) {
    TORCH_CHECK(consts.size() == 8 && state.size() == 9 && f.size() == 5,
                "fused_native.Stepper: 8 constants, 9 state tensors, 5 scalars");
    const char* cn[] = {"proj", "mq", "mk", "bk_map", "gain", "rest", "bias_s", "rows"};
    for (int c = 0; c < 8; ++c) consts_.push_back(need(consts[c], cn[c]));
    const char* sn[] = {"k", "vals", "kvz", "pend", "ck2", "qoff", "c", "ck_base", "qoff_base"};
    for (int c = 0; c < 9; ++c) state_.push_back(c == 2 ? state[c] : need(state[c], sn[c]));
    const at::Tensor& kvz = state_[2];
    TORCH_CHECK(kvz.stride(2) == 1 && kvz.stride(1) == kvz.size(2), "fused_native: kvz rows must be contiguous");
  }

  // A token before the ring is full (fused._unwrapped): no key leaves and the far state is
  // empty, so softmax (base 2) over the slots' logits root^2 q.k; dead slots hold a live key
  // and a zero value row. The new key and value take slot i.
  at::Tensor unwrapped(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t i) {
    check(query, key, value);
    if (query.scalar_type() == at::kFloat) {
      FlushSubnormals flush;
      return run_unwrapped<float>(query, key, value, i);
    }
    return run_unwrapped<double>(query, key, value, i);
  }

  at::Tensor step(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t i, int64_t j) {
    check(query, key, value);
    if (query.scalar_type() == at::kFloat) {
      FlushSubnormals flush;
      return run<float>(query, key, value, i, j);
    }
    return run<double>(query, key, value, i, j);
  }

 private:
  void check(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value) const {
    TORCH_CHECK(query.scalar_type() == state_[0].scalar_type() && key.scalar_type() == query.scalar_type() &&
                    value.scalar_type() == query.scalar_type(),
                "fused_native: query, key and value in the state's dtype");
    TORCH_CHECK(query.stride(3) == 1 && key.stride(3) == 1 && value.stride(3) == 1,
                "fused_native: query, key and value rows must be contiguous");
    TORCH_CHECK(query.scalar_type() == at::kFloat || query.scalar_type() == at::kDouble,
                "fused_native: float32 or float64 only");
  }

  template <typename T>
  at::Tensor run_unwrapped(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t i) {
    const at::Tensor &k_t = state_[0], &vals_t = state_[1], &pend_t = state_[3], &rows_t = consts_[7];
    const int64_t BK = k_t.size(0), n = k_t.size(1), D = k_t.size(2);
    const int64_t P = pend_t.size(2), Dv = vals_t.size(2) - 1, W = Dv + 1, vrows = vals_t.size(1);
    const int64_t H = query.size(1), K = BK / batch_, G = H / K, width = rows_t.size(1);
    const T a_near = f_[3];
    T* rows = rows_t.data_ptr<T>();
    T* kbuf = k_t.data_ptr<T>();
    T* vals = vals_t.data_ptr<T>();
    const T* qd = query.data_ptr<T>();
    const T* kd = key.data_ptr<T>();
    const T* vd = value.data_ptr<T>();
    if (work_.size() * sizeof(double) < (G * W + G) * sizeof(T)) work_.resize(G * W + G);
    T* acc = reinterpret_cast<T*>(work_.data());
    T* zero = acc + G * W;
    for (int64_t g = 0; g < G; ++g) zero[g] = 0;
    at::Tensor out = at::empty({batch_, H, 1, Dv}, query.options());
    T* od = out.data_ptr<T>();
    for (int64_t bk = 0; bk < BK; ++bk) {
      const int64_t b = bk / K, kh = bk % K;
      T* vrow = vals + bk * vrows * W + P * W;  // the slots' value rows
      const T* kn = kd + b * key.stride(0) + kh * key.stride(1);
      const T* vn = vd + b * value.stride(0) + kh * value.stride(1);
      for (int64_t c = 0; c < D; ++c) kbuf[(bk * n + i) * D + c] = kn[c];
      for (int64_t c = 0; c < Dv; ++c) vrow[i * W + c] = vn[c];
      vrow[i * W + Dv] = 1;
      const T* qg = qd + b * query.stride(0) + kh * G * query.stride(1);
      T* near = rows + bk * G * width + P;
      near_logits<T>(qg, query.stride(1), kbuf + bk * n * D, n, D, G, zero, a_near, near, width);
      for (int64_t g = 0; g < G; ++g) {
        T* live = near + g * width;
        T mx = -INFINITY;
        for (int64_t c = 0; c < n; ++c) mx = std::max(mx, live[c]);
        for (int64_t c = 0; c < n; ++c) live[c] -= mx;
        exp2_rows(live, n, live);
      }
      weighted_rows<T>(near, width, G, vrow, n, W, acc);
      for (int64_t g = 0; g < G; ++g) {
        const T* ag = acc + g * W;
        for (int64_t c = 0; c < Dv; ++c) od[(bk * G + g) * Dv + c] = ag[c] / ag[Dv];
      }
    }
    return out;
  }

  int64_t batch_;
  bool shared_, simple_;
  std::vector<double> f_;
  std::vector<at::Tensor> consts_, state_;
  std::vector<double> work_;  // x rows, offsets, accumulators (T-sized slots)

  // x (D entries) -> [x g, e] in place (D + 1 entries with an e column) and s (M) set to
  // the row's feature bias; whether s then accumulates (a bias) or is overwritten
  template <typename T>
  bool prepare(T* x, int64_t row, int64_t D, int64_t M, T* s) const {
    const at::Tensor &gain = consts_[4], &rest = consts_[5], &bias = consts_[6];
    if (rest.numel()) {
      const T* r = rest.data_ptr<T>() + row * D;
      T e2 = 0;
      for (int64_t c = 0; c < D; ++c) e2 += (x[c] * r[c]) * (x[c] * r[c]);
      x[D] = std::sqrt(std::max(e2, T(1e-20)));
    }
    if (gain.numel()) {
      const T* g = gain.data_ptr<T>() + row * D;
      for (int64_t c = 0; c < D; ++c) x[c] *= g[c];
    }
    if (!bias.numel()) return false;
    const T* b = bias.data_ptr<T>() + row * M;
    for (int64_t m = 0; m < M; ++m) s[m] = b[m];
    return true;
  }

  template <typename T>
  at::Tensor run(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value, int64_t i, int64_t j) {
    const T root = f_[0], a_nk = f_[1], a_off = f_[2], a_near = f_[3], headroom = f_[4];
    const at::Tensor &proj_t = consts_[0], &mq_t = consts_[1], &mk_t = consts_[2], &rows_t = consts_[7];
    const at::Tensor &k_t = state_[0], &vals_t = state_[1], &kvz_t = state_[2], &pend_t = state_[3];
    const int64_t BK = k_t.size(0), n = k_t.size(1), D = k_t.size(2);
    const int64_t P = pend_t.size(2), M = pend_t.size(1), Dv = vals_t.size(2) - 1, W = Dv + 1;
    const int64_t H = query.size(1), K = BK / batch_, G = H / K, BH = batch_ * H;
    const int64_t gk = shared_ ? 1 : G;
    const int64_t width = rows_t.size(1);  // P + n + M
    const int64_t vrows = vals_t.size(1);
    const int64_t prow = proj_t.size(0);  // D, or D + 1 with an e column
    const bool bias = consts_[6].numel() > 0, has_mk = mk_t.numel() > 0;
    T* rows = rows_t.data_ptr<T>();
    T* kbuf = k_t.data_ptr<T>();
    T* vals = vals_t.data_ptr<T>();
    T* pend = pend_t.data_ptr<T>();
    T* kvz = kvz_t.data_ptr<T>();
    const T* proj = proj_t.data_ptr<T>();
    const int64_t kvz_stride = kvz_t.stride(0);
    const T* ck2 = state_[4].data_ptr<T>();
    const T* qoff = state_[5].data_ptr<T>();
    const T* qd = query.data_ptr<T>();
    const T* kd = key.data_ptr<T>();
    const T* vd = value.data_ptr<T>();
    const int64_t qs0 = query.stride(0), qs1 = query.stride(1), ks0 = key.stride(0), ks1 = key.stride(1);
    const int64_t vs0 = value.stride(0), vs1 = value.stride(1);
    // work: G rows of D + 1 (query or key inputs), G offsets, G accumulators of W, 2 G pointers
    const int64_t need_t = G * (D + 1) + G + G * W + M + 2 * BH;
    if (work_.size() * sizeof(double) < need_t * sizeof(T)) work_.resize(need_t);
    T* xs = reinterpret_cast<T*>(work_.data());
    T* off = xs + G * (D + 1);
    T* acc = off + G;
    T* tmp = acc + G * W;
    std::vector<const T*> xp(G);
    std::vector<T*> sp(G);

    // 1. the leaving keys' features s + log2(e) (ck - c - |x|^2 / 2), in the key rows of
    // ``rows`` (their far columns); the far scale grows where one exceeds 2^HEADROOM (below);
    // a NaN anywhere: nothing is changed and the caller takes fused.py's ops
    const int64_t F = shared_ ? BK : BH;
    T* nrm = tmp + M;  // per key row: its -|x|^2 / 2 (or root^2's: a_nk |k|^2), natural log
    T* rmax = nrm + F;  // per key row: its raw features' max
    bool nan = false, grow = false;
    TORCH_CHECK(state_[6].is_contiguous() && state_[6].numel() == F, "fused_native: c must hold one scale per far row");
    for (int64_t bk = 0; bk < BK; ++bk) {
      const T* kr = kbuf + (bk * n + i) * D;
      bool accumulate = false;
      for (int64_t r = 0; r < gk; ++r) {
        const int64_t fr = shared_ ? bk : bk * G + r;
        T* s = rows + (BH + fr) * width + P + n;
        sp[r] = s;
        if (simple_) {
          xp[r] = kr;
          nrm[fr] = a_nk * dot(kr, kr, D);
          continue;
        }
        T* x = xs + r * (D + 1);
        xp[r] = x;
        if (has_mk) {
          const int64_t wd = gk * (D + 1);
          const T* bmap = consts_[3].data_ptr<T>() + bk * wd + r * (D + 1);
          for (int64_t c = 0; c < D; ++c) x[c] = bmap[c];
          vec_mat(kr, D, mk_t.data_ptr<T>() + bk * D * wd + r * (D + 1), wd, D, x, true);
        } else {
          for (int64_t c = 0; c < D; ++c) x[c] = kr[c] * root;
        }
        nrm[fr] = -T(0.5) * dot(x, x, D);
        accumulate = prepare(x, BH + fr, D, M, s);
      }
      many_times_proj<T>(xp.data(), gk, prow, proj, M, sp.data(), accumulate);
      for (int64_t r = 0; r < gk; ++r) {  // the raw features' max, before the weight
        const int64_t fr = shared_ ? bk : bk * G + r;
        const T* s = sp[r];
        T top = -INFINITY;
        for (int64_t m = 0; m < M; ++m) {
          top = std::max(top, s[m]);
          nan |= s[m] != s[m];
        }
        rmax[fr] = top;
        // s + log2(e) (ck - c - |x|^2 / 2) above 2^HEADROOM (c = -inf, an empty far state: inf)
        grow |= top + T(kLog2e) * (ck2[fr * 2 + 1] + nrm[fr]) > headroom;
      }
    }
    if (nan) return at::Tensor();  // the Python path decides
    // the far scale c follows a key row whose log scale l exceeds it (fused._grow): kvz and
    // the pending keys times exp(c - l), c = l, and the constants that carry c
    T* ck2w = state_[4].data_ptr<T>();
    if (grow) {
      T* cbuf = state_[6].data_ptr<T>();
      T* qoffw = state_[5].data_ptr<T>();
      const int64_t qw = state_[5].size(-1);
      const T* ck_base = state_[7].data_ptr<T>();
      const T* qoff_base = state_[8].data_ptr<T>();
      TORCH_CHECK(state_[7].numel() == 2 * F && state_[8].numel() == state_[5].numel(),
                  "fused_native: the constants of c: [ck - HEADROOM ln 2, ck] per far row, the query offsets");
      for (int64_t fr = 0; fr < F; ++fr) {
        if (!(rmax[fr] + T(kLog2e) * (ck2w[fr * 2 + 1] + nrm[fr]) > headroom)) continue;
        const T l = ck2w[fr * 2] + nrm[fr] + rmax[fr] * T(kLn2);  // the row's log scale (row_features)
        const T c_old = cbuf[fr], factor = std::exp(c_old - l);
        T* kz = kvz + fr * kvz_stride;
        for (int64_t c = 0; c < M * W; ++c) kz[c] *= factor;
        T* pf = pend + fr * M * P;
        for (int64_t c = 0; c < M * P; ++c) pf[c] *= factor;
        cbuf[fr] = l;
        // as LeanState.retarget: ck - c, and the query's offset constant less c log2(e)
        ck2w[fr * 2 + 1] = ck_base[fr * 2 + 1] - l;
        const T shift = T(kLog2e) * (std::isfinite(l) ? l : T(0));
        for (int64_t g = 0; g < (shared_ ? G : 1); ++g) {
          const int64_t at = ((shared_ ? fr * G + g : fr) + 1) * qw - 1;
          qoffw[at] = qoff_base[at] - shift;
        }
      }
    }
    for (int64_t fr = 0; fr < F; ++fr) {  // s + log2(e) (ck - c - |x|^2 / 2)
      T* s = rows + (BH + fr) * width + P + n;
      const T add = T(kLog2e) * (ck2w[fr * 2 + 1] + nrm[fr]);
      for (int64_t m = 0; m < M; ++m) s[m] += add;
    }

    // 2. the leaving keys' weighted features to pending slot j, their value rows too; the
    // new key and value into slot i
    for (int64_t fr = 0; fr < F; ++fr) {
      exp2_rows(rows + (BH + fr) * width + P + n, M, tmp);
      T* pj = pend + fr * M * P + j;
      for (int64_t m = 0; m < M; ++m) pj[m * P] = tmp[m];
    }
    for (int64_t bk = 0; bk < BK; ++bk) {
      const int64_t b = bk / K, kh = bk % K;
      T* vrow = vals + bk * vrows * W;
      for (int64_t c = 0; c < W; ++c) vrow[j * W + c] = vrow[(P + i) * W + c];
      const T* kn = kd + b * ks0 + kh * ks1;
      const T* vn = vd + b * vs0 + kh * vs1;
      for (int64_t c = 0; c < D; ++c) kbuf[(bk * n + i) * D + c] = kn[c];
      for (int64_t c = 0; c < Dv; ++c) vrow[(P + i) * W + c] = vn[c];
    }

    // 3. each query head's row [pending | near logits + offset | far features], base 2,
    // less its max and HEADROOM, then 2^
    for (int64_t bk = 0; bk < BK; ++bk) {
      const int64_t b = bk / K, kh = bk % K;
      const T* qg = qd + b * qs0 + kh * G * qs1;
      bool accumulate = false;
      for (int64_t g = 0; g < G; ++g) {
        const int64_t bh = bk * G + g;
        const T* q = qg + g * qs1;
        T* s = rows + bh * width + P + n;
        sp[g] = s;
        if (simple_) {
          xp[g] = q;
          off[g] = qoff[bh] + a_off * dot(q, q, D);
          continue;
        }
        T* xr = xs + g * (D + 1);
        xp[g] = xr;
        if (mq_t.numel()) {  // x_q = [q A root, Cq - log2(e) root^2 q.c] + offset row
          for (int64_t c = 0; c <= D; ++c) xr[c] = qoff[bh * (D + 1) + c];
          vec_mat(q, D, mq_t.data_ptr<T>() + bh * D * (D + 1), D + 1, D + 1, xr, true);
          off[g] = xr[D] + T(0.5 * kLog2e) * dot(xr, xr, D);
        } else {
          for (int64_t c = 0; c < D; ++c) xr[c] = q[c] * root;
          off[g] = qoff[bh] + T(0.5 * kLog2e) * dot(xr, xr, D);
        }
        accumulate = prepare(xr, bh, D, M, s);
      }
      many_times_proj<T>(xp.data(), G, prow, proj, M, sp.data(), accumulate && !simple_);
      near_logits<T>(qg, qs1, kbuf + bk * n * D, n, D, G, off, a_near, rows + bk * G * width + P, width);
      for (int64_t g = 0; g < G; ++g) {
        T* live = rows + (bk * G + g) * width + P;
        T mx = -INFINITY;
        for (int64_t c = 0; c < n + M; ++c) mx = std::max(mx, live[c]);
        mx -= headroom;
        for (int64_t c = 0; c < n + M; ++c) live[c] -= mx;
        exp2_rows(live, n + M, live);
      }
    }

    // 4. the pending keys' weights (the query's far features against theirs), then
    // [pending | slots (| far state)] weights times their value rows; numerator / normaliser
    at::Tensor out = at::empty({batch_, H, 1, Dv}, query.options());
    T* od = out.data_ptr<T>();
    const int64_t through = shared_ ? P + n + M : P + n;
    for (int64_t bk = 0; bk < BK; ++bk) {
      for (int64_t g = 0; g < G; ++g) {
        const int64_t bh = bk * G + g, fr = shared_ ? bk : bh;
        T* row = rows + bh * width;
        vec_mat(row + P + n, M, pend + fr * M * P, P, P, row, false);
      }
      weighted_rows<T>(rows + bk * G * width, width, G, vals + bk * vrows * W, through, W, acc);
      for (int64_t g = 0; g < G; ++g) {
        const int64_t bh = bk * G + g;
        T* ag = acc + g * W;
        if (!shared_) vec_mat(rows + bh * width + P + n, M, kvz + bh * kvz_stride, W, W, ag, true);
        const T den = ag[Dv];
        for (int64_t c = 0; c < Dv; ++c) od[bh * Dv + c] = ag[c] / den;
      }
    }
    return out;
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<Stepper>(m, "Stepper")
      .def(pybind11::init<const std::vector<at::Tensor>&, const std::vector<at::Tensor>&, int64_t, bool, bool,
                          const std::vector<double>&>())
      .def("step", &Stepper::step, "fused_step's steady-state token, or None for a NaN in the leaving key's features")
      .def("unwrapped", &Stepper::unwrapped, "fused_step's token before the ring is full (fused._unwrapped)");
}
