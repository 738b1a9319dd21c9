// Cresset's matmul over GGUF-style weight blocks: `out[m, n] = Σ_k x[m, k] · w[n, k]` where each
// row of `w` is stored as blocks of 32 quantized values with a scale and a zero per block
// (`w = q·scale + zero`, both f16):
//   - 4-bit blocks: 16 bytes, byte j holding element j (low nibble) and element j + 16 (high
//     nibble), q in 0..15 (GGUF's Q4_0/Q4_1/Q4_K order);
//   - 8-bit blocks: 32 signed bytes (GGUF's Q8_0 order), q in -128..127.
// libtorch's int4 kernel tiles rows by four and decodes the weights again for every tile; this
// one decodes each block once and multiplies it with up to eight rows of `x`, which is what
// continuous batching needs (a decode step is a handful of rows).
//
// Paths: AVX2 + FMA + F16C where the CPU has them (chosen at run time), a scalar loop elsewhere
// (or when asked for, to test it). With AVX2, up to eight rows of x are rounded to int16 per
// block and multiplied in integer lanes (see `quantize_i16`); more rows take the float path,
// which first regroups x so that a block of all the rows of a pass lies in one place (see
// `pack`) and sums in f32, as the scalar loop does. Work is split over output rows with ATen's
// parallel_for (the same thread pool as every other op).
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <type_traits>

namespace {

constexpr int64_t BLOCK = 32;
constexpr int MAX_ROWS = 8;

// x [m, k] regrouped for the vectorized path: for each group of up to MAX_ROWS rows (starting at
// row r0, `rows` of them), block b of every row side by side: xp[r0·k + (b·rows + r)·32 + j] =
// x[r0 + r, b·32 + j]. The kernel then reads a block of all its rows from one address at
// constant offsets (eight row pointers do not fit the registers), in one forward stream.
void pack(const float* x, int64_t m, int64_t k, float* xp) {
  const int64_t kb_count = k / BLOCK;
  for (int64_t r0 = 0; r0 < m; r0 += MAX_ROWS) {
    const int64_t rows = std::min<int64_t>(MAX_ROWS, m - r0);
    for (int64_t b = 0; b < kb_count; ++b) {
      for (int64_t r = 0; r < rows; ++r) {
        std::memcpy(xp + r0 * k + (b * rows + r) * BLOCK, x + (r0 + r) * k + b * BLOCK,
                    BLOCK * sizeof(float));
      }
    }
  }
}

inline float half_to_float(uint16_t bits) {
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

// Block b of a weight row (its bytes `qrow`, its scale and zero pairs `szrow`) as 32 floats.
inline void decode_block(const uint8_t* qrow, const uint16_t* szrow, int64_t b, int bits,
                         float* w) {
  const float s = half_to_float(szrow[2 * b]);
  const float z = half_to_float(szrow[2 * b + 1]);
  if (bits == 4) {
    const uint8_t* qb = qrow + b * 16;
    for (int j = 0; j < 16; ++j) {
      w[j] = static_cast<float>(qb[j] & 0x0F) * s + z;
      w[j + 16] = static_cast<float>(qb[j] >> 4) * s + z;
    }
  } else {
    const int8_t* qb = reinterpret_cast<const int8_t*>(qrow + b * 32);
    for (int j = 0; j < 32; ++j) {
      w[j] = static_cast<float>(qb[j]) * s + z;
    }
  }
}

// One output element range [n0, n1) for rows [0, rows) of x (rows <= MAX_ROWS), scalar.
void scalar_rows(const float* x, int64_t ldx, int64_t rows, int64_t kb_count,
                 const uint8_t* q, int64_t row_bytes, const uint16_t* sz, int bits,
                 float* out, int64_t ldo, int64_t n0, int64_t n1) {
  float w[BLOCK];
  for (int64_t n = n0; n < n1; ++n) {
    float acc[MAX_ROWS] = {0};
    const uint8_t* qrow = q + n * row_bytes;
    const uint16_t* szrow = sz + n * kb_count * 2;
    for (int64_t b = 0; b < kb_count; ++b) {
      decode_block(qrow, szrow, b, bits, w);
      for (int64_t r = 0; r < rows; ++r) {
        const float* xb = x + r * ldx + b * BLOCK;
        float sum = 0.0f;
        for (int j = 0; j < BLOCK; ++j) {
          sum += xb[j] * w[j];
        }
        acc[r] += sum;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      out[r * ldo + n] = acc[r];
    }
  }
}

#if defined(__x86_64__)

__attribute__((target("avx2,fma,f16c"))) inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  __m128 shuf = _mm_movehdup_ps(lo);
  __m128 sums = _mm_add_ps(lo, shuf);
  shuf = _mm_movehl_ps(shuf, sums);
  sums = _mm_add_ss(sums, shuf);
  return _mm_cvtss_f32(sums);
}

// One block `b` of an output row: its 32 weights decoded (w = q·scale + zero) once and
// multiplied with each of ROWS rows of x into their partial sums.
template <int ROWS, int BITS, int SPLIT>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void avx2_block(
    __m256 (&acc)[ROWS][SPLIT], const float* xp, const uint8_t* qrow, int64_t b, __m256 vs,
    __m256 vz) {
  __m256 w[4];
  if constexpr (BITS == 4) {
    const __m128i low_mask = _mm_set1_epi8(0x0F);
    const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + b * 16));
    const __m128i lo = _mm_and_si128(raw, low_mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low_mask);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  } else {
    const uint8_t* qb = qrow + b * 32;
    for (int i = 0; i < 4; ++i) {
      const __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(qb + 8 * i));
      w[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
    }
  }
  for (int i = 0; i < 4; ++i) {
    w[i] = _mm256_fmadd_ps(w[i], vs, vz);
  }
  // Rows inner: consecutive multiply-adds go to different sums, so none waits on the last.
  // The rows' 32 values of this block lie together (see `pack`): one address, constant offsets.
  const float* xb = xp + b * ROWS * BLOCK;
  for (int i = 0; i < 4; ++i) {
    for (int r = 0; r < ROWS; ++r) {
      const __m256 xv = _mm256_loadu_ps(xb + r * BLOCK + 8 * i);
      acc[r][i % SPLIT] = _mm256_fmadd_ps(w[i], xv, acc[r][i % SPLIT]);
    }
  }
}

