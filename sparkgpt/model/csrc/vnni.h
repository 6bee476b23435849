// Operand layouts for oneDNN's bf16 micro-kernel (attention_bf16.cpp), built with 32-bit moves.
//
// The micro-kernel's right-hand operand B [K, N] is read in panels of at most 64 columns, each with pairs of rows
// interleaved ("VNNI": element (k, n) of a panel of width w at (k / 2) · 2w + 2n + k % 2). Two facts make every
// layout the attention needs a 32-bit transpose or an interleave:
//   - the VNNI panel of Xᵀ (X row-major [n, k]) is X read as 32-bit words (pairs of bf16 along a row), transposed;
//   - a bf16 transpose is that 32-bit transpose with each word then split into its two halves.
// With AVX-512 a 16 × 16 block of words is transposed in registers (three rounds of shuffles); plain loops
// elsewhere. All functions take bf16 bit patterns and never round.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#include "vector_math.h"

namespace sparkgpt::vnni {

using bf16 = c10::BFloat16;
constexpr int64_t PANEL = 64;  // columns per packed panel of B

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The 16 × 16 words r[0..16) (row i in r[i]) transposed in place: r[i] becomes column i.
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 8; ++i) {  // within each 128-bit lane: pairs of rows, word by word
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; ++i) {  // u[4i + c], lane L: rows 4i..4i+3 of column 4L + c
    u[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int c = 0; c < 4; ++c) {  // gather lane L of u[c], u[4 + c], u[8 + c], u[12 + c] into column 4L + c
    const __m512i even_low = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
    const __m512i odd_low = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
    const __m512i even_high = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i odd_high = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_i32x4(even_low, even_high, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(even_low, even_high, 0xDD);
    r[4 + c] = _mm512_shuffle_i32x4(odd_low, odd_high, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(odd_low, odd_high, 0xDD);
  }
}

inline __mmask16 first_lanes(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1);
}

// Words [c0, c0 + 16) of rows [r0, r0 + 16) of a [rows, cols] word matrix (row stride ld), transposed into r;
// words past the matrix are 0.
inline void load_block(const uint32_t* src, int64_t rows, int64_t cols, int64_t ld, int64_t r0, int64_t c0,
                       __m512i r[16]) {
  const __mmask16 lanes = first_lanes(cols - c0);
  for (int64_t i = 0; i < 16; ++i)
    r[i] = r0 + i < rows ? _mm512_maskz_loadu_epi32(lanes, src + (r0 + i) * ld + c0) : _mm512_setzero_si512();
  transpose16x16(r);
}
#endif

// dst = X transposed as 32-bit words: X [rows, cols] words (row stride ld_src) to dst [cols, padded_rows] (row
// stride ld_dst), zero in columns rows..padded_rows.
inline void transpose_words(const uint32_t* src, int64_t rows, int64_t cols, int64_t ld_src, int64_t padded_rows,
                            uint32_t* dst, int64_t ld_dst) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512i r[16];
  for (int64_t r0 = 0; r0 < padded_rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols; c0 += 16) {
      load_block(src, rows, cols, ld_src, r0, c0, r);
      const __mmask16 lanes = first_lanes(padded_rows - r0);
      for (int64_t c = 0; c < std::min<int64_t>(16, cols - c0); ++c)
        _mm512_mask_storeu_epi32(dst + (c0 + c) * ld_dst + r0, lanes, r[c]);
    }
#else
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < padded_rows; ++r) dst[c * ld_dst + r] = r < rows ? src[r * ld_src + c] : 0;
#endif
}

inline const uint32_t* words(const bf16* x) { return reinterpret_cast<const uint32_t*>(x); }

// X [rows, dim] (row stride ld, both even) packed as the micro-kernel's B = Xᵀ [dim, padded_rows] (padded_rows a
// multiple of PANEL; zero past rows): panel p is the words of X's rows [p · PANEL, (p + 1) · PANEL), transposed.
inline void pack_transposed(const bf16* x, int64_t rows, int64_t ld, int64_t dim, int64_t padded_rows, bf16* dst) {
  for (int64_t p = 0; p * PANEL < padded_rows; ++p) {
    const int64_t first = p * PANEL;
    transpose_words(words(x + first * ld), std::max<int64_t>(0, std::min(PANEL, rows - first)), dim / 2, ld / 2,
                    PANEL, reinterpret_cast<uint32_t*>(dst + p * dim * PANEL), PANEL);
  }
}

