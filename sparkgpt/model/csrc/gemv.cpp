// y = x Wᵀ (+ b) for a few rows x [rows, K] and a weight W [N, K], both float32 or both bfloat16 (float32 sums,
// rounded once): the matrix–vector products of a float model's decode step; and int8_gemv, the exact int32 product
// of a quantised head's int8 rows. One token per row is bound by reading W once per step, and the library kernels
// streamed a large weight well below the memory's pace on some CPUs (RESULTS.md). Here each thread streams its own
// blocks of W's rows, four rows in flight, every x row reusing them from L1. Each output is one row's dot product
// in a fixed order, so a row's result never depends on the others in its batch. Whether this beats torch's kernel
// is measured on the CPU at hand (native.py: `matvec`, `int8_matmul`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vector_math.h"

#include <algorithm>
#include <optional>
#include <type_traits>

namespace {

using at::Tensor;

constexpr int64_t ROWS_IN_FLIGHT = 4;

// sums[j] = x · w_j for the COUNT consecutive rows of w starting at `w` (row stride `depth`). COUNT is a constant
// so that the accumulators stay in registers.
template <int64_t COUNT, typename T>
inline void dot_rows(const T* x, const T* w, int64_t depth, float* sums) {
#if defined(__AVX512F__) && defined(__AVX512BW__)  // bf16 rows load with AVX512-BW's masked 16-bit moves
  using namespace sparkgpt;
  __m512 acc[COUNT];
  for (int64_t j = 0; j < COUNT; ++j) acc[j] = _mm512_setzero_ps();
  for_lanes(0, depth, [&](int64_t k, __mmask16 lanes) {
    const __m512 xv = load16(x + k, lanes);
    for (int64_t j = 0; j < COUNT; ++j) acc[j] = _mm512_fmadd_ps(load16(w + j * depth + k, lanes), xv, acc[j]);
  });
  for (int64_t j = 0; j < COUNT; ++j) sums[j] = _mm512_reduce_add_ps(acc[j]);
#else
  for (int64_t j = 0; j < COUNT; ++j) {
    float partial[8] = {};  // eight independent sums, which the compiler may vectorise (one sum it may not)
    const T* row = w + j * depth;
    int64_t k = 0;
    for (; k + 8 <= depth; k += 8)
      for (int64_t lane = 0; lane < 8; ++lane)
        partial[lane] += static_cast<float>(x[k + lane]) * static_cast<float>(row[k + lane]);
    float total = 0.f;
    for (; k < depth; ++k) total += static_cast<float>(x[k]) * static_cast<float>(row[k]);
    for (const float p : partial) total += p;
    sums[j] = total;
  }
#endif
}

// Every row r of x against every row of W [N, K]: `dot(count, r, first, sums)` fills sums[0..COUNT) with row r's
// products with the COUNT rows of W from `first` (count a std::integral_constant, so that the accumulators stay in
// registers), `store(r, first, count, sums)` writes them out. Each thread streams its own blocks of W's rows.
template <typename Sum, typename Dot, typename Store>
void by_row_blocks(int64_t rows, int64_t n, const Dot& dot, const Store& store) {
  const int64_t blocks = (n + ROWS_IN_FLIGHT - 1) / ROWS_IN_FLIGHT;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * ROWS_IN_FLIGHT, count = std::min(ROWS_IN_FLIGHT, n - first);
      for (int64_t r = 0; r < rows; ++r) {
        Sum sums[ROWS_IN_FLIGHT];
        if (count == ROWS_IN_FLIGHT) {
          dot(std::integral_constant<int64_t, ROWS_IN_FLIGHT>{}, r, first, sums);
        } else {
          for (int64_t j = 0; j < count; ++j) dot(std::integral_constant<int64_t, 1>{}, r, first + j, sums + j);
        }
        store(r, first, count, sums);
      }
    }
  });
}

template <typename T>
void gemv_rows(const T* xs, const T* w, const T* b, T* o, int64_t rows, int64_t depth, int64_t n) {
  by_row_blocks<float>(
      rows, n,
      [&](auto count, int64_t r, int64_t first, float* sums) {
        dot_rows<decltype(count)::value>(xs + r * depth, w + first * depth, depth, sums);
      },
      [&](int64_t r, int64_t first, int64_t count, const float* sums) {
        for (int64_t j = 0; j < count; ++j)
          o[r * n + first + j] = static_cast<T>(b ? sums[j] + static_cast<float>(b[first + j]) : sums[j]);
      });
}