// ROWS rows of x, packed (see `pack`), against output rows [n0, n1). With one or two rows, each
// row keeps several partial sums so that consecutive multiply-adds do not wait on each other.
template <int ROWS, int BITS>
__attribute__((target("avx2,fma,f16c"))) void avx2_rows(
    const float* xp, int64_t kb_count, const uint8_t* q, int64_t row_bytes, const uint16_t* sz,
    float* out, int64_t ldo, int64_t n0, int64_t n1) {
  constexpr int SPLIT = ROWS == 1 ? 4 : (ROWS == 2 ? 2 : 1);
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[ROWS][SPLIT];
    for (int r = 0; r < ROWS; ++r) {
      for (int p = 0; p < SPLIT; ++p) {
        acc[r][p] = _mm256_setzero_ps();
      }
    }
    const uint8_t* qrow = q + n * row_bytes;
    const uint16_t* szrow = sz + n * kb_count * 2;
    // Scales and zeros four blocks at a time: eight f16 values converted at once, each
    // block's pair broadcast from them.
    int64_t b = 0;
    for (; b + 4 <= kb_count; b += 4) {
      const __m256 pairs = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(szrow + 2 * b)));
      for (int j = 0; j < 4; ++j) {
        const __m256 vs = _mm256_permutevar8x32_ps(pairs, _mm256_set1_epi32(2 * j));
        const __m256 vz = _mm256_permutevar8x32_ps(pairs, _mm256_set1_epi32(2 * j + 1));
        avx2_block<ROWS, BITS, SPLIT>(acc, xp, qrow, b + j, vs, vz);
      }
    }
    for (; b < kb_count; ++b) {
      const __m256 vs = _mm256_set1_ps(_cvtsh_ss(szrow[2 * b]));
      const __m256 vz = _mm256_set1_ps(_cvtsh_ss(szrow[2 * b + 1]));
      avx2_block<ROWS, BITS, SPLIT>(acc, xp, qrow, b, vs, vz);
    }
    for (int r = 0; r < ROWS; ++r) {
      __m256 total = acc[r][0];
      for (int p = 1; p < SPLIT; ++p) {
        total = _mm256_add_ps(total, acc[r][p]);
      }
      out[r * ldo + n] = hsum(total);
    }
  }
}

