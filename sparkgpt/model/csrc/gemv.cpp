// y = x Wᵀ (+ b) for a few rows x [rows, K] and a weight W [N, K], both float32 or both bfloat16 (float32 sums,
// rounded once): the matrix–vector products of a float model's decode step; int8_gemv, the exact int32 product
// of a quantised head's int8 rows; and int4_gemv, a quantised model's int4 layers for a decode step's rows. One
// token per row is bound by reading W once per step, and the library kernels streamed a large weight well below
// the memory's pace on some CPUs (RESULTS.md). Here each thread streams its own blocks of W's rows, every x row
// reusing them from L1. Each output is one row's sums in a fixed order, so a row's result never depends on the
// others in its batch. Whether this beats torch's kernel is measured on the CPU at hand (native.py: `matvec`,
// `int8_matmul`; quant.py: `int4_kernel`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gemv.h"
#include "vector_math.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

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

std::string integer_loops() {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  return "AVX512-VNNI";
#else
  return "portable";
#endif
}

// ---- int4 weights ------------------------------------------------------------------------------------------------
//
// W ≈ (q - 8) · s + z per group of G inputs of an output row (quant.py), q ∈ [0, 15]. Each row of x is quantised
// per group to 8 bits as llama.cpp does for its 4-bit products (x ≈ x8 · σ, σ = max|x| / 127), so that a group's
// Σ x8 · q is an exact integer sum (VNNI's `vpdpbusd`: 64 byte products an instruction, four times the rate of the
// float FMAs a bf16 kernel runs, which made several rows' products compute-bound here). Then per group
//   y += (σ · s) · Σ x8·q  +  (z - 8 s) · σ Σ x8
// (σ Σ x8 rather than the exact Σ x: the rounding errors of x8 then meet the centred weights (q - 8) · s + z, not
// the levels q ≥ 0, whose sum of them is several times larger). The float steps are the same fused operations in
// the same order in the AVX-512 and the portable loops, so both give the same bits for finite outputs (AVX512-BF16
// flushes a denormal output to zero), and a row's result never depends on the others.
//
// Layout (quant.py's `pack_int4_tiles`): the weight as tiles of 16 outputs; a tile is K / 8 blocks of 64 bytes,
// block j holding for output n the bytes 4n..4n+3: low nibbles q[n, 8j..8j+3], high nibbles q[n, 8j+4..8j+7]
// (what `vpdpbusd` multiplies, lane n, against four bytes of x8). Scales: per tile and group, the 16 s then the 16 z
// in bf16.

constexpr int64_t TILE = 16, INT4_ROWS = 8;  // outputs per tile; rows computed per pass over the weight

struct QuantisedRows {
  const int8_t* x8;    // [rows, K]
  const float* scale;  // σ per row and group [rows, groups]
  const float* sum;    // σ Σ x8 per row and group
  int64_t depth, groups, group_size;
};

// Outputs [16 · T] of R rows from T consecutive tiles (`w`, `scales` at the first).
template <int R, int T>
void int4_tiles(const QuantisedRows& in, const uint8_t* w, const c10::BFloat16* scales, int64_t tile_bytes,
                int64_t tile_scales, c10::BFloat16* out, int64_t n) {
  const int64_t blocks = in.group_size / 8;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  using namespace sparkgpt;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[R][T];
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < in.groups; ++g) {
    __m512i sums[R][T];
    for (int r = 0; r < R; ++r)
      for (int t = 0; t < T; ++t) sums[r][t] = _mm512_setzero_si512();
    for (int64_t j = g * blocks; j < (g + 1) * blocks; ++j) {
      __m512i low[T], high[T];
      for (int t = 0; t < T; ++t) {
        const __m512i bytes = _mm512_loadu_si512(w + t * tile_bytes + j * 64);
        low[t] = _mm512_and_si512(bytes, nibble);
        high[t] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
      }
      for (int r = 0; r < R; ++r) {
        int32_t quads[2];
        std::memcpy(quads, in.x8 + r * in.depth + j * 8, sizeof(quads));
        const __m512i first = _mm512_set1_epi32(quads[0]), second = _mm512_set1_epi32(quads[1]);
        for (int t = 0; t < T; ++t) {
          sums[r][t] = _mm512_dpbusd_epi32(sums[r][t], low[t], first);
          sums[r][t] = _mm512_dpbusd_epi32(sums[r][t], high[t], second);
        }
      }
    }
    for (int t = 0; t < T; ++t) {
      const c10::BFloat16* group = scales + t * tile_scales + g * 2 * TILE;
      const __m512 s = load16(group, 0xFFFF), z = load16(group + TILE, 0xFFFF);
      const __m512 offset = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), s, z);  // z - 8s
      for (int r = 0; r < R; ++r) {
        const int64_t at = r * in.groups + g;
        const __m512 scale = _mm512_mul_ps(s, _mm512_set1_ps(in.scale[at]));
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sums[r][t]), scale, acc[r][t]);
        acc[r][t] = _mm512_fmadd_ps(offset, _mm512_set1_ps(in.sum[at]), acc[r][t]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) store16(out + r * n + t * TILE, acc[r][t], 0xFFFF);
