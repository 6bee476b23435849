// The attention kernels' inner loops over rows of floats: e^x, max, dot products and scaled sums, 16 lanes at a time
// with AVX-512 and as plain loops elsewhere. (GCC keeps float reductions in order, so plain max/sum loops compile to
// scalar code even at -O3: written out, they run about 10× faster here.) e^x is scalef(2^n, Taylor polynomial of
// e^r) with |r| ≤ ln2 / 2 (relative error below 2e-7), and 0 below e^-87, float's smallest normal, so neither
// masked scores (-inf) nor denormals reach the sums.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace sparkgpt {

#if defined(__AVX512F__)
inline __m512 exp16(__m512 x) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GE_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln 2 in two parts: r is exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));  // p · 2^n
}

// f(offset, lanes) over [begin, end) in blocks of 16, the last one masked.
template <typename F>
inline void for_lanes(int64_t begin, int64_t end, F f) {
  for (int64_t j = begin; j < end; j += 16) {
    const int64_t left = end - j;
    f(j, left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1));
  }
}

// 16 values of a float or bf16 row as floats (masked lanes 0).
inline __m512 load16(const float* row, __mmask16 lanes) { return _mm512_maskz_loadu_ps(lanes, row); }
inline __m512 load16(const c10::BFloat16* row, __mmask16 lanes) {
  const __m256i bits = _mm256_maskz_loadu_epi16(lanes, row);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// 16 floats rounded to bf16 (nearest even), as their 16-bit patterns.
inline __m256i bf16_bits(__m512 x) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(x));
#else
  const __m512i bits = _mm512_castps_si512(x);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16));
#endif
}

inline void store16(float* row, __m512 x, __mmask16 lanes) { _mm512_mask_storeu_ps(row, lanes, x); }
inline void store16(c10::BFloat16* row, __m512 x, __mmask16 lanes) {
  _mm256_mask_storeu_epi16(row, lanes, bf16_bits(x));
}

// x rounded to bf16 and read back as float
inline __m512 round16(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits(x)), 16));
}
#endif

// out[j] = e^(row[j] · scale - shift) over [low, high), out float (may be row itself) or bf16; returns the sum of
// the unrounded values.
template <typename T>
inline float exp_row(const float* row, T* out, int64_t low, int64_t high, float scale, float shift) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512 total = _mm512_setzero_ps();
  for_lanes(low, high, [&](int64_t j, __mmask16 lanes) {
    const __m512 x = _mm512_maskz_loadu_ps(lanes, row + j);
    const __m512 e = exp16(_mm512_fmsub_ps(x, _mm512_set1_ps(scale), _mm512_set1_ps(shift)));
    store16(out + j, e, lanes);
    total = _mm512_mask_add_ps(total, lanes, total, e);
  });
  return _mm512_reduce_add_ps(total);
#else
  float total = 0.f;
  for (int64_t j = low; j < high; ++j) {
    const float e = std::exp(row[j] * scale - shift);
    out[j] = static_cast<T>(e);
    total += e;
  }
  return total;
#endif
}

inline float exp_row(float* row, int64_t low, int64_t high, float scale, float shift) {
  return exp_row(row, row, low, high, scale, shift);
}

inline float max_row(const float* row, int64_t low, int64_t high) {
#if defined(__AVX512F__)
  __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  for_lanes(low, high, [&](int64_t j, __mmask16 lanes) {
    top = _mm512_mask_max_ps(top, lanes, top, _mm512_maskz_loadu_ps(lanes, row + j));
  });
  return _mm512_reduce_max_ps(top);
#else
  float top = -std::numeric_limits<float>::infinity();
  for (int64_t j = low; j < high; ++j) top = std::max(top, row[j]);
  return top;
#endif
}

// Σ a[i] · b[i] over n values, each float or bf16.
template <typename A, typename B>
inline float dot(const A* a, const B* b, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512 sum = _mm512_setzero_ps();
  for_lanes(0, n, [&](int64_t i, __mmask16 lanes) {
    sum = _mm512_fmadd_ps(load16(a + i, lanes), load16(b + i, lanes), sum);
  });
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.f;
  for (int64_t i = 0; i < n; ++i) sum += static_cast<float>(a[i]) * static_cast<float>(b[i]);
  return sum;
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The 16 sums of the lanes of v[0..16), in one register (lane c: Σ v[c]): pairs of registers added in halves, then
// quarters, then 128-bit lanes.
inline __m512 sum_lanes16(__m512 v[16]) {
  __m512 half[8], quarter[4], lanes[2];
  for (int i = 0; i < 8; ++i)  // lane L of half[i]: partial sums of v[2i] and v[2i + 1], interleaved
    half[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // 128-bit lane L of quarter[i]: v[4i..4i+4)'s sums over that lane
    quarter[i] = _mm512_add_ps(
        _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(half[2 * i]), _mm512_castps_pd(half[2 * i + 1]))),
        _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(half[2 * i]), _mm512_castps_pd(half[2 * i + 1]))));
  for (int i = 0; i < 2; ++i)
    lanes[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quarter[2 * i], quarter[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(quarter[2 * i], quarter[2 * i + 1], 0xDD));
  return _mm512_add_ps(_mm512_shuffle_f32x4(lanes[0], lanes[1], 0x88),
                       _mm512_shuffle_f32x4(lanes[0], lanes[1], 0xDD));
}
#endif