// The few-row path: each row of x rounded to int16 per block of 32 (x ≈ xq·dx, dx = max|x| /
// 32767, so each value moves by at most about max|x| / 64000 of its block: half a step, plus
// the f32 roundings of 1/dx and of x/dx), and the weights' integers multiplied with it in integer
// lanes (`madd`: sixteen products a step, where a float multiply-add takes eight, and no
// conversion of the weights to float):
//   Σ_j x_j·(q_j·s + z) = s·dx·Σ_j xq_j·q_j + z·Σ_j x_j,
// the second sum an f32 sum of x itself (untouched by the int16 rounding). Each int32 lane sums
// four products, at most 4 · 128 · 32767 < 2²⁴, so it also converts to f32 exactly. A block
// whose largest value is under 1e-30 counts as zeros (1/dx would overflow): a value then moves
// by under 1e-30. Used for up to eight rows (a decode step, a short prompt): measured on
// SmolLM2's shapes (examples/qblock_probe) 2-3x the float path at one row, 1.2-1.8x at four,
// 1.05-1.5x at eight; at 16 and 32 rows (prompts) the float path was faster, and they keep it.

// x [m, k] as int16 per block (xq, [m, k]) with, per row and block, the pair (dx, Σx) (meta,
// [m, k/32, 2]), laid out to multiply the weights' (scale, zero) pairs lane by lane.
__attribute__((target("avx2,fma,f16c"))) void quantize_i16(const float* x, int64_t m, int64_t k,
                                                           int16_t* xq, float* meta) {
  const int64_t kb_count = k / BLOCK;
  const __m256 sign = _mm256_set1_ps(-0.0f);
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t b = 0; b < kb_count; ++b) {
      const float* xb = x + r * k + b * BLOCK;
      __m256 v[4];
      __m256 amax = _mm256_setzero_ps();
      __m256 sum = _mm256_setzero_ps();
      for (int i = 0; i < 4; ++i) {
        v[i] = _mm256_loadu_ps(xb + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
        sum = _mm256_add_ps(sum, v[i]);
      }
      // Horizontal max.
      __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
      m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
      m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
      const float top = _mm_cvtss_f32(m4);
      const bool tiny = !(top >= 1e-30f);  // Also NaN.
      const float dx = tiny ? 0.0f : top / 32767.0f;
      const float inv = tiny ? 0.0f : 32767.0f / top;
      const __m256 vinv = _mm256_set1_ps(inv);
      int16_t* qb = xq + r * k + b * BLOCK;
      for (int i = 0; i < 4; i += 2) {
        const __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], vinv));
        const __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], vinv));
        // packs interleaves 128-bit lanes: put them back in order.
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 8 * i), packed);
      }
      meta[(r * kb_count + b) * 2] = dx;
      meta[(r * kb_count + b) * 2 + 1] = hsum(sum);
    }
  }
}

// Σ_j xq_j·q_j of one block as eight int32 lanes.
template <int BITS>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256i i16_block(
    const __m256i w_lo, const __m256i w_hi, const int16_t* xb) {
  const __m256i x_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb));
  const __m256i x_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16));
  return _mm256_add_epi32(_mm256_madd_epi16(w_lo, x_lo), _mm256_madd_epi16(w_hi, x_hi));
}

// A block's 32 weight integers as two vectors of sixteen int16: elements 0..15 and 16..31.
template <int BITS>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline void i16_weights(
    const uint8_t* qrow, int64_t b, __m256i& lo, __m256i& hi) {
  if constexpr (BITS == 4) {
    const __m256i bytes = _mm256_cvtepu8_epi16(
        _mm_loadu_si128(reinterpret_cast<const __m128i*>(qrow + b * 16)));
    lo = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
    hi = _mm256_srli_epi16(bytes, 4);
  } else {
    const uint8_t* qb = qrow + b * 32;
    lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb)));
    hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qb + 16)));
  }
}