#else
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r) {
      const int8_t* x8 = in.x8 + r * in.depth;
      float acc[TILE] = {};
      for (int64_t g = 0; g < in.groups; ++g) {
        int32_t sums[TILE] = {};
        for (int64_t j = g * blocks; j < (g + 1) * blocks; ++j) {
          const uint8_t* block = w + t * tile_bytes + j * 64;
          for (int64_t lane = 0; lane < TILE; ++lane)
            for (int64_t i = 0; i < 4; ++i) {
              const int32_t byte = block[4 * lane + i];
              sums[lane] += (byte & 15) * x8[8 * j + i] + (byte >> 4) * x8[8 * j + 4 + i];
            }
        }
        const c10::BFloat16* group = scales + t * tile_scales + g * 2 * TILE;
        const int64_t at = r * in.groups + g;
        for (int64_t lane = 0; lane < TILE; ++lane) {
          const float s = static_cast<float>(group[lane]), z = static_cast<float>(group[TILE + lane]);
          acc[lane] = std::fma(static_cast<float>(sums[lane]), s * in.scale[at], acc[lane]);
          acc[lane] = std::fma(std::fma(-8.f, s, z), in.sum[at], acc[lane]);
        }
      }
      for (int64_t lane = 0; lane < TILE; ++lane) out[r * n + t * TILE + lane] = c10::BFloat16(acc[lane]);
    }
#endif
}

// R rows against every tile, each thread streaming its own tiles, T at a time: a few tiles in flight for one row
// (its sums are short chains), one for eight (their accumulators fill the registers).
template <int R>
void int4_rows(const QuantisedRows& in, const uint8_t* w, const c10::BFloat16* scales, int64_t n,
               c10::BFloat16* out) {
  constexpr int T = R == 1 ? 4 : R <= 4 ? 2 : 1;
  const int64_t tiles = n / TILE, tile_bytes = in.depth * 8, tile_scales = in.groups * 2 * TILE;
  at::parallel_for(0, (tiles + T - 1) / T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin * T; first < std::min(end * T, tiles); first += T) {
      if (first + T <= tiles) {
        int4_tiles<R, T>(in, w + first * tile_bytes, scales + first * tile_scales, tile_bytes, tile_scales,
                         out + first * TILE, n);
      } else {
        for (int64_t t = first; t < tiles; ++t)
          int4_tiles<R, 1>(in, w + t * tile_bytes, scales + t * tile_scales, tile_bytes, tile_scales,
                           out + t * TILE, n);
      }
    }
  });
}

