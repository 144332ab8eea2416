// Fused float32 CPU kernels for the lean forward's small operations (see fused.py for why they exist).
// Each replaces a chain of 3-10 eager torch operations whose per-operation cost, not arithmetic, dominated a
// one-token step: an RMS norm cost ~60 us in eager torch on a 2-core VM and ~3 us here.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <tuple>
#include <vector>

namespace {

void check_float_contiguous(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, name, ": a float32 CPU tensor is needed");
  TORCH_CHECK(t.is_contiguous(), name, ": a contiguous tensor is needed");
}

// 16 floats as one value (GCC's vector extension: one AVX-512 register, two AVX2 ones, any instruction set)
constexpr int kLanes = 16;
typedef float Lanes16 __attribute__((vector_size(64)));
typedef int32_t Ints16 __attribute__((vector_size(64)));
typedef float Lanes8 __attribute__((vector_size(32)));
typedef int32_t Ints8 __attribute__((vector_size(32)));
typedef float Lanes4 __attribute__((vector_size(16)));

inline Lanes16 load16(const float* p) {
  Lanes16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// the first n (<= V's lanes) floats at p, zeros after them; a whole vector by a fixed-size copy (one load)
template <typename V>
inline V load_partial(const float* p, int64_t n) {
  V v = {};
  if (n == static_cast<int64_t>(sizeof v / sizeof(float)))
    std::memcpy(&v, p, sizeof v);
  else
    std::memcpy(&v, p, n * sizeof(float));
  return v;
}

// the first n (<= V's lanes) lanes of v to p
template <typename V>
inline void store_partial(float* p, const V& v, int64_t n) {
  if (n == static_cast<int64_t>(sizeof v / sizeof(float)))
    std::memcpy(p, &v, sizeof v);
  else
    std::memcpy(p, &v, n * sizeof(float));
}

inline Lanes16 load_partial16(const float* p, int64_t n) { return load_partial<Lanes16>(p, n); }
inline void store_partial16(float* p, const Lanes16& v, int64_t n) { store_partial(p, v, n); }

// exp(x) for x <= 0, 16 lanes at a time (std::exp does not vectorize without -ffast-math, which would change the
// whole process's float modes): 2^(x log2 e) as a power of two times the Taylor polynomial of 2^f for |f| <= 1/2.
// Relative error: ~1e-6 for x >= -20, up to 4e-6 at -87, from rounding x log2 e to float (the test checks it
// against torch.exp). Every caller feeds whole vectors (tails zero-padded): a lane's value never depends on
// where it sits.
template <typename V, typename I>  // V: Lanes16 or Lanes8, I: int32 lanes of the same count
inline V exp_nonpositive_lanes(V x) {
  const V t = (x > -87.0f ? x : V{} - 87.0f) * 1.44269504088896341f;
  const V y = t + 0.5f;
  V whole = __builtin_convertvector(__builtin_convertvector(y, I), V);  // toward zero
  whole = whole > y ? whole - 1.0f : whole;  // floor(y)
  const V f = t - whole;
  V p = V{} + 1.5403530393381606e-4f;
  p = p * f + 1.3333558146428443e-3f;
  p = p * f + 9.6181291076284772e-3f;
  p = p * f + 5.5504108664821580e-2f;
  p = p * f + 2.4022650695910071e-1f;
  p = p * f + 6.9314718055994531e-1f;
  p = p * f + 1.0f;
  const I bits = (__builtin_convertvector(whole, I) + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline Lanes16 exp_nonpositive(Lanes16 x) { return exp_nonpositive_lanes<Lanes16, Ints16>(x); }

inline void norm_row(const float* x, const float* w, float* out, int64_t h, float eps) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < h; ++i) sum += x[i] * x[i];
  const float scale = 1.0f / std::sqrt(sum / static_cast<float>(h) + eps);
#pragma omp simd
  for (int64_t i = 0; i < h; ++i) out[i] = x[i] * scale * w[i];
}

// x * rsqrt(mean(x^2) + eps) * weight over the last dimension
at::Tensor rms_norm(const at::Tensor& x_in, const at::Tensor& weight, double eps) {
  const at::Tensor x = x_in.contiguous();
  check_float_contiguous(x, "rms_norm x");
  check_float_contiguous(weight, "rms_norm weight");
  const int64_t h = x.size(-1), rows = x.numel() / h;
  TORCH_CHECK(weight.numel() == h, "rms_norm: weight size ", weight.numel(), " != hidden size ", h);
  at::Tensor out = at::empty_like(x);
  const float *px = x.data_ptr<float>(), *pw = weight.data_ptr<float>();
  float* po = out.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) norm_row(px + r * h, pw, po + r * h, h, static_cast<float>(eps));
  return out;
}

// (x + delta, rms_norm(x + delta)): a residual add and the norm that reads it
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x_in, const at::Tensor& delta_in,
                                                const at::Tensor& weight, double eps) {
  const at::Tensor x = x_in.contiguous(), delta = delta_in.contiguous();
  check_float_contiguous(x, "add_rms_norm x");
  check_float_contiguous(delta, "add_rms_norm delta");
  check_float_contiguous(weight, "add_rms_norm weight");
  TORCH_CHECK(x.sizes() == delta.sizes(), "add_rms_norm: x and delta differ in shape");
  const int64_t h = x.size(-1), rows = x.numel() / h;
  TORCH_CHECK(weight.numel() == h, "add_rms_norm: weight size ", weight.numel(), " != hidden size ", h);
  at::Tensor sum = at::empty_like(x), normed = at::empty_like(x);
  const float *px = x.data_ptr<float>(), *pd = delta.data_ptr<float>(), *pw = weight.data_ptr<float>();
  float *ps = sum.data_ptr<float>(), *pn = normed.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    float* s = ps + r * h;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) s[i] = px[r * h + i] + pd[r * h + i];
    norm_row(s, pw, pn + r * h, h, static_cast<float>(eps));
  }
  return {sum, normed};
}

// silu(gate) * up for gate_up = [..., gate | up]
at::Tensor silu_mul(const at::Tensor& gate_up_in) {
  const at::Tensor gate_up = gate_up_in.contiguous();
  check_float_contiguous(gate_up, "silu_mul gate_up");
  const int64_t width = gate_up.size(-1) / 2, rows = gate_up.numel() / (2 * width);
  std::vector<int64_t> shape(gate_up.sizes().begin(), gate_up.sizes().end());
  shape.back() = width;
  at::Tensor out = at::empty(shape, gate_up.options());
  const float* pg = gate_up.data_ptr<float>();
  float* po = out.data_ptr<float>();
  // element by element, so the vector width does not change a bit: AVX2 builds take 8 lanes, one register (16
  // lanes there compile to stack traffic, 4x slower)
#if defined(__AVX2__) && !defined(__AVX512F__)
  using V = Lanes8;
  using I = Ints8;
#else
  using V = Lanes16;
  using I = Ints16;
#endif
  constexpr int64_t lanes = sizeof(V) / sizeof(float);
  for (int64_t r = 0; r < rows; ++r) {
    const float *g = pg + 2 * r * width, *u = g + width;
    float* o = po + r * width;
    for (int64_t i = 0; i < width; i += lanes) {
      const int64_t count = std::min<int64_t>(lanes, width - i);
      const V gate = load_partial<V>(g + i, count), up = load_partial<V>(u + i, count);
      // the sigmoid through the exponential of -|gate| (at most 1)
      const V e = exp_nonpositive_lanes<V, I>(gate < 0.f ? gate : -gate);
      const V silu = gate * ((gate >= 0.f ? V{} + 1.0f : e) / (1.0f + e));
      store_partial(o + i, V(silu * up), count);
    }
  }
  return out;
}

