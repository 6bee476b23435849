// y = x Wᵀ (+ b) for a few rows x [rows, K] and a weight W [N, K], both float32 or both bfloat16 (float32 sums,
// rounded once): the matrix–vector products of a float model's decode step. One token per row is bound by reading W once per step, and torch's sgemv streamed a weight
// too large for the cache at about a third of the read bandwidth of the AMD CPU it was measured on (RESULTS.md).
// Here each thread streams its own blocks of W's rows, four rows in flight, every x row reusing them from L1. Each
// output is one row's dot product in a fixed order, so a row's result never depends on the others in its batch.
// Whether this beats torch's kernel is measured on the CPU at hand, per dtype (native.py: `matvec`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vector_math.h"

#include <algorithm>
#include <optional>

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

template <typename T>
void gemv_rows(const T* xs, const T* w, const T* b, T* o, int64_t rows, int64_t depth, int64_t n) {
  const int64_t blocks = (n + ROWS_IN_FLIGHT - 1) / ROWS_IN_FLIGHT;
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t first = block * ROWS_IN_FLIGHT, count = std::min(ROWS_IN_FLIGHT, n - first);
      for (int64_t r = 0; r < rows; ++r) {
        float sums[ROWS_IN_FLIGHT];
        if (count == ROWS_IN_FLIGHT) {
          dot_rows<ROWS_IN_FLIGHT>(xs + r * depth, w + first * depth, depth, sums);
        } else {
          for (int64_t j = 0; j < count; ++j) dot_rows<1>(xs + r * depth, w + (first + j) * depth, depth, sums + j);
        }
        for (int64_t j = 0; j < count; ++j)
          o[r * n + first + j] = static_cast<T>(b ? sums[j] + static_cast<float>(b[first + j]) : sums[j]);
      }
    }
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

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparkgpt, m) { m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor"); }

TORCH_LIBRARY_IMPL(sparkgpt, CPU, m) { m.impl("gemv", gemv); }