// ROWS rows of x in int16 (see `quantize_i16`; row stride k) against output rows [n0, n1).
template <int ROWS, int BITS>
__attribute__((target("avx2,fma,f16c"))) void avx2_rows_i16(
    const int16_t* xq, const float* meta, int64_t k, int64_t kb_count, const uint8_t* q,
    int64_t row_bytes, const uint16_t* sz, float* out, int64_t ldo, int64_t n0, int64_t n1) {
  // One row keeps two sums so that consecutive blocks' multiply-adds do not wait on each other.
  constexpr int SPLIT = ROWS == 1 ? 2 : 1;
  for (int64_t n = n0; n < n1; ++n) {
    __m256 acc[ROWS][SPLIT];
    // Even lanes: nothing of use; odd lanes: Σ z·Σx over groups of four blocks.
    __m256 zacc[ROWS];
    float ztail[ROWS];
    for (int r = 0; r < ROWS; ++r) {
      for (int p = 0; p < SPLIT; ++p) {
        acc[r][p] = _mm256_setzero_ps();
      }
      zacc[r] = _mm256_setzero_ps();
      ztail[r] = 0.0f;
    }
    const uint8_t* qrow = q + n * row_bytes;
    const uint16_t* szrow = sz + n * kb_count * 2;
    int64_t b = 0;
    for (; b + 4 <= kb_count; b += 4) {
      // (s, z) of four blocks times each row's (dx, Σx): (s·dx, z·Σx) per block.
      const __m256 pairs = _mm256_cvtph_ps(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(szrow + 2 * b)));
      __m256 prod[ROWS];
      for (int r = 0; r < ROWS; ++r) {
        prod[r] = _mm256_mul_ps(pairs, _mm256_loadu_ps(meta + (r * kb_count + b) * 2));
        zacc[r] = _mm256_add_ps(zacc[r], prod[r]);
      }
      for (int j = 0; j < 4; ++j) {
        __m256i lo, hi;
        i16_weights<BITS>(qrow, b + j, lo, hi);
        const __m256i at = _mm256_set1_epi32(2 * j);
        for (int r = 0; r < ROWS; ++r) {
          const __m256i isum = i16_block<BITS>(lo, hi, xq + r * k + (b + j) * BLOCK);
          acc[r][j % SPLIT] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum),
                                              _mm256_permutevar8x32_ps(prod[r], at),
                                              acc[r][j % SPLIT]);
        }
      }
    }
    for (; b < kb_count; ++b) {
      const float s = _cvtsh_ss(szrow[2 * b]);
      const float z = _cvtsh_ss(szrow[2 * b + 1]);
      __m256i lo, hi;
      i16_weights<BITS>(qrow, b, lo, hi);
      for (int r = 0; r < ROWS; ++r) {
        const float* mb = meta + (r * kb_count + b) * 2;
        const __m256i isum = i16_block<BITS>(lo, hi, xq + r * k + b * BLOCK);
        acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_set1_ps(s * mb[0]),
                                    acc[r][0]);
        ztail[r] += z * mb[1];
      }
    }
    const __m256 odd = _mm256_castsi256_ps(
        _mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));
    for (int r = 0; r < ROWS; ++r) {
      __m256 total = acc[r][0];
      for (int p = 1; p < SPLIT; ++p) {
        total = _mm256_add_ps(total, acc[r][p]);
      }
      out[r * ldo + n] = hsum(total) + hsum(_mm256_and_ps(zacc[r], odd)) + ztail[r];
    }
  }
}

// `f(std::integral_constant<int, R>{})` with R = rows (1 to 8; more count as 8): the run-time row
// count as the kernels' compile-time one.
template <typename F>
void by_rows(int64_t rows, F&& f) {
  switch (rows) {
    case 1: f(std::integral_constant<int, 1>{}); break;
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 3: f(std::integral_constant<int, 3>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 5: f(std::integral_constant<int, 5>{}); break;
    case 6: f(std::integral_constant<int, 6>{}); break;
    case 7: f(std::integral_constant<int, 7>{}); break;
    default: f(std::integral_constant<int, 8>{}); break;
  }
}

template <int BITS>
void avx2_dispatch_i16(int64_t rows, const int16_t* xq, const float* meta, int64_t k,
                       int64_t kb_count, const uint8_t* q, int64_t row_bytes, const uint16_t* sz,
                       float* out, int64_t ldo, int64_t n0, int64_t n1) {
  by_rows(rows, [&](auto r) {
    avx2_rows_i16<decltype(r)::value, BITS>(xq, meta, k, kb_count, q, row_bytes, sz, out, ldo,
                                            n0, n1);
  });
}

template <int BITS>
void avx2_dispatch(int64_t rows, const float* xp, int64_t kb_count, const uint8_t* q,
                   int64_t row_bytes, const uint16_t* sz, float* out, int64_t ldo, int64_t n0,
                   int64_t n1) {
  by_rows(rows, [&](auto r) {
    avx2_rows<decltype(r)::value, BITS>(xp, kb_count, q, row_bytes, sz, out, ldo, n0, n1);
  });
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          __builtin_cpu_supports("f16c");
  return has;
}

#else

bool cpu_has_avx2() { return false; }

#endif

}  // namespace