// Rotate the queries and keys of qkv [1, n, (heads + 2 kv_heads) * d] (neox halves; signed_sin holds the
// rotation's sign, as LeanLayers keeps it), write the rotated keys and the values into one layer's caches
// [kv_heads, capacity, d] at slots start..start+n, and return the rotated queries [1, heads, n, d].
at::Tensor rope_write_kv(const at::Tensor& qkv_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                         at::Tensor k_cache, at::Tensor v_cache, int64_t start, int64_t heads, int64_t kv_heads) {
  const at::Tensor qkv = qkv_in.contiguous(), cos = cos_in.contiguous(), sin = sin_in.contiguous();
  check_float_contiguous(qkv, "rope_write_kv qkv");
  check_float_contiguous(cos, "rope_write_kv cos");
  check_float_contiguous(sin, "rope_write_kv sin");
  check_float_contiguous(k_cache, "rope_write_kv k_cache");
  check_float_contiguous(v_cache, "rope_write_kv v_cache");
  const int64_t n = qkv.size(1), d = k_cache.size(2), half = d / 2, capacity = k_cache.size(1);
  TORCH_CHECK(qkv.size(0) == 1 && qkv.size(2) == (heads + 2 * kv_heads) * d, "rope_write_kv: qkv shape");
  TORCH_CHECK(cos.numel() == n * d && sin.numel() == n * d, "rope_write_kv: one rotary row per token needed");
  TORCH_CHECK(k_cache.size(0) == kv_heads && v_cache.sizes() == k_cache.sizes(), "rope_write_kv: cache shape");
  TORCH_CHECK(start >= 0 && start + n <= capacity, "rope_write_kv: slots past the cache's capacity");
  at::Tensor q = at::empty({1, heads, n, d}, qkv.options());
  const float *pqkv = qkv.data_ptr<float>(), *pc = cos.data_ptr<float>(), *ps = sin.data_ptr<float>();
  float *pq = q.data_ptr<float>(), *pk = k_cache.data_ptr<float>(), *pv = v_cache.data_ptr<float>();
  const int64_t row = (heads + 2 * kv_heads) * d;
  for (int64_t t = 0; t < n; ++t) {
    const float *c = pc + t * d, *s = ps + t * d, *src = pqkv + t * row;
    for (int64_t hd = 0; hd < heads + kv_heads; ++hd) {
      const float* x = src + hd * d;
      float* out = hd < heads ? pq + (hd * n + t) * d : pk + ((hd - heads) * capacity + start + t) * d;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) out[i] = x[i] * c[i] + x[i + half] * s[i];
#pragma omp simd
      for (int64_t i = half; i < d; ++i) out[i] = x[i] * c[i] + x[i - half] * s[i];
    }
    const float* v = src + (heads + kv_heads) * d;
    for (int64_t kv = 0; kv < kv_heads; ++kv)
      std::copy(v + kv * d, v + (kv + 1) * d, pv + (kv * capacity + start + t) * d);
  }
  return q;
}

// Sums in a fixed order (16 running partial sums, then those in turn), not the order a vectorizer picks for a
// reduction (which may depend on the data's alignment): attention over the same keys gives the same bits in a
// one-token step and in a verification, where the queries sit elsewhere in memory.
// lanes l + (l + 8), then + 4, 2, 1: four dependent adds, not fifteen, in an order fixed by the source
inline float fold_lanes(Lanes16 v) {
  const Lanes8 eight = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                       __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Lanes4 four = __builtin_shufflevector(eight, eight, 0, 1, 2, 3) +
                      __builtin_shufflevector(eight, eight, 4, 5, 6, 7);
  const float two[2] = {four[0] + four[2], four[1] + four[3]};
  return two[0] + two[1];
}

inline float dot_fixed(const float* a, const float* b, int64_t n) {
  Lanes16 lanes = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) lanes += load16(a + i) * load16(b + i);
  for (int l = 0; i < n; ++i, ++l) lanes[l] += a[i] * b[i];
  return fold_lanes(lanes);
}

