// The attention of a CPU decode step in one call: each row (a sequence) brings one new position.
// For every row: the rotary embedding on its query and key heads (in place), its new key and
// value written into its slot of the cache, then, per query head, softmax(q·Kᵀ / √d)·V over the
// row's positions 0..=pos (the causal mask of a single new position: the keys past it, stale or
// never written, are not read). Done op by op, this is some thirty libtorch calls per layer
// (rotary, an indexed cache write, the mask, scaled_dot_product_attention and its reshapes),
// whose dispatch cost more than their arithmetic at SmolLM2's sizes.
//
// f32 only. Rows × heads are split over ATen's thread pool (the same one as every other op).
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

float dot_scalar(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

void axpy_scalar(float a, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    y[i] += a * x[i];
  }
}

#if defined(__x86_64__)

__attribute__((target("avx2,fma"))) float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps();
  __m256 acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  }
  acc0 = _mm256_add_ps(acc0, acc1);
  __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  float s = _mm_cvtss_f32(lo);
  for (; i < n; ++i) {
    s += a[i] * b[i];
  }
  return s;
}

__attribute__((target("avx2,fma"))) void axpy_avx2(float a, const float* x, float* y,
                                                   int64_t n) {
  const __m256 va = _mm256_set1_ps(a);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  }
  for (; i < n; ++i) {
    y[i] += a * x[i];
  }
}

bool has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return has;
}

#else

float dot_avx2(const float* a, const float* b, int64_t n) { return dot_scalar(a, b, n); }
void axpy_avx2(float a, const float* x, float* y, int64_t n) { axpy_scalar(a, x, y, n); }
bool has_avx2() { return false; }

#endif

}  // namespace

extern "C" {

// qkv: [rows, (heads + 2·kv_heads)·head_dim] f32, each row its query heads, key heads and value
// heads in that order; rotated in place. cos, sin: [rows, head_dim] f32, the rotary tables at
// each row's position (sin with the sign of rotate-half folded in: the first half negated), or
// both null for a model without rotary positions. positions, slots: [rows], each row's new
// position and its cache slot. keys, values: [slot count, kv_heads, capacity, head_dim] f32.
// out: [rows, heads·head_dim] f32. The caller checks every extent: slots below the slot count,
// positions below the capacity, heads a multiple of kv_heads, head_dim even, distinct slots.
// Returns 0, or 1 if an exception stopped it.
int cresset_decode_attention(float* qkv, const float* cos, const float* sin,
                             const int64_t* positions, const int64_t* slots, float* keys,
                             float* values, int64_t rows, int64_t heads, int64_t kv_heads,
                             int64_t head_dim, int64_t capacity, float* out) {
  try {
    const int64_t width = (heads + 2 * kv_heads) * head_dim;
    const int64_t half = head_dim / 2;
    std::vector<float> orig(static_cast<size_t>(head_dim));
    for (int64_t r = 0; r < rows; ++r) {
      float* row = qkv + r * width;
      if (cos != nullptr) {
        // x·cos + roll(x, half)·sin over the query and key heads, as the op-by-op path does.
        const float* c = cos + r * head_dim;
        const float* s = sin + r * head_dim;
        for (int64_t h = 0; h < heads + kv_heads; ++h) {
          float* x = row + h * head_dim;
          std::memcpy(orig.data(), x, sizeof(float) * head_dim);
          for (int64_t i = 0; i < head_dim; ++i) {
            const float rolled = orig[(i + half) % head_dim];
            x[i] = orig[i] * c[i] + rolled * s[i];
          }
        }
      }
      const int64_t pos = positions[r];
      for (int64_t g = 0; g < kv_heads; ++g) {
        const int64_t at = ((slots[r] * kv_heads + g) * capacity + pos) * head_dim;
        std::memcpy(keys + at, row + (heads + g) * head_dim, sizeof(float) * head_dim);
        std::memcpy(values + at, row + (heads + kv_heads + g) * head_dim,
                    sizeof(float) * head_dim);
      }
    }
    const int64_t group = heads / kv_heads;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
    const bool avx2 = has_avx2();
    at::parallel_for(0, rows * heads, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> p;
      for (int64_t t = begin; t < end; ++t) {
        const int64_t r = t / heads;
        const int64_t h = t % heads;
        const int64_t g = h / group;
        const float* q = qkv + r * width + h * head_dim;
        const int64_t n = positions[r] + 1;
        const float* k = keys + (slots[r] * kv_heads + g) * capacity * head_dim;
        const float* v = values + (slots[r] * kv_heads + g) * capacity * head_dim;
        p.resize(static_cast<size_t>(n));
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < n; ++j) {
          const float* kj = k + j * head_dim;
          p[j] = (avx2 ? dot_avx2(q, kj, head_dim) : dot_scalar(q, kj, head_dim)) * scale;
          top = std::max(top, p[j]);
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
          p[j] = std::exp(p[j] - top);
          sum += p[j];
        }
        float* o = out + r * heads * head_dim + h * head_dim;
        std::fill(o, o + head_dim, 0.0f);
        const float inv = 1.0f / sum;
        for (int64_t j = 0; j < n; ++j) {
          const float* vj = v + j * head_dim;
          if (avx2) {
            axpy_avx2(p[j] * inv, vj, o, head_dim);
          } else {
            axpy_scalar(p[j] * inv, vj, o, head_dim);
          }
        }
      }
    });
    return 0;
  } catch (...) {
    return 1;
  }
}

}  // extern "C"