extern "C" {

// Whether the vectorized path runs on this CPU.
int cresset_qblock_vectorized() { return cpu_has_avx2() ? 1 : 0; }

// out[m, n] (f32, row stride n) = x[m, k] (f32, contiguous) · wᵀ, for w given as `n` rows of
// k / 32 blocks of `bits` (4 or 8) bits each, with scale and zero pairs `sz` (f16, n × k/32 × 2).
// `path`: 0 the fastest for this CPU and row count, 1 the scalar loop, 2 the vectorized float path
// whatever the row count (1 and 2 for tests and probes). The caller checks the shapes: k a
// multiple of 32, q of n × (k/32 × bits × 4) bytes. Returns 0, or 1 if an exception stopped it.
int cresset_qblock_matmul(const float* x, int64_t m, int64_t k, const uint8_t* q,
                          const uint16_t* sz, int64_t n, int bits, float* out, int path) {
  try {
    if (m <= 0 || n <= 0) {
      return 0;  // Nothing to compute (and the row dispatch below assumes at least one row).
    }
    const int64_t kb_count = k / BLOCK;
    const int64_t row_bytes = kb_count * (bits == 4 ? 16 : 32);
    const bool vectorized = path != 1 && cpu_has_avx2();
    // Enough output rows per task that each thread streams long runs of weights.
    const int64_t grain = std::max<int64_t>(16, 4096 / std::max<int64_t>(kb_count, 1));
#if defined(__x86_64__)
    if (vectorized && path == 0 && m <= MAX_ROWS) {
      std::unique_ptr<int16_t[]> xq(new int16_t[static_cast<size_t>(m * k)]);
      std::unique_ptr<float[]> meta(new float[static_cast<size_t>(m * kb_count * 2)]);
      quantize_i16(x, m, k, xq.get(), meta.get());
      at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) {
        if (bits == 4) {
          avx2_dispatch_i16<4>(m, xq.get(), meta.get(), k, kb_count, q, row_bytes, sz, out, n,
                               n0, n1);
        } else {
          avx2_dispatch_i16<8>(m, xq.get(), meta.get(), k, kb_count, q, row_bytes, sz, out, n,
                               n0, n1);
        }
      });
      return 0;
    }
#endif
    // One row needs no regrouping.
    std::unique_ptr<float[]> packed;
    const float* xp = x;
    if (vectorized && m > 1) {
      packed.reset(new float[static_cast<size_t>(m * k)]);
      pack(x, m, k, packed.get());
      xp = packed.get();
    }
    auto run = [&](int64_t n0, int64_t n1) {
      for (int64_t r0 = 0; r0 < m; r0 += MAX_ROWS) {
        const int64_t rows = std::min<int64_t>(MAX_ROWS, m - r0);
        const float* xr = x + r0 * k;
        float* outr = out + r0 * n;
#if defined(__x86_64__)
        if (vectorized) {
          const float* xg = xp + r0 * k;
          if (bits == 4) {
            avx2_dispatch<4>(rows, xg, kb_count, q, row_bytes, sz, outr, n, n0, n1);
          } else {
            avx2_dispatch<8>(rows, xg, kb_count, q, row_bytes, sz, outr, n, n0, n1);
          }
          continue;
        }
#endif
        scalar_rows(xr, k, rows, kb_count, q, row_bytes, sz, bits, outr, n, n0, n1);
      }
    };
    at::parallel_for(0, n, grain, run);
    return 0;
  } catch (...) {
    return 1;
  }
}

// w (f32, n × k, contiguous) = the weight the blocks hold, decoded as the scalar path decodes
// it (for the word-embedding rows a tied head's blocks give, and for tests). Same layout and
// checks as cresset_qblock_matmul. Returns 0, or 1 on an exception. (A dense matmul on the
// decoded weight for prompts being prefilled was measured no faster than the kernel at 128 to
// 240 rows on SmolLM2's layers: decoding into fresh memory costs what the matmul saves.)
int cresset_qblock_dequantize(const uint8_t* q, const uint16_t* sz, int64_t n, int64_t k,
                              int bits, float* w) {
  try {
    const int64_t kb_count = k / BLOCK;
    const int64_t row_bytes = kb_count * (bits == 4 ? 16 : 32);
    at::parallel_for(0, n, 64, [&](int64_t n0, int64_t n1) {
      for (int64_t r = n0; r < n1; ++r) {
        const uint8_t* qrow = q + r * row_bytes;
        const uint16_t* szrow = sz + r * kb_count * 2;
        float* wrow = w + r * k;
        for (int64_t b = 0; b < kb_count; ++b) {
          decode_block(qrow, szrow, b, bits, wrow + b * BLOCK);
        }
      }
    });
    return 0;
  } catch (...) {
    return 1;
  }
}

}  // extern "C"