// 16 lane vectors folded at once: lane i of the result is fold_lanes(v[i]) bit for bit (the same pairs added
// in the same order: l + (l + 8), then + 4, 2, 1), in 15 shuffled adds instead of 16 separate folds.
inline Lanes16 fold16(const Lanes16* v) {
  Lanes16 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i)  // a[i]: keys 2i, 2i + 1, 8 lanes each
    a[i] = __builtin_shufflevector(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
           __builtin_shufflevector(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
  for (int i = 0; i < 4; ++i)  // b[i]: keys 4i .. 4i + 3, 4 lanes each
    b[i] = __builtin_shufflevector(a[2 * i], a[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
           __builtin_shufflevector(a[2 * i], a[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
  for (int i = 0; i < 2; ++i)  // c[i]: keys 8i .. 8i + 7, 2 lanes each
    c[i] = __builtin_shufflevector(b[2 * i], b[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
           __builtin_shufflevector(b[2 * i], b[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
  return __builtin_shufflevector(c[0], c[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(c[0], c[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// A row of m scores to softmax probabilities, in place, in float32: its maximum, exponentials of the differences
// and their sum, 16 lanes at a time in a fixed order (zero-padded tail).
inline void softmax_row(float* row, int64_t m) {
  Lanes16 top = Lanes16{} + row[0];  // a tail is padded with row[0]: the maximum stays the row's
  for (int64_t j = 0; j < m; j += kLanes) {
    Lanes16 v = top;
    if (j + kLanes <= m) v = load16(row + j); else std::memcpy(&v, row + j, (m - j) * sizeof(float));
    top = v > top ? v : top;
  }
  float best = top[0];
  for (int l = 1; l < kLanes; ++l) best = std::max(best, top[l]);
  Lanes16 sums = {};
  for (int64_t j = 0; j < m; j += kLanes) {
    const int64_t count = std::min<int64_t>(kLanes, m - j);
    Lanes16 e = exp_nonpositive(load_partial16(row + j, count) - best);
    for (int64_t l = count; l < kLanes; ++l) e[l] = 0.f;
    sums += e;
    store_partial16(row + j, e, count);
  }
  const float inverse = 1.0f / fold_lanes(sums);
  for (int64_t j = 0; j < m; ++j) row[j] *= inverse;
}
// The `group` query heads sharing one kv head (rows of q, `q_stride` apart) over the keys and values at rows
// index[0..m) of kh / vh [capacity, d] (index null: rows 0..m): float32 softmax, the output rows (`o_stride`
// apart) overwritten. One function for both kernels below, so both compute alike: each score and each output
// element gets the same operations in the same order whatever m, the index or where the query sits. Head sizes
// that are multiples of 16 (up to 256) keep a key's or value's chunks in registers (CHUNKS of 16); others go lane
// by lane.
template <int CHUNKS>
__attribute__((noinline)) void attend_group_vector(const float* q, int64_t q_stride, const float* kh,
                                                   const float* vh, const int64_t* index, int64_t m, int64_t group,
                                                   float scale, float* scores, float* out, int64_t o_stride) {
  constexpr int64_t d = CHUNKS * kLanes;
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
  // AVX2 (16 registers of 8 lanes), explicitly: the generic 16-lane code below compiles there to stack traffic
  // (spilled accumulators, broadcasts through memory), 7x slower. Scores one key at a time, folded as
  // fold_lanes folds (lanes l and l + 8, then + 4, 2, 1); outputs summed over the keys in key order, 8 registers
  // of one head's output at a time.
  constexpr int kVec = 2 * CHUNKS;  // 8-float registers per head row
  for (int64_t g = 0; g < group; ++g) {
    __m256 query[kVec];
    for (int c = 0; c < kVec; ++c) query[c] = _mm256_loadu_ps(q + g * q_stride + 8 * c);
    for (int64_t j = 0; j < m; ++j) {
      const float* k = kh + (index ? index[j] : j) * d;
      __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();  // lanes 0-7 and 8-15 of each 16-float chunk
      for (int c = 0; c < CHUNKS; ++c) {
        low = _mm256_fmadd_ps(query[2 * c], _mm256_loadu_ps(k + 16 * c), low);
        high = _mm256_fmadd_ps(query[2 * c + 1], _mm256_loadu_ps(k + 16 * c + 8), high);
      }
      const __m256 eight = _mm256_add_ps(low, high);
      const __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
      const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));  // lanes 0 + 2, 1 + 3
      scores[g * m + j] = _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two))) * scale;
    }
  }
  for (int64_t g = 0; g < group; ++g) softmax_row(scores + g * m, m);
  for (int64_t g = 0; g < group; ++g) {
    const float* p = scores + g * m;
    for (int c0 = 0; c0 < kVec; c0 += 8) {
      const int width = std::min(8, kVec - c0);
      __m256 acc[8];
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
      for (int64_t j = 0; j < m; ++j) {
        const float* v = vh + (index ? index[j] : j) * d + 8 * c0;
        const __m256 pj = _mm256_set1_ps(p[j]);
        for (int c = 0; c < 8; ++c)
          if (c < width) acc[c] = _mm256_fmadd_ps(pj, _mm256_loadu_ps(v + 8 * c), acc[c]);
      }
      for (int c = 0; c < width; ++c) _mm256_storeu_ps(out + g * o_stride + 8 * (c0 + c), acc[c]);
    }
  }
#else
  Lanes16 lanes[kLanes];
  for (int64_t g = 0; g < group; ++g) {  // scores of 16 keys at a time, each key's lanes as dot_fixed sums them
    Lanes16 query[CHUNKS];
    for (int c = 0; c < CHUNKS; ++c) query[c] = load16(q + g * q_stride + c * kLanes);
    for (int64_t j0 = 0; j0 < m; j0 += kLanes) {
      const int64_t count = std::min<int64_t>(kLanes, m - j0);
      for (int64_t jj = 0; jj < kLanes; ++jj) {
        lanes[jj] = Lanes16{};
        if (jj >= count) continue;
        const float* k = kh + (index ? index[j0 + jj] : j0 + jj) * d;
        for (int c = 0; c < CHUNKS; ++c) lanes[jj] += query[c] * load16(k + c * kLanes);
      }
      store_partial16(scores + g * m + j0, fold16(lanes) * scale, count);
    }
  }
  constexpr int64_t kHeads = CHUNKS <= 4 ? 4 : CHUNKS <= 8 ? 2 : 1;
  for (int64_t g = 0; g < group; ++g) softmax_row(scores + g * m, m);
  // each output summed in registers over the keys, in key order; each value row loaded once for up to kHeads
  // heads of the group (as many accumulators as registers hold)
  for (int64_t g0 = 0; g0 < group; g0 += kHeads) {
    const int64_t heads = std::min<int64_t>(kHeads, group - g0);
    Lanes16 acc[kHeads][CHUNKS] = {};
    for (int64_t j = 0; j < m; ++j) {
      const float* v = vh + (index ? index[j] : j) * d;
      Lanes16 row[CHUNKS];
      for (int c = 0; c < CHUNKS; ++c) row[c] = load16(v + c * kLanes);
      for (int64_t h = 0; h < kHeads; ++h) {
        if (h >= heads) break;
        const float p = scores[(g0 + h) * m + j];
        for (int c = 0; c < CHUNKS; ++c) acc[h][c] += p * row[c];
      }
    }
    for (int64_t h = 0; h < heads; ++h) std::memcpy(out + (g0 + h) * o_stride, acc[h], sizeof acc[h]);
  }
#endif
}

__attribute__((noinline)) void attend_group(const float* q, int64_t q_stride, const float* kh, const float* vh,
                                            const int64_t* index, int64_t m, int64_t group, int64_t d,
                                            float scale, float* scores, float* out, int64_t o_stride) {
#define DRAFTSMITH_ATTEND(CHUNKS) \
  case CHUNKS * kLanes: return attend_group_vector<CHUNKS>(q, q_stride, kh, vh, index, m, group, scale, scores, out, o_stride);
  switch (d) {  // the head sizes models use, up to 256 (Gemma 3's)
    DRAFTSMITH_ATTEND(2) DRAFTSMITH_ATTEND(3) DRAFTSMITH_ATTEND(4) DRAFTSMITH_ATTEND(5) DRAFTSMITH_ATTEND(6)
    DRAFTSMITH_ATTEND(7) DRAFTSMITH_ATTEND(8) DRAFTSMITH_ATTEND(10) DRAFTSMITH_ATTEND(12) DRAFTSMITH_ATTEND(16)
    default: break;
  }
#undef DRAFTSMITH_ATTEND
  for (int64_t j = 0; j < m; ++j) {
    const float* k = kh + (index ? index[j] : j) * d;
    for (int64_t g = 0; g < group; ++g) scores[g * m + j] = dot_fixed(q + g * q_stride, k, d) * scale;
  }
  for (int64_t g = 0; g < group; ++g) softmax_row(scores + g * m, m);
  for (int64_t g = 0; g < group; ++g) {
    const float* p = scores + g * m;
    float* o = out + g * o_stride;
    std::fill(o, o + d, 0.f);
    for (int64_t j = 0; j < m; ++j) {
      const float* v = vh + (index ? index[j] : j) * d;
      for (int64_t i = 0; i < d; ++i) o[i] += p[j] * v[i];
    }
  }
}

void check_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const char* name) {
  check_float_contiguous(q, name);
  check_float_contiguous(k_cache, name);
  check_float_contiguous(v_cache, name);
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && k_cache.dim() == 3 && v_cache.sizes() == k_cache.sizes(), name,
              ": q [1, heads, n, d] and caches [kv_heads, capacity, d] needed");
  TORCH_CHECK(q.size(1) % k_cache.size(0) == 0 && k_cache.size(2) == q.size(3), name, ": head shapes");
}

// One query per head [1, heads, 1, d] over the first `length` cached keys and values [kv_heads, capacity, d]
// (grouped-query: heads h * group .. h * group + group - 1 read kv head h, each key and value row loaded once for
// the group); softmax in float32. Returns [1, heads, 1, d].
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                            int64_t length) {
  const at::Tensor q = q_in.contiguous();
  check_attention(q, k_cache, v_cache, "decode_attention");
  const int64_t heads = q.size(1), d = q.size(3), kv_heads = k_cache.size(0), capacity = k_cache.size(1);
  TORCH_CHECK(q.size(2) == 1, "decode_attention: one query per head");
  TORCH_CHECK(length > 0 && length <= capacity, "decode_attention: length outside the cache");
  at::Tensor out = at::empty_like(q);
  const float *pq = q.data_ptr<float>(), *pk = k_cache.data_ptr<float>(), *pv = v_cache.data_ptr<float>();
  float* po = out.data_ptr<float>();
  const int64_t group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  // kv heads in parallel only where there is enough work to pay for waking the other threads
  const int64_t grain = std::max<int64_t>(1, 2048 / length);
  at::parallel_for(0, kv_heads, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(group * length);
    for (int64_t kv = begin; kv < end; ++kv)
      attend_group(pq + kv * group * d, d, pk + kv * capacity * d, pv + kv * capacity * d, nullptr, length, group,
                   d, scale, scores.data(), po + kv * group * d, d);
  });
  return out;
}

// Queries of n new tokens [1, heads, n, d] (their keys and values already at slots start..start+n) under
// `allowed` [n, start + n] bool (a draft tree's, or a chain's): each query attends to exactly its allowed
// entries, in slot order, through the one-token kernel's arithmetic, so a draft token accepted in a
// verification got the numbers a one-token step at its position would have. Returns [1, heads, n, d].
at::Tensor tree_attention(const at::Tensor& q_in, const at::Tensor& k_cache, const at::Tensor& v_cache,
                          const at::Tensor& allowed_in, int64_t start) {
  const at::Tensor q = q_in.contiguous(), allowed = allowed_in.contiguous();
  check_attention(q, k_cache, v_cache, "tree_attention");
  const int64_t heads = q.size(1), n = q.size(2), d = q.size(3), kv_heads = k_cache.size(0);
  const int64_t capacity = k_cache.size(1), length = start + n;
  TORCH_CHECK(allowed.scalar_type() == at::kBool && allowed.dim() == 2 && allowed.size(0) == n &&
              allowed.size(1) == length, "tree_attention: a bool mask [n, start + n] is needed");
  TORCH_CHECK(start >= 0 && length <= capacity, "tree_attention: slots outside the cache");
  at::Tensor out = at::empty_like(q);
  const float *pq = q.data_ptr<float>(), *pk = k_cache.data_ptr<float>(), *pv = v_cache.data_ptr<float>();
  const bool* pa = allowed.data_ptr<bool>();
  float* po = out.data_ptr<float>();
  const int64_t group = heads / kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(d));
  at::parallel_for(0, n * kv_heads, std::max<int64_t>(1, 2048 / length), [&](int64_t begin, int64_t end) {
    std::vector<int64_t> index;
    std::vector<float> scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / kv_heads, kv = item % kv_heads;
      index.clear();
      for (int64_t j = 0; j < length; ++j)
        if (pa[t * length + j]) index.push_back(j);
      TORCH_CHECK(!index.empty(), "tree_attention: a query with nothing to attend to");
      scores.resize(group * index.size());
      const int64_t first = kv * group;  // q and out rows of head h, token t: (h * n + t) * d
      attend_group(pq + (first * n + t) * d, n * d, pk + kv * capacity * d, pv + kv * capacity * d, index.data(),
                   static_cast<int64_t>(index.size()), group, d, scale, scores.data(), po + (first * n + t) * d,
                   n * d);
    }
  });
  return out;
}

// x @ w.T for float32 rows x [..., in] and float16 weights w [out, in], summed in float32: each weight row is
// read from memory once for all input rows (8 at a time, their partial sums held in registers), output features
// split across threads.
// With F16C + FMA, 8 lanes at a time; otherwise (or for an input size not divisible by 8) scalar.
template <int R>
void half_rows_block(const float* x, const at::Half* w, float* out, int64_t in, int64_t features, int64_t begin,
                     int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    const at::Half* row = w + o * in;
    float sums[R];
#if defined(__F16C__) && defined(__FMA__)
    if (in % 8 == 0) {
      __m256 acc[R];
      for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
      for (int64_t i = 0; i < in; i += 8) {
        const __m256 weights = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + i)));
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(weights, _mm256_loadu_ps(x + r * in + i), acc[r]);
      }
      for (int r = 0; r < R; ++r) {
        __m128 low = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
        low = _mm_hadd_ps(low, low);
        sums[r] = _mm_cvtss_f32(_mm_hadd_ps(low, low));
      }
    } else
#endif
    {
      for (int r = 0; r < R; ++r) {
        float total = 0.f;
        for (int64_t i = 0; i < in; ++i) total += static_cast<float>(row[i]) * x[r * in + i];
        sums[r] = total;
      }
    }
    for (int r = 0; r < R; ++r) out[r * features + o] = sums[r];
  }
}