// X [rows, cols] (row stride ld) packed as the micro-kernel's B = X with padded_rows rows (even; zero past rows):
// panel p holds columns [p · PANEL, p · PANEL + w), rows interleaved in pairs.
inline void pack_rows(const bf16* x, int64_t rows, int64_t ld, int64_t cols, int64_t padded_rows, bf16* dst) {
  for (int64_t p = 0; p * PANEL < cols; ++p) {
    const int64_t first = p * PANEL, width = std::min(PANEL, cols - first);
    bf16* panel = dst + first * padded_rows;
    for (int64_t k = 0; k < padded_rows; k += 2) {
      const bf16* even = k < rows ? x + k * ld + first : nullptr;
      const bf16* odd = k + 1 < rows ? x + (k + 1) * ld + first : nullptr;
      bf16* out = panel + k * width;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      // vpermt2w picks words 0, 32, 1, 33, ... (16 pairs) of (even, odd), then 16, 48, 17, 49, ...
      static constexpr uint16_t low_order[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
      const __m512i low = _mm512_loadu_si512(low_order);
      const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
      for (int64_t n = 0; n < width; n += 32) {
        const int64_t left = width - n;
        const __mmask32 lanes = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
        const __m512i a = even ? _mm512_maskz_loadu_epi16(lanes, even + n) : _mm512_setzero_si512();
        const __m512i b = odd ? _mm512_maskz_loadu_epi16(lanes, odd + n) : _mm512_setzero_si512();
        _mm512_mask_storeu_epi32(out + 2 * n, first_lanes(left), _mm512_permutex2var_epi16(a, low, b));
        if (left > 16)
          _mm512_mask_storeu_epi32(out + 2 * n + 32, first_lanes(left - 16), _mm512_permutex2var_epi16(a, high, b));
      }
#else
      for (int64_t n = 0; n < width; ++n) {
        out[2 * n] = even ? even[n] : bf16(0.f);
        out[2 * n + 1] = odd ? odd[n] : bf16(0.f);
      }
#endif
    }
  }
}

// dst [cols, padded_rows] = Xᵀ for X [rows, cols] bf16 (row stride ld, cols even), zero in columns past rows.
inline void transpose(const bf16* x, int64_t rows, int64_t ld, int64_t cols, int64_t padded_rows, bf16* dst) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512i r[16];
  for (int64_t r0 = 0; r0 < padded_rows; r0 += 16)
    for (int64_t c0 = 0; c0 < cols / 2; c0 += 16) {
      load_block(words(x), rows, cols / 2, ld / 2, r0, c0, r);  // r[c]: pairs (X[r][2c], X[r][2c + 1])
      const __mmask16 lanes = first_lanes(padded_rows - r0);
      for (int64_t c = 0; c < std::min<int64_t>(16, cols / 2 - c0); ++c) {
        const int64_t column = 2 * (c0 + c);
        _mm256_mask_storeu_epi16(dst + column * padded_rows + r0, lanes, _mm512_cvtepi32_epi16(r[c]));
        _mm256_mask_storeu_epi16(dst + (column + 1) * padded_rows + r0, lanes,
                                 _mm512_cvtepi32_epi16(_mm512_srli_epi32(r[c], 16)));
      }
    }
#else
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < padded_rows; ++r) dst[c * padded_rows + r] = r < rows ? x[r * ld + c] : bf16(0.f);
#endif
}

// out rows [0, cols) (row stride ld_out) = Xᵀ rounded to bf16, for X [rows, cols] float (row stride ld).
inline void transpose_rounded(const float* x, int64_t rows, int64_t cols, int64_t ld, bf16* out, int64_t ld_out) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512i r[16];
  for (int64_t c0 = 0; c0 < cols; c0 += 16)
    for (int64_t r0 = 0; r0 < rows; r0 += 16) {
      load_block(reinterpret_cast<const uint32_t*>(x), rows, cols, ld, r0, c0, r);
      const __mmask16 lanes = first_lanes(rows - r0);
      for (int64_t c = 0; c < std::min<int64_t>(16, cols - c0); ++c)
        store16(out + (c0 + c) * ld_out + r0, _mm512_castsi512_ps(r[c]), lanes);
    }
#else
  for (int64_t c = 0; c < cols; ++c)
    for (int64_t r = 0; r < rows; ++r) out[c * ld_out + r] = bf16(x[r * ld + c]);
#endif
}

}  // namespace sparkgpt::vnni
