// Quantised weights back to a bfloat16 matrix, in one pass: what a prompt's matmul multiplies by (quant.py).
//
// A prompt of many rows is fastest through the bf16 matmul (oneDNN on AMX), so each call rebuilds its weight in
// bf16. From Python that takes about seven whole-matrix operations (unpack the nibbles, convert, subtract,
// multiply, add, ...) and a third of a 512-token prefill; here it is one loop per row, each value computed in float
// and rounded once: W = (q - 8)·s + z for int4 groups, W = q·s for int8 rows.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vector_math.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define SPARKGPT_AVX512_BF16 1
#endif

namespace {

using at::Tensor;
using c10::BFloat16;

#ifdef SPARKGPT_AVX512_BF16
// One group of 32 values (16 bytes) in a handful of AVX-512 instructions: widen the bytes, split the nibbles,
// q·step + offset in float, round both halves to bf16 at once (round to nearest even, as c10::BFloat16 does for
// every finite value), then interleave them back into column order.
inline void dequantize_group32(const uint8_t* bytes, float step, float offset, BFloat16* out) {
  alignas(64) static const uint16_t column_order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                                         8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
  const __m512i wide = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  const __m512 scale = _mm512_set1_ps(step), shift = _mm512_set1_ps(offset);
  const __m512 low = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(wide, _mm512_set1_epi32(15))), scale, shift);
  const __m512 high = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(wide, 4)), scale, shift);
  const __m512i halves = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(high, low));  // [low 0..15 | high 0..15]
  const __m512i order = _mm512_load_si512(column_order);
  _mm512_storeu_si512(out, _mm512_permutexvar_epi16(order, halves));
}
#endif

// One row of int4 groups (`Group` values each, or `group_size` when Group is 0) into bf16.
template <int64_t Group>
void dequantize_int4_row(const uint8_t* bytes, const BFloat16* scale, const BFloat16* zero, int64_t groups,
                         int64_t group_size, BFloat16* out) {
  const int64_t size = Group ? Group : group_size;
  for (int64_t g = 0; g < groups; ++g) {
    const float step = static_cast<float>(scale[g]);
    const float offset = static_cast<float>(zero[g]) - 8.f * step;
#ifdef SPARKGPT_AVX512_BF16
    if constexpr (Group == 32) {
      dequantize_group32(bytes + g * 16, step, offset, out + g * 32);
      continue;
    }
#endif
    // each byte's two values as one 32-bit store (low nibble first): contiguous, so the loop vectorises
    uint32_t* pairs = reinterpret_cast<uint32_t*>(out + g * size);
    const uint8_t* group = bytes + g * (size / 2);
    for (int64_t j = 0; j < size / 2; ++j) {
      const BFloat16 low(static_cast<float>(group[j] & 15) * step + offset);
      const BFloat16 high(static_cast<float>(group[j] >> 4) * step + offset);
      pairs[j] = static_cast<uint32_t>(low.x) | (static_cast<uint32_t>(high.x) << 16);
    }
  }
}

// qweight uint8 [N, K/2] (column 2j in the low nibble, 2j+1 in the high one); scales, zeros bf16 [N, K/group]
Tensor dequantize_int4(const Tensor& qweight, const Tensor& scales, const Tensor& zeros, int64_t group_size) {
  TORCH_CHECK(qweight.scalar_type() == at::kByte && scales.scalar_type() == at::kBFloat16 &&
                  zeros.scalar_type() == at::kBFloat16, "int4: uint8 qweight, bf16 scales and zeros");
  const Tensor q = qweight.contiguous(), s = scales.contiguous(), z = zeros.contiguous();
  const int64_t rows = q.size(0), cols = q.size(1) * 2, groups = s.size(1);
  TORCH_CHECK(groups * group_size == cols && z.sizes() == s.sizes() && s.size(0) == rows, "int4: shapes");
  Tensor out = at::empty({rows, cols}, q.options().dtype(at::kBFloat16));
  const uint8_t* packed = q.data_ptr<uint8_t>();
  const BFloat16* scale = s.data_ptr<BFloat16>();
  const BFloat16* zero = z.data_ptr<BFloat16>();
  BFloat16* weights = out.data_ptr<BFloat16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const auto at = [&](auto* base, int64_t width) { return base + row * width; };
      if (group_size == 32)  // the default: a fixed trip count the compiler unrolls
        dequantize_int4_row<32>(at(packed, cols / 2), at(scale, groups), at(zero, groups), groups, 32,
                                at(weights, cols));
      else
        dequantize_int4_row<0>(at(packed, cols / 2), at(scale, groups), at(zero, groups), groups, group_size,
                               at(weights, cols));
    }
  });
  return out;
}

// qweight int8 [N, K]; scales float32 [N]
Tensor dequantize_int8(const Tensor& qweight, const Tensor& scales) {
  TORCH_CHECK(qweight.scalar_type() == at::kChar && scales.scalar_type() == at::kFloat,
              "int8: int8 qweight, float32 scales");
  const Tensor q = qweight.contiguous(), s = scales.contiguous();
  const int64_t rows = q.size(0), cols = q.size(1);
  TORCH_CHECK(s.numel() == rows, "int8: one scale per row");
  Tensor out = at::empty({rows, cols}, q.options().dtype(at::kBFloat16));
  const int8_t* levels = q.data_ptr<int8_t>();
  const float* scale = s.data_ptr<float>();
  BFloat16* weights = out.data_ptr<BFloat16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int8_t* in = levels + row * cols;
      BFloat16* dst = weights + row * cols;
#if defined(__AVX512F__) && defined(__AVX512BW__)
      using namespace sparkgpt;
      const __m512 step = _mm512_set1_ps(scale[row]);
      for_lanes(0, cols, [&](int64_t j, __mmask16 lanes) {
        const __m512i wide = _mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(lanes, in + j));
        store16(dst + j, _mm512_mul_ps(_mm512_cvtepi32_ps(wide), step), lanes);
      });
#else
      for (int64_t j = 0; j < cols; ++j) dst[j] = BFloat16(static_cast<float>(in[j]) * scale[row]);
#endif
    }
  });
  return out;
}

}  // namespace

// Declared, then implemented for the CPU key (not as composites), so torch.compile can trace them through the
// shapes native.py registers.
TORCH_LIBRARY_FRAGMENT(sparkgpt, m) {
  m.def("dequantize_int4(Tensor qweight, Tensor scales, Tensor zeros, int group_size) -> Tensor");
  m.def("dequantize_int8(Tensor qweight, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparkgpt, CPU, m) {
  m.impl("dequantize_int4", dequantize_int4);
  m.impl("dequantize_int8", dequantize_int8);
}