// The checks and output of a product x [..., in] @ w.T for weights w [out, in] of `dtype`: x made contiguous,
// the output [..., out] float32 allocated.
std::tuple<at::Tensor, at::Tensor> product_operands(const at::Tensor& x_in, const at::Tensor& w,
                                                    at::ScalarType dtype, const char* name) {
  at::Tensor x = x_in.contiguous();
  check_float_contiguous(x, name);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == dtype && w.is_contiguous() && w.dim() == 2, name,
              " weight: a contiguous ", c10::toString(dtype), " CPU matrix is needed");
  TORCH_CHECK(x.size(-1) == w.size(1), name, ": input size ", x.size(-1), " != weight's ", w.size(1));
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  return {x, at::empty(shape, x.options())};
}

at::Tensor half_product(const at::Tensor& x_in, const at::Tensor& w) {
  const auto [x, out] = product_operands(x_in, w, at::kHalf, "half_product");
  const int64_t in = w.size(1), features = w.size(0), rows = x.numel() / in;
  const float* px = x.data_ptr<float>();
  const at::Half* pw = w.data_ptr<at::Half>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, features, 64, [&](int64_t begin, int64_t end) {
    // 16 weight rows at a time stay in the L1 cache for every block of 8 input rows: weights read from memory once
    for (int64_t first = begin; first < end; first += 16) {
      const int64_t last = std::min(end, first + 16);
      for (int64_t r0 = 0; r0 < rows; r0 += 8) {
        const float* xr = px + r0 * in;
        float* orow = po + r0 * features;
        switch (std::min<int64_t>(8, rows - r0)) {
          case 1: half_rows_block<1>(xr, pw, orow, in, features, first, last); break;
          case 2: half_rows_block<2>(xr, pw, orow, in, features, first, last); break;
          case 3: half_rows_block<3>(xr, pw, orow, in, features, first, last); break;
          case 4: half_rows_block<4>(xr, pw, orow, in, features, first, last); break;
          case 5: half_rows_block<5>(xr, pw, orow, in, features, first, last); break;
          case 6: half_rows_block<6>(xr, pw, orow, in, features, first, last); break;
          case 7: half_rows_block<7>(xr, pw, orow, in, features, first, last); break;
          default: half_rows_block<8>(xr, pw, orow, in, features, first, last); break;
        }
      }
    }
  });
  return out;
}


// x @ w.T for float32 rows x [..., in] and bfloat16 weights w [out, in] with AVX512-BF16's dot products: x rounded
// to bfloat16 once (as bfloat16 products and llama.cpp's BF16 ones round activations), two products summed into
// each float32 lane per instruction, twice float32 FMA's rate. Tiles of up to 4 rows x 4 weight rows in registers:
// each weight vector loaded once for 4 rows, each input vector for 4 weight rows. Every output sums its products
// in the same order whatever the number of rows or the tiling, so a batched verification gives the one-token
// step's numbers bit for bit.
#if defined(__AVX512BF16__) && defined(__AVX512F__)
constexpr bool kBf16Dot = true;

// `ahead`: the next tile's weights, fetched into the cache a few lines per step while this one computes (without it
// a tile's rows are short separate streams that the hardware prefetcher restarts on: half FBGEMM's read rate)
template <int R, int C>
inline void bf16_tile(const uint16_t* x, const uint16_t* w, float* out, int64_t in, int64_t features,
                      const uint16_t* ahead, int64_t ahead_bytes) {
  const char* next = reinterpret_cast<const char*>(ahead);
  const int64_t lines_per_step = (ahead_bytes / 64 + in / 32) / std::max<int64_t>(1, in / 32) + 1;
  __m512 acc[R][C];
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t k = 0; k < in; k += 32) {
    const __mmask32 lanes = in - k >= 32 ? ~__mmask32(0) : (__mmask32(1) << (in - k)) - 1;  // zeros past the end
    if (ahead != nullptr)
      for (int64_t line = 0; line < lines_per_step && next < reinterpret_cast<const char*>(ahead) + ahead_bytes;
           ++line, next += 64)
        _mm_prefetch(next, _MM_HINT_T0);
    __m512bh weights[C];
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) weights[c] = (__m512bh)_mm512_maskz_loadu_epi16(lanes, w + c * in + k);
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) {
      const __m512bh xs = (__m512bh)_mm512_maskz_loadu_epi16(lanes, x + r * in + k);
#pragma GCC unroll 4
      for (int c = 0; c < C; ++c) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], xs, weights[c]);
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int c = 0; c < C; ++c) out[r * features + c] = _mm512_reduce_add_ps(acc[r][c]);
}

template <int C>
inline void bf16_rows(const uint16_t* x, const uint16_t* w, float* out, int64_t rows, int64_t in, int64_t features,
                      const uint16_t* ahead, int64_t ahead_bytes) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) {  // the first block of rows fetches the next tile; later ones find this one cached
    bf16_tile<4, C>(x + r * in, w, out + r * features, in, features, r == 0 ? ahead : nullptr, ahead_bytes);
  }
  const uint16_t* fetch = r == 0 ? ahead : nullptr;
  switch (rows - r) {
    case 1: bf16_tile<1, C>(x + r * in, w, out + r * features, in, features, fetch, ahead_bytes); break;
    case 2: bf16_tile<2, C>(x + r * in, w, out + r * features, in, features, fetch, ahead_bytes); break;
    case 3: bf16_tile<3, C>(x + r * in, w, out + r * features, in, features, fetch, ahead_bytes); break;
    default: break;
  }
}

void round_to_bf16(const float* x, uint16_t* out, int64_t n) {
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + i));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + i), (__m256i)packed);
  }
  for (; i < n; ++i) {
    const at::BFloat16 rounded(x[i]);  // round to nearest even, as the vector instruction
    out[i] = rounded.x;
  }
}
#else
constexpr bool kBf16Dot = false;
#endif

bool bf16_dot_supported() { return kBf16Dot; }

at::Tensor bf16_product(const at::Tensor& x_in, const at::Tensor& w) {
  TORCH_CHECK(kBf16Dot, "bf16_product: these kernels were built for a CPU without AVX512-BF16 dot products");
  const auto [x, out] = product_operands(x_in, w, at::kBFloat16, "bf16_product");
  const int64_t in = w.size(1), features = w.size(0), rows = x.numel() / in;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
  std::vector<uint16_t> xb(rows * in);
  round_to_bf16(x.data_ptr<float>(), xb.data(), rows * in);
  const uint16_t* pw = reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>());
  float* po = out.data_ptr<float>();
  constexpr int64_t C = 4;
  at::parallel_for(0, (features + C - 1) / C, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t o = block * C;
      if (o + C <= features) {
        const int64_t ahead_rows = std::min<int64_t>(C, std::max<int64_t>(0, std::min(end * C, features) - o - C));
        bf16_rows<C>(xb.data(), pw + o * in, po + o, rows, in, features, pw + (o + C) * in, ahead_rows * in * 2);
      } else {
        for (int64_t f = o; f < features; ++f)
          bf16_rows<1>(xb.data(), pw + f * in, po + f, rows, in, features, nullptr, 0);
      }
    }
  });
#endif
  return out;
}


// x @ w.T for float32 rows x [..., in] and bfloat16 weights packed for AMX tiles ([out / 16, in / 32, 16, 32]:
// per block of 16 outputs and 32 inputs, the 16 input pairs x 16 outputs x 2 that TDPBF16PS reads; zero-padded
// to whole tiles). x is rounded to bfloat16 once, as bf16_product rounds it. A tile product costs the same for 1
// and 16 rows, so up to 16 rows cost what one does while the weights stream from memory: a tree's verification at
// a one-token step's price where the CPU has AMX. Each output sums its input blocks in order, one tile at a time,
// whatever the number of rows: a verification gives the one-token step's numbers bit for bit.
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#define DRAFTSMITH_AMX 1
constexpr int64_t kAmxRows = 16, kAmxCols = 16, kAmxDepth = 32;

struct AmxTileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

bool amx_permitted() {
  // Linux hands out the tiles' register state only to a process that asks for it (oneDNN asks the same way)
  static const bool ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  return ok;
}
#else
bool amx_permitted() { return false; }
#endif

bool amx_supported() { return amx_permitted(); }