// x8 = round(x · 127 / max|x|) for one group of x (bf16, n a multiple of 8); returns σ = max|x| / 127 and sets
// total = σ Σ x8. Rounding is to nearest even in both loops (the default mode), so both give the same bytes. A
// group below 1e-30 (127 / max|x| would overflow) is all zeros; one holding a NaN or an infinity gives σ = NaN,
// which carries into every output it reaches, as a float product would.
inline float quantise_group(const c10::BFloat16* x, int64_t n, int8_t* x8, float& total) {
  float largest = 0.f;
  bool finite = true;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  using namespace sparkgpt;
  __m512 top = _mm512_setzero_ps();
  __mmask16 nan = 0;
  for_lanes(0, n, [&](int64_t k, __mmask16 lanes) {
    const __m512 v = load16(x + k, lanes);
    nan |= _mm512_mask_cmp_ps_mask(lanes, v, v, _CMP_UNORD_Q);
    top = _mm512_max_ps(top, _mm512_abs_ps(v));
  });
  largest = _mm512_reduce_max_ps(top);
  finite = nan == 0 && largest <= std::numeric_limits<float>::max();
#else
  for (int64_t k = 0; k < n; ++k) {
    const float v = static_cast<float>(x[k]);
    finite = finite && std::isfinite(v);
    largest = std::max(largest, std::fabs(v));
  }
#endif
  if (!finite || largest < 1e-30f) {
    std::fill(x8, x8 + n, static_cast<int8_t>(0));
    total = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
    return total;
  }
  const float inverse = 127.f / largest;
  int32_t levels = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  __m512i count = _mm512_setzero_si512();
  for_lanes(0, n, [&](int64_t k, __mmask16 lanes) {
    const __m512i level = _mm512_cvtps_epi32(_mm512_mul_ps(load16(x + k, lanes), _mm512_set1_ps(inverse)));
    _mm512_mask_cvtepi32_storeu_epi8(x8 + k, lanes, level);
    count = _mm512_add_epi32(count, level);
  });
  levels = _mm512_reduce_add_epi32(count);
#else
  for (int64_t k = 0; k < n; ++k) {
    x8[k] = static_cast<int8_t>(std::nearbyint(static_cast<float>(x[k]) * inverse));
    levels += x8[k];
  }
#endif
  const float sigma = largest / 127.f;
  total = sigma * static_cast<float>(levels);
  return sigma;
}

template <int... R>
void int4_pass(std::integer_sequence<int, R...>, int64_t rows, const QuantisedRows& in, const uint8_t* w,
               const c10::BFloat16* scales, int64_t n, c10::BFloat16* out) {
  ((rows == R + 1 ? int4_rows<R + 1>(in, w, scales, n, out) : void()), ...);
}

}  // namespace

namespace sparkgpt {

Tensor int4_gemv(const Tensor& x, const Tensor& weight, int64_t group_size, const Tensor& scales) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && weight.scalar_type() == at::kByte &&
                  weight.dim() == 2 && weight.is_contiguous() && scales.scalar_type() == at::kBFloat16 &&
                  scales.is_contiguous(),
              "int4_gemv: bf16 x [rows, K], a uint8 weight [N / 16, K · 8] and bf16 scales (quant.pack_int4_tiles)");
  const int64_t rows = x.size(0), depth = x.size(1), n = weight.size(0) * TILE;
  TORCH_CHECK(group_size > 0 && group_size % 8 == 0 && depth % group_size == 0 && weight.size(1) == depth * 8 &&
                  scales.numel() == n / TILE * (depth / group_size) * 2 * TILE,
              "int4_gemv: K a multiple of the group size, itself of 8, and the weight and scales packed for it");
  const int64_t groups = depth / group_size;
  const Tensor in = x.contiguous();
  std::vector<int8_t> x8(rows * depth);
  std::vector<float> scale(rows * groups), sum(rows * groups);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t at = r * groups + g, first = r * depth + g * group_size;
      scale[at] = quantise_group(in.const_data_ptr<c10::BFloat16>() + first, group_size, x8.data() + first,
                                 sum[at]);
    }
  Tensor out = at::empty({rows, n}, in.options());
  for (int64_t first = 0; first < rows; first += INT4_ROWS) {
    const QuantisedRows part{x8.data() + first * depth, scale.data() + first * groups, sum.data() + first * groups,
                             depth, groups, group_size};
    int4_pass(std::make_integer_sequence<int, INT4_ROWS>{}, std::min(INT4_ROWS, rows - first), part,
              weight.const_data_ptr<uint8_t>(), scales.const_data_ptr<c10::BFloat16>(), n,
              out.mutable_data_ptr<c10::BFloat16>() + first * n);
  }
  return out;
}

}  // namespace sparkgpt

TORCH_LIBRARY_FRAGMENT(sparkgpt, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor weight, Tensor row_sums) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor weight, int group_size, Tensor scales) -> Tensor");
  m.def("integer_loops() -> str", integer_loops);
}

TORCH_LIBRARY_IMPL(sparkgpt, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("int8_gemv", int8_gemv);
  m.impl("int4_gemv", sparkgpt::int4_gemv);
}