Tensor gemv(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias) {
  const auto dtype = weight.scalar_type();
  TORCH_CHECK((dtype == at::kFloat || dtype == at::kBFloat16) && x.scalar_type() == dtype && x.dim() == 2 &&
                  weight.dim() == 2 && x.size(1) == weight.size(1) && weight.is_contiguous(),
              "gemv: x [rows, K] and a contiguous weight [N, K], both float32 or both bfloat16");
  const Tensor in = x.contiguous();
  const std::optional<Tensor> offsets = bias ? std::optional<Tensor>(bias->contiguous()) : std::nullopt;
  TORCH_CHECK(!offsets || (offsets->scalar_type() == dtype && offsets->numel() == weight.size(0)),
              "gemv: a bias of N values in the weight's dtype");
  const int64_t rows = in.size(0), depth = in.size(1), n = weight.size(0);
  Tensor out = at::empty({rows, n}, in.options());
  if (dtype == at::kFloat) {
    gemv_rows(in.const_data_ptr<float>(), weight.const_data_ptr<float>(),
              offsets ? offsets->const_data_ptr<float>() : nullptr, out.mutable_data_ptr<float>(), rows, depth, n);
  } else {
    using bf16 = c10::BFloat16;
    gemv_rows(in.const_data_ptr<bf16>(), weight.const_data_ptr<bf16>(),
              offsets ? offsets->const_data_ptr<bf16>() : nullptr, out.mutable_data_ptr<bf16>(), rows, depth, n);
  }
  return out;
}

// sums[j] = x · w_j + 128 · Σ w_j in int32 (exact) for COUNT consecutive int8 rows of w: x enters as the unsigned
// bytes x + 128 because AVX512-VNNI's `vpdpbusd` multiplies unsigned by signed bytes; the caller takes the
// 128 · Σ w_j back off with row sums computed once per weight. Every partial sum is an integer inside int32 for
// K ≤ 65536 (255 · 128 · 65536 < 2³¹), so the result is exact, whatever the order of the sums.
template <int64_t COUNT>
inline void dot_rows_int8(const int8_t* x, const int8_t* w, int64_t depth, int32_t* sums) {
  int64_t k = 0;
  for (int64_t j = 0; j < COUNT; ++j) sums[j] = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512i acc[COUNT];
  for (int64_t j = 0; j < COUNT; ++j) acc[j] = _mm512_setzero_si512();
  const __m512i offset = _mm512_set1_epi8(static_cast<char>(0x80));
  for (; k < depth; k += 64) {
    const __mmask64 lanes = depth - k >= 64 ? ~0ULL : (1ULL << (depth - k)) - 1;
    const __m512i xv = _mm512_xor_si512(_mm512_maskz_loadu_epi8(lanes, x + k), offset);  // x + 128, as unsigned
    for (int64_t j = 0; j < COUNT; ++j)
      acc[j] = _mm512_dpbusd_epi32(acc[j], xv, _mm512_maskz_loadu_epi8(lanes, w + j * depth + k));
  }
  for (int64_t j = 0; j < COUNT; ++j) sums[j] = _mm512_reduce_add_epi32(acc[j]);
#endif
  for (int64_t j = 0; j < COUNT; ++j) {  // the portable loop (all of it where VNNI is not compiled in)
    const int8_t* row = w + j * depth;
    int32_t total = 0;
    for (int64_t i = k; i < depth; ++i) total += (static_cast<int32_t>(x[i]) + 128) * static_cast<int32_t>(row[i]);
    sums[j] += total;
  }
}

// The exact int32 product of int8 rows x [rows, K] and an int8 weight W [N, K]: what torch._int_mm(x, Wᵀ) gives,
// for a decode step's few rows, each thread streaming its own blocks of W's rows as gemv does. row_sums: Σ_k W[n, k]
// as int32 [N], which the caller keeps with the weight.
Tensor int8_gemv(const Tensor& x, const Tensor& weight, const Tensor& row_sums) {
  TORCH_CHECK(x.scalar_type() == at::kChar && weight.scalar_type() == at::kChar && x.dim() == 2 &&
                  weight.dim() == 2 && x.size(1) == weight.size(1) && weight.is_contiguous(),
              "int8_gemv: int8 x [rows, K] and a contiguous int8 weight [N, K]");
  TORCH_CHECK(row_sums.scalar_type() == at::kInt && row_sums.numel() == weight.size(0) && row_sums.is_contiguous(),
              "int8_gemv: row_sums, int32 [N], the sums of the weight's rows");
  const Tensor in = x.contiguous();
  const int64_t rows = in.size(0), depth = in.size(1), n = weight.size(0);
  TORCH_CHECK(depth <= (1 << 16), "int8_gemv: K up to 65536 (int32 sums stay exact)");
  Tensor out = at::empty({rows, n}, in.options().dtype(at::kInt));
  const int8_t* xs = in.const_data_ptr<int8_t>();
  const int8_t* w = weight.const_data_ptr<int8_t>();
  const int32_t* offsets = row_sums.const_data_ptr<int32_t>();
  int32_t* o = out.mutable_data_ptr<int32_t>();
  by_row_blocks<int32_t>(
      rows, n,
      [&](auto count, int64_t r, int64_t first, int32_t* sums) {
        dot_rows_int8<decltype(count)::value>(xs + r * depth, w + first * depth, depth, sums);
      },
      [&](int64_t r, int64_t first, int64_t count, const int32_t* sums) {
        for (int64_t j = 0; j < count; ++j) o[r * n + first + j] = sums[j] - 128 * offsets[first + j];
      });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparkgpt, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor weight, Tensor row_sums) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparkgpt, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("int8_gemv", int8_gemv);
}