at::Tensor amx_product(const at::Tensor& x_in, const at::Tensor& packed, int64_t features) {
  TORCH_CHECK(amx_permitted(),
              "amx_product: these kernels were built for a CPU without AMX, or the OS refused its tiles");
  at::Tensor x = x_in.contiguous();
  check_float_contiguous(x, "amx_product");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kBFloat16 && packed.is_contiguous() &&
                  packed.dim() == 4 && packed.size(2) == 16 && packed.size(3) == 32,
              "amx_product weight: a contiguous BFloat16 CPU tensor [out/16, in/32, 16, 32] is needed (amx_pack)");
  const int64_t in = x.size(-1), rows = x.numel() / in, blocks = packed.size(0), depth = packed.size(1);
  TORCH_CHECK(depth * 32 >= in && depth * 32 < in + 32 && blocks * 16 >= features && blocks * 16 < features + 16,
              "amx_product: input size ", in, " and ", features, " outputs do not fit a packing of ", blocks,
              " x ", depth, " tiles");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = features;
  at::Tensor out = at::empty(shape, x.options());
#if defined(DRAFTSMITH_AMX)
  const int64_t width = depth * kAmxDepth, padded_rows = (rows + kAmxRows - 1) / kAmxRows * kAmxRows;
  std::vector<uint16_t> xb(padded_rows * width, 0);  // rows rounded to bf16, zero past the input and the rows
  const float* px = x.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) round_to_bf16(px + r * in, xb.data() + r * width, in);
  const uint16_t* pw = reinterpret_cast<const uint16_t*>(packed.data_ptr<at::BFloat16>());
  float* po = out.data_ptr<float>();
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    AmxTileConfig config;
    for (int t = 0; t < 3; ++t) {  // tile 0: sums, 1: rows, 2: weights; 16 rows of 64 bytes each
      config.colsb[t] = 64;
      config.rows[t] = 16;
    }
    _tile_loadconfig(&config);
    alignas(64) float sums[kAmxRows * kAmxCols];
    for (int64_t block = begin; block < end; ++block) {
      const uint16_t* weights = pw + block * depth * kAmxRows * kAmxDepth;
      const int64_t columns = std::min<int64_t>(kAmxCols, features - block * kAmxCols);
      for (int64_t r0 = 0; r0 < rows; r0 += kAmxRows) {
        _tile_zero(0);
        for (int64_t k = 0; k < depth; ++k) {
          _tile_loadd(1, xb.data() + r0 * width + k * kAmxDepth, width * 2);
          _tile_loadd(2, weights + k * kAmxRows * kAmxDepth, 64);
          _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, sums, 64);
        for (int64_t r = 0; r < std::min<int64_t>(kAmxRows, rows - r0); ++r)
          std::memcpy(po + (r0 + r) * features + block * kAmxCols, sums + r * kAmxCols, columns * sizeof(float));
      }
    }
    _tile_release();
  });
#endif
  return out;
}


// x @ W.T for float32 rows x [..., in] and weights W [out, in] kept as GGML blocks of 32 (uint8 [out, in / 32 *
// block bytes], as llama.cpp's files store them): Q4_0 d * (q - 8), Q4_1 d * q + m, Q8_0 d * q, with d and m the
// block's own float16 scale and minimum. Each block is unpacked to float32 once and multiplied into every row
// (up to kBlockRows at a time), so a verification reads each weight byte once, as a one-token step does. Plain
// loops over 16 lanes that the compiler vectorizes for whatever ISA it builds for (AVX-512 or AVX2): each row
// sums its products lane by lane in the same order whatever the number of rows, then adds the 16 lanes in one
// fixed order, so a verification of n rows gives the one-token step's numbers bit for bit.
constexpr int kQ4_0 = 2, kQ4_1 = 3, kQ8_0 = 8;
constexpr int64_t kBlock = 32, kBlockLanes = 16;

inline int64_t block_bytes(int64_t qtype) {
  switch (qtype) {
    case kQ4_0: return 18;
    case kQ4_1: return 20;
    case kQ8_0: return 34;
    default: TORCH_CHECK(false, "block_product: GGML type ", qtype, " is not one of Q4_0 (2), Q4_1 (3), Q8_0 (8)");
  }
  return 0;
}

inline float half_to_float(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, sizeof bits);
  return c10::detail::fp16_ieee_to_fp32_value(bits);
}

// 16 float32 lanes: one AVX-512 register, or two AVX2 ones doing the same per-lane operations (FMA on both), so
// both builds give the same bits
#if defined(__AVX512F__)
struct Vec16 {
  __m512 v;
  static Vec16 zero() { return {_mm512_setzero_ps()}; }
  static Vec16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec16 set1(float a) { return {_mm512_set1_ps(a)}; }
  static Vec16 from_bytes(__m128i b) { return {_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(b))}; }
  static Vec16 from_signed_bytes(__m128i b) { return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))}; }
  static Vec16 fma(Vec16 a, Vec16 b, Vec16 c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
  static Vec16 mul(Vec16 a, Vec16 b) { return {_mm512_mul_ps(a.v, b.v)}; }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
};
#elif defined(__AVX2__) && defined(__FMA__)
struct Vec16 {
  __m256 lo, hi;
  static Vec16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static Vec16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static Vec16 set1(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
  static Vec16 from_bytes(__m128i b) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)))};
  }
  static Vec16 from_signed_bytes(__m128i b) {
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8)))};
  }
  static Vec16 fma(Vec16 a, Vec16 b, Vec16 c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }
  static Vec16 mul(Vec16 a, Vec16 b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
  void store(float* p) const { _mm256_storeu_ps(p, lo); _mm256_storeu_ps(p + 8, hi); }
};
#endif

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
constexpr bool kBlockKernels = true;

// a block's 32 weights as two vectors of 16: Q4 low nibbles are weights 0-15, high nibbles 16-31
template <int Q>
inline void unpack_block(const uint8_t* b, Vec16& w_lo, Vec16& w_hi) {
  const Vec16 d = Vec16::set1(half_to_float(b));
  if constexpr (Q == kQ8_0) {
    w_lo = Vec16::mul(d, Vec16::from_signed_bytes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2))));
    w_hi = Vec16::mul(d, Vec16::from_signed_bytes(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18))));
  } else {
    const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Q == kQ4_1 ? 4 : 2)));
    const __m128i nibble = _mm_set1_epi8(0x0F);
    __m128i low = _mm_and_si128(packed, nibble), high = _mm_and_si128(_mm_srli_epi16(packed, 4), nibble);
    if constexpr (Q == kQ4_0) {  // q - 8 as a signed byte
      low = _mm_sub_epi8(low, _mm_set1_epi8(8));
      high = _mm_sub_epi8(high, _mm_set1_epi8(8));
      w_lo = Vec16::mul(d, Vec16::from_signed_bytes(low));
      w_hi = Vec16::mul(d, Vec16::from_signed_bytes(high));
    } else {
      const Vec16 m = Vec16::set1(half_to_float(b + 2));
      w_lo = Vec16::fma(d, Vec16::from_bytes(low), m);
      w_hi = Vec16::fma(d, Vec16::from_bytes(high), m);
    }
  }
}