// out[j] = q · rows[j] for `count` rows [count, n] (float or bf16) and a float q, sixteen rows at a time with
// AVX-512 (their sums reduced together: one reduction per sixteen, not per row). A row's sum is the same whichever
// block it falls in and however many rows follow it (each lane of `sum_lanes16` adds its own register alone; a last
// block's missing rows repeat its last one and are dropped), so a decode row's scores never depend on the batch's longest row.
template <typename T>
inline void dot_rows(const float* q, const T* rows, int64_t count, int64_t n, float* out) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (int64_t j = 0; j < count; j += 16) {
    const int64_t block = std::min<int64_t>(16, count - j);
    const T* row[16];  // past the last row: the last row again, its sums dropped
    for (int r = 0; r < 16; ++r) row[r] = rows + (j + std::min<int64_t>(r, block - 1)) * n;
    __m512 sums[16];
    for (int r = 0; r < 16; ++r) sums[r] = _mm512_setzero_ps();
    for_lanes(0, n, [&](int64_t i, __mmask16 lanes) {
      const __m512 x = load16(q + i, lanes);
      for (int r = 0; r < 16; ++r) sums[r] = _mm512_fmadd_ps(x, load16(row[r] + i, lanes), sums[r]);
    });
    _mm512_mask_storeu_ps(out + j, static_cast<__mmask16>((1u << block) - 1), sum_lanes16(sums));
  }
#else
  for (int64_t j = 0; j < count; ++j) out[j] = dot(q, rows + j * n, n);
#endif
}

// acc[i] += weight · v[i] over n values, v float or bf16.
template <typename T>
inline void add_scaled(float* acc, float weight, const T* v, int64_t n) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for_lanes(0, n, [&](int64_t i, __mmask16 lanes) {
    const __m512 sum = _mm512_fmadd_ps(_mm512_set1_ps(weight), load16(v + i, lanes),
                                       _mm512_maskz_loadu_ps(lanes, acc + i));
    _mm512_mask_storeu_ps(acc + i, lanes, sum);
  });
#else
  for (int64_t i = 0; i < n; ++i) acc[i] += weight * static_cast<float>(v[i]);
#endif
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// weighted_sum's columns [c0, c0 + 16 · V) kept in registers across the rows (the last vector masked to `last`).
template <int V, typename T>
inline void weighted_columns(const float* weights, const T* rows, int64_t count, int64_t n, int64_t c0,
                             __mmask16 last, float* out) {
  __m512 acc[V];
  for (int v = 0; v < V; ++v) acc[v] = _mm512_setzero_ps();
  for (int64_t j = 0; j < count; ++j) {
    if (weights[j] == 0.f) continue;
    const __m512 weight = _mm512_set1_ps(weights[j]);
    for (int v = 0; v < V; ++v)
      acc[v] = _mm512_fmadd_ps(weight, load16(rows + j * n + c0 + 16 * v, v == V - 1 ? last : 0xFFFF), acc[v]);
  }
  for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(out + c0 + 16 * v, v == V - 1 ? last : 0xFFFF, acc[v]);
}
#endif

// out[i] = Σ_j weights[j] · rows[j][i] (rows [count, n], float or bf16; rows of weight 0 skipped), each sum in the
// order of j, as `add_scaled` row after row gives it, with the sums in registers rather than in memory.
template <typename T>
inline void weighted_sum(const float* weights, const T* rows, int64_t count, int64_t n, float* out) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for (int64_t c0 = 0; c0 < n; c0 += 128) {
    const int64_t left = std::min<int64_t>(128, n - c0), vectors = (left + 15) / 16;
    const __mmask16 last = left % 16 == 0 ? static_cast<__mmask16>(0xFFFF)
                                          : static_cast<__mmask16>((1u << (left % 16)) - 1);
    switch (vectors) {
      case 1: weighted_columns<1>(weights, rows, count, n, c0, last, out); break;
      case 2: weighted_columns<2>(weights, rows, count, n, c0, last, out); break;
      case 3: weighted_columns<3>(weights, rows, count, n, c0, last, out); break;
      case 4: weighted_columns<4>(weights, rows, count, n, c0, last, out); break;
      case 5: weighted_columns<5>(weights, rows, count, n, c0, last, out); break;
      case 6: weighted_columns<6>(weights, rows, count, n, c0, last, out); break;
      case 7: weighted_columns<7>(weights, rows, count, n, c0, last, out); break;
      default: weighted_columns<8>(weights, rows, count, n, c0, last, out); break;
    }
  }
#else
  std::fill(out, out + n, 0.f);
  for (int64_t j = 0; j < count; ++j)
    if (weights[j] != 0.f) add_scaled(out, weights[j], rows + j * n, n);
#endif
}

// out[i] = bf16(scale · in[i]) over n values, rounded to nearest even.
inline void to_bf16(const float* in, c10::BFloat16* out, int64_t n, float scale = 1.f) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  for_lanes(0, n, [&](int64_t i, __mmask16 lanes) {
    store16(out + i, _mm512_mul_ps(_mm512_maskz_loadu_ps(lanes, in + i), _mm512_set1_ps(scale)), lanes);
  });
#else
  for (int64_t i = 0; i < n; ++i) out[i] = c10::BFloat16(in[i] * scale);
#endif
}

}  // namespace sparkgpt