inline float sum_lanes(const Vec16& acc) {  // a fixed pairwise order
  alignas(64) float s[kBlockLanes];
  acc.store(s);
  for (int width = kBlockLanes / 2; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  return s[0];
}

// R rows x C weight rows in registers: each unpacked block serves R rows, each loaded input vector C weight rows
template <int Q, int R, int C>
inline void block_tile(const float* x, const uint8_t* w, float* out, int64_t in, int64_t features, int64_t row_bytes) {
  const int64_t bytes = block_bytes(Q), blocks = in / kBlock;
  Vec16 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec16::zero();
  for (int64_t b = 0; b < blocks; ++b) {
    Vec16 lo[C], hi[C];
    for (int c = 0; c < C; ++c) unpack_block<Q>(w + c * row_bytes + b * bytes, lo[c], hi[c]);
    for (int r = 0; r < R; ++r) {
      const Vec16 x_lo = Vec16::load(x + r * in + b * kBlock), x_hi = Vec16::load(x + r * in + b * kBlock + 16);
      for (int c = 0; c < C; ++c) acc[r][c] = Vec16::fma(x_hi, hi[c], Vec16::fma(x_lo, lo[c], acc[r][c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * features + c] = sum_lanes(acc[r][c]);
}

// block_tile over weights already unpacked to float32 (C rows of `in`): the same products in the same order
template <int R, int C>
inline void unpacked_tile(const float* x, const float* unpacked, float* out, int64_t in, int64_t features) {
  Vec16 acc[R][C];
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = Vec16::zero();
  for (int64_t k = 0; k < in; k += kBlock) {
    Vec16 lo[C], hi[C];
    for (int c = 0; c < C; ++c) {
      lo[c] = Vec16::load(unpacked + c * in + k);
      hi[c] = Vec16::load(unpacked + c * in + k + 16);
    }
    for (int r = 0; r < R; ++r) {
      const Vec16 x_lo = Vec16::load(x + r * in + k), x_hi = Vec16::load(x + r * in + k + 16);
      for (int c = 0; c < C; ++c) acc[r][c] = Vec16::fma(x_hi, hi[c], Vec16::fma(x_lo, lo[c], acc[r][c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * features + c] = sum_lanes(acc[r][c]);
}

template <int Q, int C>
void block_rows(const float* x, const uint8_t* w, float* out, int64_t rows, int64_t in, int64_t features) {
  const int64_t row_bytes = in / kBlock * block_bytes(Q);
  switch (rows) {  // up to 4 rows: the weights unpacked in registers, once
    case 1: return block_tile<Q, 1, C>(x, w, out, in, features, row_bytes);
    case 2: return block_tile<Q, 2, C>(x, w, out, in, features, row_bytes);
    case 3: return block_tile<Q, 3, C>(x, w, out, in, features, row_bytes);
    case 4: return block_tile<Q, 4, C>(x, w, out, in, features, row_bytes);
    default: break;
  }
  // more rows (a verification): the C weight rows unpacked once into a buffer that every tile of 4 rows reads
  thread_local std::vector<float> unpacked;
  unpacked.resize(C * in);
  for (int c = 0; c < C; ++c)
    for (int64_t b = 0; b < in / kBlock; ++b) {
      Vec16 lo, hi;
      unpack_block<Q>(w + c * row_bytes + b * block_bytes(Q), lo, hi);
      lo.store(unpacked.data() + c * in + b * kBlock);
      hi.store(unpacked.data() + c * in + b * kBlock + 16);
    }
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) unpacked_tile<4, C>(x + r * in, unpacked.data(), out + r * features, in, features);
  switch (rows - r) {
    case 1: unpacked_tile<1, C>(x + r * in, unpacked.data(), out + r * features, in, features); break;
    case 2: unpacked_tile<2, C>(x + r * in, unpacked.data(), out + r * features, in, features); break;
    case 3: unpacked_tile<3, C>(x + r * in, unpacked.data(), out + r * features, in, features); break;
    default: break;
  }
}

// Weight rows first..last into the cache ahead of their use: a tile reads its 4 weight rows side by side, 4 short
// streams that the hardware prefetcher restarts on, so the kernels fetch the group after next themselves.
constexpr int64_t kPrefetchGroups = 2;

inline void prefetch_rows(const uint8_t* w, int64_t row_bytes, int64_t first, int64_t last) {
  const uint8_t* end = w + last * row_bytes;
  for (const uint8_t* p = w + first * row_bytes; p < end; p += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// Weight rows first..last in groups of 4 (then one by one), the group after next prefetched: group(f) multiplies
// rows f..f+3, single(f) row f.
template <typename Group, typename Single>
inline void each_weight_group(const uint8_t* w, int64_t row_bytes, int64_t first, int64_t last, Group group,
                              Single single) {
  int64_t f = first;
  prefetch_rows(w, row_bytes, f, std::min(last, f + 4 * kPrefetchGroups));
  for (; f + 4 <= last; f += 4) {
    const int64_t ahead = f + 4 * kPrefetchGroups;
    if (ahead < last) prefetch_rows(w, row_bytes, ahead, std::min(last, ahead + 4));
    group(f);
  }
  for (; f < last; ++f) single(f);
}

template <int Q>
void block_features(const float* x, const uint8_t* w, float* out, int64_t rows, int64_t in, int64_t features,
                    int64_t first, int64_t last) {
  const int64_t row_bytes = in / kBlock * block_bytes(Q);
  each_weight_group(
      w, row_bytes, first, last,
      [&](int64_t f) { block_rows<Q, 4>(x, w + f * row_bytes, out + f, rows, in, features); },
      [&](int64_t f) { block_rows<Q, 1>(x, w + f * row_bytes, out + f, rows, in, features); });
}
#else
constexpr bool kBlockKernels = false;
#endif

// what both block products check and return: x float32 [..., in], W a uint8 matrix of GGML blocks [out, in / 32 *
// block bytes], the output [..., out]
at::Tensor block_product_output(const at::Tensor& x, const at::Tensor& w, int64_t qtype, const char* name) {
  check_float_contiguous(x, name);
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.is_contiguous() && w.dim() == 2, name,
              " weight: a contiguous uint8 CPU matrix of GGML blocks is needed");
  const int64_t in = x.size(-1);
  TORCH_CHECK(in % kBlock == 0 && w.size(1) == in / kBlock * block_bytes(qtype), name, ": input size ", in,
              " does not match ", w.size(1), " bytes of blocks a weight row");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = w.size(0);
  return at::empty(shape, x.options());
}

at::Tensor block_product(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = block_product_output(x, w, qtype, "block_product");
  const int64_t in = x.size(-1), features = w.size(0), rows = x.numel() / in;
  const float* px = x.data_ptr<float>();
  const uint8_t* pw = w.data_ptr<uint8_t>();
  float* po = out.data_ptr<float>();
  TORCH_CHECK(kBlockKernels, "block_product: these kernels were built without AVX2/FMA or AVX-512");
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
  at::parallel_for(0, (features + 3) / 4, 8, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * 4, last = std::min(features, end * 4);
    switch (qtype) {
      case kQ4_0: block_features<kQ4_0>(px, pw, po, rows, in, features, first, last); break;
      case kQ4_1: block_features<kQ4_1>(px, pw, po, rows, in, features, first, last); break;
      default: block_features<kQ8_0>(px, pw, po, rows, in, features, first, last); break;
    }
  });
#endif
  return out;
}

// x @ W.T as llama.cpp computes it for these blocks: each row of x quantized per block of 32 to 8-bit integers
// with a float32 scale (amax / 127, rounded to nearest even), every block's 32 products summed exactly in
// integers (VNNI's dpbusd where the build has it, else AVX2's maddubs + madd: the same eight int32 lanes), then
// scaled into eight float32 lanes in block order and the lanes added in one fixed order. Each (row, weight row)
// is computed alone in that order, so a verification of n rows gives the one-token step's numbers bit for bit,
// and the AVX2 and AVX-512 builds give the same bits. Q4_1's minimum and Q4_0's offset enter through each
// block's integer sum of the quantized activations.
#if defined(__AVX2__) && defined(__FMA__)
inline __m256i dot_u8_s8(__m256i u, __m256i s) {  // lane i: the sum of bytes 4i..4i+3's products
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

inline __m256i unpack_nibbles(const uint8_t* p) {  // 16 bytes -> 32 values 0..15: low nibbles first
  const __m128i packed = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), nibble = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(packed, 4), nibble), _mm_and_si128(packed, nibble));
}

inline float sum_lanes8(__m256 acc) {  // a fixed pairwise order
  alignas(32) float s[8];
  _mm256_store_ps(s, acc);
  for (int width = 4; width >= 1; width /= 2)
    for (int i = 0; i < width; ++i) s[i] += s[i + width];
  return s[0];
}

struct QuantizedRows {  // x's rows per block of 32: int8 values, their scale and their sum
  std::vector<int8_t> q;
  std::vector<float> d;
  std::vector<int32_t> sum;
};

QuantizedRows quantize_rows(const float* x, int64_t rows, int64_t in) {
  const int64_t blocks = in / kBlock;
  QuantizedRows out{std::vector<int8_t>(rows * in), std::vector<float>(rows * blocks), std::vector<int32_t>(rows * blocks)};
  for (int64_t rb = 0; rb < rows * blocks; ++rb) {
    const float* p = x + rb * kBlock;
    float amax = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(p[i]));
    const float d = amax / 127.f, inverse = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t i = 0; i < kBlock; ++i) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(p[i] * inverse));
      out.q[rb * kBlock + i] = static_cast<int8_t>(v);
      sum += v;
    }
    out.d[rb] = d;
    out.sum[rb] = sum;
  }
  return out;
}

// R rows x C weight rows: each unpacked weight block serves R rows
template <int Q, int R, int C>
inline void int8_tile(const QuantizedRows& xq, int64_t row0, const uint8_t* w, float* out, int64_t in, int64_t features,
                      int64_t row_bytes) {
  const int64_t bytes = block_bytes(Q), blocks = in / kBlock;
  __m256 acc[R][C];
  float minimum[R][C];  // Q4_1: the minimum's part, summed in block order
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) acc[r][c] = _mm256_setzero_ps(), minimum[r][c] = 0.f;
  for (int64_t b = 0; b < blocks; ++b) {
    __m256i u[C];
    float dw[C], mw[C];
    for (int c = 0; c < C; ++c) {
      const uint8_t* block = w + c * row_bytes + b * bytes;
      dw[c] = half_to_float(block);
      mw[c] = Q == kQ4_1 ? half_to_float(block + 2) : 0.f;
      u[c] = Q == kQ8_0 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(block + 2))
                        : unpack_nibbles(block + (Q == kQ4_1 ? 4 : 2));
    }
    for (int r = 0; r < R; ++r) {
      const int64_t rb = (row0 + r) * blocks + b;
      const __m256i s = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq.q.data() + rb * kBlock));
      const float dx = xq.d[rb];
      const int32_t xsum = xq.sum[rb];
      for (int c = 0; c < C; ++c) {
        __m256i sums = Q == kQ8_0 ? dot_u8_s8(_mm256_sign_epi8(u[c], u[c]), _mm256_sign_epi8(s, u[c]))
                                  : dot_u8_s8(u[c], s);
        if (Q == kQ4_0)  // weights q - 8: the offset's part joins the exact integer sums (in lane 0)
          sums = _mm256_sub_epi32(sums, _mm256_setr_epi32(8 * xsum, 0, 0, 0, 0, 0, 0, 0));
        acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), _mm256_set1_ps(dw[c] * dx), acc[r][c]);
        if (Q == kQ4_1) minimum[r][c] = std::fma(mw[c] * dx, static_cast<float>(xsum), minimum[r][c]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) out[r * features + c] = sum_lanes8(acc[r][c]) + minimum[r][c];
}

template <int Q, int C>
void int8_rows(const QuantizedRows& xq, const uint8_t* w, float* out, int64_t rows, int64_t in, int64_t features) {
  const int64_t row_bytes = in / kBlock * block_bytes(Q);
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) int8_tile<Q, 4, C>(xq, r, w, out + r * features, in, features, row_bytes);
  switch (rows - r) {
    case 1: int8_tile<Q, 1, C>(xq, r, w, out + r * features, in, features, row_bytes); break;
    case 2: int8_tile<Q, 2, C>(xq, r, w, out + r * features, in, features, row_bytes); break;
    case 3: int8_tile<Q, 3, C>(xq, r, w, out + r * features, in, features, row_bytes); break;
    default: break;
  }
}

template <int Q>
void int8_features(const QuantizedRows& xq, const uint8_t* w, float* out, int64_t rows, int64_t in, int64_t features,
                   int64_t first, int64_t last) {
  const int64_t row_bytes = in / kBlock * block_bytes(Q);
  each_weight_group(
      w, row_bytes, first, last,
      [&](int64_t f) { int8_rows<Q, 4>(xq, w + f * row_bytes, out + f, rows, in, features); },
      [&](int64_t f) { int8_rows<Q, 1>(xq, w + f * row_bytes, out + f, rows, in, features); });
}
constexpr bool kInt8Kernels = true;
#else
constexpr bool kInt8Kernels = false;
#endif

at::Tensor block_product_int8(const at::Tensor& x_in, const at::Tensor& w, int64_t qtype) {
  const at::Tensor x = x_in.contiguous();
  at::Tensor out = block_product_output(x, w, qtype, "block_product_int8");
  const int64_t in = x.size(-1), features = w.size(0), rows = x.numel() / in;
  TORCH_CHECK(kInt8Kernels, "block_product_int8: these kernels were built without AVX2/FMA");
#if defined(__AVX2__) && defined(__FMA__)
  const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), rows, in);
  const uint8_t* pw = w.data_ptr<uint8_t>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, (features + 3) / 4, 8, [&](int64_t begin, int64_t end) {
    const int64_t first = begin * 4, last = std::min(features, end * 4);
    switch (qtype) {
      case kQ4_0: int8_features<kQ4_0>(xq, pw, po, rows, in, features, first, last); break;
      case kQ4_1: int8_features<kQ4_1>(xq, pw, po, rows, in, features, first, last); break;
      default: int8_features<kQ8_0>(xq, pw, po, rows, in, features, first, last); break;
    }
  });
#endif
  return out;
}

// x @ W.T for GGML blocks repacked for AMX's integer tiles (formats.py `amx_block_tiles`: per 16 weight rows and
// block of 32 inputs, the weights in TDPBSUD's layout, 4-bit ones two to a byte, then the 16 rows' float16 scales
// (and Q4_1's minimums)), with llama.cpp's arithmetic as `block_product_int8` has it: x's rows quantized per block
// to 8 bits, each block's 32 products summed exactly in integers (one tile product for 16 weight rows and up to
// 16 rows of x), scaled into float32 in block order. Each (row, weight row) gets the same operations whatever the
// number of rows: a verification gives the one-token step's numbers bit for bit. An integer tile product costs
// what its 16 rows' weights take to unpack: the whole step reads the file's blocks near memory speed.
#if defined(DRAFTSMITH_AMX) && defined(__AMX_INT8__)
#define DRAFTSMITH_AMX_INT8 1
#endif

inline int64_t amx_tile_bytes(int64_t qtype) {  // one block of 16 weight rows in amx_block_tiles' layout
  switch (qtype) {
    case kQ4_0: return 256 + 32;
    case kQ4_1: return 256 + 64;
    case kQ8_0: return 512 + 32;
    default: TORCH_CHECK(false, "amx_block_product: GGML type ", qtype, " is not one of Q4_0 (2), Q4_1 (3), Q8_0 (8)");
  }
  return 0;
}

#if defined(DRAFTSMITH_AMX_INT8)
// One block's integer sums for the tile's rows: weights (unpacked into `weights` if 4-bit) times x's block, into
// `sums`. Consecutive blocks use two sets of tiles (SUMS, X, W), meant to let one block's chain of tile loads,
// product and store overlap the next one's (tile registers are not renamed); measured in isolation it ran no
// faster than one set (the one-row product stays bound by that chain). A macro: the tile intrinsics take their
// tile numbers as literals.
template <int Q>
inline void amx_unpack_weights(const uint8_t* tile, uint8_t* weights) {
  // two 4-bit weights a byte: the low nibbles are the tile's first half, the high ones its second
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int i = 0; i < 4; ++i) {
    const __m512i v = _mm512_loadu_si512(tile + 64 * i);
    _mm512_store_si512(weights + 64 * i, _mm512_and_si512(v, nibble));
    _mm512_store_si512(weights + 256 + 64 * i, _mm512_and_si512(_mm512_srli_epi16(v, 4), nibble));
  }
}

#define DRAFTSMITH_AMX_BLOCK_SUMS(NAME, SUMS, X, W)                                                        \
  template <int Q>                                                                                         \
  inline void NAME(const uint8_t* tile, const int8_t* x, int64_t x_stride, uint8_t* weights, int32_t* sums) { \
    if constexpr (Q == kQ8_0) {                                                                            \
      _tile_loadd(W, tile, 64);                                                                            \
    } else {                                                                                               \
      amx_unpack_weights<Q>(tile, weights);                                                                \
      _tile_loadd(W, weights, 64);                                                                         \
    }                                                                                                      \
    _tile_loadd(X, x, x_stride);                                                                           \
    _tile_zero(SUMS);                                                                                      \
    if constexpr (Q == kQ8_0)                                                                              \
      _tile_dpbssd(SUMS, X, W);                                                                            \
    else                                                                                                   \
      _tile_dpbsud(SUMS, X, W);                                                                            \
    _tile_stored(SUMS, sums, 64);                                                                          \
  }
DRAFTSMITH_AMX_BLOCK_SUMS(amx_block_sums_even, 0, 1, 2)
DRAFTSMITH_AMX_BLOCK_SUMS(amx_block_sums_odd, 3, 4, 5)
#undef DRAFTSMITH_AMX_BLOCK_SUMS

// The float32 scaling of one block's sums into the rows' accumulators (16 weight rows each), in block order.
template <int Q>
inline void amx_block_scale(const uint8_t* tile, const int32_t* sums, const QuantizedRows& xq, int64_t first_block,
                            int64_t blocks, int64_t tile_rows, __m512* acc) {
  constexpr int64_t scales_at = Q == kQ8_0 ? 512 : 256;
  const __m512 dw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + scales_at)));
  const __m512 mw = Q == kQ4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile + scales_at + 32)))
                               : _mm512_setzero_ps();
  for (int64_t r = 0; r < tile_rows; ++r) {
    const int64_t rb = r * blocks + first_block;
    __m512i s = _mm512_load_si512(sums + 16 * r);
    if (Q == kQ4_0) s = _mm512_sub_epi32(s, _mm512_set1_epi32(8 * xq.sum[rb]));  // weights q - 8
    acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_set1_ps(xq.d[rb])), acc[r]);
    if (Q == kQ4_1) acc[r] = _mm512_fmadd_ps(mw, _mm512_set1_ps(xq.d[rb] * static_cast<float>(xq.sum[rb])), acc[r]);
  }
}

template <int Q>
void amx_block_groups(const QuantizedRows& xq, int64_t rows, int64_t blocks, const uint8_t* packed, float* out,
                      int64_t features, int64_t begin, int64_t end) {
  const int64_t tile_bytes = amx_tile_bytes(Q), in = blocks * kBlock;
  alignas(64) uint8_t weights[2][512];
  alignas(64) int32_t sums[2][16 * 16];
  AmxTileConfig config;
  for (int64_t r0 = 0; r0 < rows; r0 += 16) {
    const int64_t tile_rows = std::min<int64_t>(16, rows - r0);
    for (int t = 0; t < 2; ++t) {  // tiles 3t: sums (rows x 16 int32), 3t+1: x (rows x 32 int8), 3t+2: weights
      config.colsb[3 * t] = 64, config.rows[3 * t] = tile_rows;
      config.colsb[3 * t + 1] = 32, config.rows[3 * t + 1] = tile_rows;
      config.colsb[3 * t + 2] = 64, config.rows[3 * t + 2] = 8;
    }
    _tile_loadconfig(&config);
    const QuantizedRows* q = &xq;
    const int8_t* x = q->q.data() + r0 * in;
    for (int64_t g = begin; g < end; ++g) {
      const uint8_t* group = packed + g * blocks * tile_bytes;
      __m512 acc[16];
      for (int64_t r = 0; r < tile_rows; ++r) acc[r] = _mm512_setzero_ps();
      const int64_t row_block = r0 * blocks;
      int64_t b = 0;
      for (; b + 2 <= blocks; b += 2) {
        const uint8_t* tile = group + b * tile_bytes;
        _mm_prefetch(reinterpret_cast<const char*>(tile + 8 * tile_bytes), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(tile + 8 * tile_bytes + 64 * 4), _MM_HINT_T0);
        amx_block_sums_even<Q>(tile, x + b * kBlock, in, weights[0], sums[0]);
        amx_block_sums_odd<Q>(tile + tile_bytes, x + (b + 1) * kBlock, in, weights[1], sums[1]);
        amx_block_scale<Q>(tile, sums[0], xq, row_block + b, blocks, tile_rows, acc);
        amx_block_scale<Q>(tile + tile_bytes, sums[1], xq, row_block + b + 1, blocks, tile_rows, acc);
      }
      if (b < blocks) {
        amx_block_sums_even<Q>(group + b * tile_bytes, x + b * kBlock, in, weights[0], sums[0]);
        amx_block_scale<Q>(group + b * tile_bytes, sums[0], xq, row_block + b, blocks, tile_rows, acc);
      }
      const int64_t columns = std::min<int64_t>(16, features - g * 16);
      const __mmask16 mask = columns == 16 ? __mmask16(0xFFFF) : __mmask16((1u << columns) - 1);
      for (int64_t r = 0; r < tile_rows; ++r) _mm512_mask_storeu_ps(out + (r0 + r) * features + g * 16, mask, acc[r]);
    }
  }
  _tile_release();
}
#endif

bool amx_int8_supported() {
#if defined(DRAFTSMITH_AMX_INT8)
  return amx_permitted();
#else
  return false;
#endif
}

at::Tensor amx_block_product(const at::Tensor& x_in, const at::Tensor& packed, int64_t qtype, int64_t features) {
  TORCH_CHECK(amx_int8_supported(),
              "amx_block_product: these kernels were built for a CPU without AMX-INT8, or the OS refused its tiles");
  const at::Tensor x = x_in.contiguous();
  check_float_contiguous(x, "amx_block_product");
  TORCH_CHECK(packed.device().is_cpu() && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.dim() == 3 && packed.size(2) == amx_tile_bytes(qtype),
              "amx_block_product weight: a contiguous uint8 CPU tensor [out/16, in/32, tile bytes] is needed "
              "(amx_block_tiles)");
  const int64_t in = x.size(-1), rows = x.numel() / in, groups = packed.size(0), blocks = packed.size(1);
  TORCH_CHECK(blocks * kBlock == in && groups * 16 >= features && groups * 16 < features + 16,
              "amx_block_product: input size ", in, " and ", features, " outputs do not fit ", groups, " x ", blocks,
              " tiles");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = features;
  at::Tensor out = at::empty(shape, x.options());
#if defined(DRAFTSMITH_AMX_INT8)
  const QuantizedRows xq = quantize_rows(x.data_ptr<float>(), rows, in);
  const uint8_t* pw = packed.data_ptr<uint8_t>();
  float* po = out.data_ptr<float>();
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    switch (qtype) {
      case kQ4_0: amx_block_groups<kQ4_0>(xq, rows, blocks, pw, po, features, begin, end); break;
      case kQ4_1: amx_block_groups<kQ4_1>(xq, rows, blocks, pw, po, features, begin, end); break;
      default: amx_block_groups<kQ8_0>(xq, rows, blocks, pw, po, features, begin, end); break;
    }
  });
#endif
  return out;
}

// GGML blocks (row blocks of one product, in order, uint8 [rows, blocks * block bytes]) moved into the layout
// `amx_block_product` reads: per 16 weight rows (zero rows pad the last) and block of 32 inputs, the weights in
// TDPBSUD's order (4 inputs x 16 rows; a 4-bit row's 16 stored bytes already pair input i with i + 16 as the
// tile's two halves want), then the rows' float16 scales and, for Q4_1, their minimums. No number changes; a
// copy loop, so loading a model costs a memory pass rather than a chain of tensor reshapes.
at::Tensor amx_block_pack(at::TensorList parts, int64_t qtype) {
  const int64_t tile = amx_tile_bytes(qtype), size = block_bytes(qtype);
  TORCH_CHECK(!parts.empty(), "amx_block_pack: no weights given");
  const int64_t row_bytes = parts[0].size(-1);
  std::vector<const uint8_t*> row_data;
  for (const at::Tensor& part : parts) {
    TORCH_CHECK(part.device().is_cpu() && part.scalar_type() == at::kByte && part.dim() == 2 &&
                    part.is_contiguous() && part.size(1) == row_bytes && row_bytes % size == 0,
                "amx_block_pack: each part must be a contiguous uint8 CPU tensor [rows, ", row_bytes,
                "] of whole GGML blocks of ", size, " bytes");
    const uint8_t* base = part.data_ptr<uint8_t>();
    for (int64_t r = 0; r < part.size(0); ++r) row_data.push_back(base + r * row_bytes);
  }
  const int64_t rows = static_cast<int64_t>(row_data.size()), blocks = row_bytes / size, groups = (rows + 15) / 16;
  at::Tensor packed = at::zeros({groups, blocks, tile}, at::kByte);
  uint8_t* out = packed.data_ptr<uint8_t>();
  const int64_t quads = qtype == kQ8_0 ? 8 : 4, weights_at = qtype == kQ4_1 ? 4 : 2;
  const int64_t scales_at = qtype == kQ8_0 ? 512 : 256;
  at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      for (int64_t r = 0; r < 16 && g * 16 + r < rows; ++r) {
        const uint8_t* row = row_data[g * 16 + r];
        for (int64_t b = 0; b < blocks; ++b) {
          const uint8_t* block = row + b * size;
          uint8_t* dst = out + (g * blocks + b) * tile;
          for (int64_t quad = 0; quad < quads; ++quad)
            std::memcpy(dst + (quad * 16 + r) * 4, block + weights_at + quad * 4, 4);
          std::memcpy(dst + scales_at + r * 2, block, 2);
          if (qtype == kQ4_1) std::memcpy(dst + scales_at + 32 + r * 2, block + 2, 2);
        }
      }
    }
  });
  return packed;
}

// which vector instructions this build was compiled for (DRAFTSMITH_ISA=avx2 builds an AVX2 one on any x86 CPU)
std::string vector_isa() {
#if defined(__AVX512F__)
  return "avx512";
#elif defined(__AVX2__)
  return "avx2";
#else
  return "generic";
#endif
}

}  // namespace

TORCH_LIBRARY(draftsmith_fused, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor", &rms_norm);
  m.def("add_rms_norm(Tensor x, Tensor delta, Tensor weight, float eps) -> (Tensor, Tensor)", &add_rms_norm);
  m.def("silu_mul(Tensor gate_up) -> Tensor", &silu_mul);
  m.def("rope_write_kv(Tensor qkv, Tensor cos, Tensor signed_sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "int start, int heads, int kv_heads) -> Tensor", &rope_write_kv);
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, int length) -> Tensor", &decode_attention);
  m.def("tree_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor allowed, int start) -> Tensor",
        &tree_attention);
  m.def("half_product(Tensor x, Tensor weight) -> Tensor", &half_product);
  m.def("bf16_product(Tensor x, Tensor weight) -> Tensor", &bf16_product);
  m.def("bf16_dot_supported() -> bool", &bf16_dot_supported);
  m.def("amx_product(Tensor x, Tensor packed, int features) -> Tensor", &amx_product);
  m.def("amx_supported() -> bool", &amx_supported);
  m.def("block_product(Tensor x, Tensor blocks, int qtype) -> Tensor", &block_product);
  m.def("block_product_int8(Tensor x, Tensor blocks, int qtype) -> Tensor", &block_product_int8);
  m.def("amx_block_product(Tensor x, Tensor packed, int qtype, int features) -> Tensor", &amx_block_product);
  m.def("amx_int8_supported() -> bool", &amx_int8_supported);
  m.def("amx_block_pack(Tensor[] parts, int qtype) -> Tensor", &amx_block_pack);
  m.def("vector_isa() -> str", &vector_isa);
}
