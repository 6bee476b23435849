// y = x Wᵀ (+ b) for a few rows x [rows, K] and a weight W [N, K], both float32 or both bfloat16 (float32 sums,
// rounded once): the matrix–vector products of a float model's decode step; int8_gemv, the exact int32 product of a
// quantised head's int8 rows; and int4_gemv / int8_weight_gemv, an int4 model's layers for a decode step's rows. One
// token per row is bound by reading W once per step, and the library kernels streamed a large weight well below the
// memory's pace on some CPUs (RESULTS.md). Here each thread streams its own blocks of W's rows, every x row reusing
// them from L1. Each output is one row's sums in a fixed order, so a row's result never depends on the others in its
// batch. Whether this beats torch's kernel is measured on the CPU at hand (native.py: `matvec`, `int8_matmul`;
// quant.py: `decode_kernel`).
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

// ---- int8 weights (a quantised head) -----------------------------------------------------------------------------
//
// The exact int32 product x · Wᵀ of int8 rows x and an int8 weight W [N, K]: what torch._int_mm(x, Wᵀ) gives. W is
// kept as tiles of 16 outputs (native.py's `pack_int8_tiles`), a tile as blocks of 64 bytes, block j holding for
// output n the bytes 4n..4n+3: W[n, 4j..4j+3] (zero past N and K), which is what AVX512-VNNI's `vpdpbusd` multiplies,
// lane n, against four bytes of x: every output's sum stays in its own lane, with no sum across a register per
// output, and each block is loaded once for all rows. `vpdpbusd` multiplies unsigned by signed bytes, so x enters
// as x + 128 and 128 · Σ_k W[n, k] (row_sums, kept with the weight) is taken back off. Every partial sum is an
// integer inside int32 for K ≤ 65536 (255 · 128 · 65536 < 2³¹): exact, in any order.

constexpr int64_t TILE = 16;            // outputs per tile
// Rows per pass over the weight: the exact int8 product's, and the kernels with float sums per group of inputs
// (int4 weights; int8 weights with grouped activations), whose two sets of sums fill the registers sooner.
constexpr int INT8_ROWS = 16, GROUPED_ROWS = 12;
constexpr int64_t INT8_GROUP = 32;  // inputs per 8-bit activation scale for int8 weights, as llama.cpp's Q8_0
constexpr int64_t PREFETCH_BLOCKS = 16;      // how far ahead in a tile's stream the next blocks are asked for

// Every register of a kernel's R × T accumulators set to `value`.
template <typename V, int R, int T>
inline void fill(V (&registers)[R][T], V value) {
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) registers[r][t] = value;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Block j (64 bytes) of each of T tiles `tile_bytes` apart from `w`, the blocks PREFETCH_BLOCKS ahead asked for.
template <int T>
inline void load_blocks(const void* w, int64_t tile_bytes, int64_t j, __m512i (&blocks)[T]) {
  const char* bytes = static_cast<const char*>(w);
  for (int t = 0; t < T; ++t) {
    _mm_prefetch(bytes + t * tile_bytes + (j + PREFETCH_BLOCKS) * 64, _MM_HINT_T0);
    blocks[t] = _mm512_loadu_si512(bytes + t * tile_bytes + j * 64);
  }
}

// Four bytes in every 32-bit lane: what `vpdpbusd` multiplies each lane's four weight bytes by.
inline __m512i broadcast4(const void* bytes) {
  int32_t quad;
  std::memcpy(&quad, bytes, sizeof(quad));
  return _mm512_set1_epi32(quad);
}
#endif

// The tiles T at a time for one row (its sums are short chains), fewer for more rows (their sums fill the
// registers).
template <int R>
constexpr int tiles_in_flight() {
  return R == 1 ? 4 : R <= 4 ? 2 : 1;
}

// Calls tile_block(R, T, first tile) for every tile of `tiles`, each thread streaming its own, T at a time (the
// last few one at a time).
template <int R, typename Block>
void by_tiles(int64_t tiles, const Block& tile_block) {
  constexpr int T = tiles_in_flight<R>();
  at::parallel_for(0, (tiles + T - 1) / T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t first = begin * T; first < std::min(end * T, tiles); first += T) {
      if (first + T <= tiles) {
        tile_block(std::integral_constant<int, T>{}, first);
      } else {
        for (int64_t t = first; t < tiles; ++t) tile_block(std::integral_constant<int, 1>{}, t);
      }
    }
  });
}

// Rows [0, rows) in passes of at most MAX rows, of near-equal size (17 rows, at most 16 a pass: 8 then 9; a pass
// costs the weight's whole stream however few its rows): pass(R, first row) with R a compile-time count.
template <int MAX, typename Pass, int... R>
void by_passes(int64_t rows, const Pass& pass, std::integer_sequence<int, R...>) {
  const int64_t passes = (rows + MAX - 1) / MAX;
  for (int64_t p = 0, first = 0; p < passes; ++p) {
    const int64_t count = (rows - first) / (passes - p);
    ((count == R + 1 ? pass(std::integral_constant<int, R + 1>{}, first) : void()), ...);
    first += count;
  }
}

template <int MAX, typename Pass>
void by_passes(int64_t rows, const Pass& pass) {
  by_passes<MAX>(rows, pass, std::make_integer_sequence<int, MAX>{});
}

// out[r, n] = Σ_k (x[r, k] + 128) · W[n, k] - 128 · row_sums[n] = Σ_k x[r, k] · W[n, k] for the 16 · T outputs of
// T consecutive tiles (`w` and `row_sums` at the first; the first `outputs` of them exist) and R rows of shifted x
// (`xq`, row stride `quads` four-byte words); out's row stride is `stride`. Given `scales` (at the first tile's
// outputs) and `row_scales` [R], each sum leaves as the float (float(sum) · row_scale) · scale: torch's int32 · float
// products in their order, so the same bits as `int_mm_rows` followed by them, without an int32 [rows, N] between.
template <int R, int T>
void int8_tiles(const uint8_t* xq, int64_t quads, const int8_t* w, int64_t tile_bytes, const int32_t* row_sums,
                void* out, int64_t stride, int64_t outputs, const float* row_scales, const float* scales) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  __m512i acc[R][T];
  fill(acc, _mm512_setzero_si512());
  for (int64_t j = 0; j < quads; ++j) {
    __m512i block[T];
    load_blocks(w, tile_bytes, j, block);
    for (int r = 0; r < R; ++r) {
      const __m512i x = broadcast4(xq + (r * quads + j) * 4);
      for (int t = 0; t < T; ++t) acc[r][t] = _mm512_dpbusd_epi32(acc[r][t], x, block[t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    const int64_t left = std::min<int64_t>(TILE, outputs - t * TILE);
    if (left <= 0) continue;
    const __mmask16 lanes = left >= TILE ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512i offset = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(lanes, row_sums + t * TILE), 7);  // 128 · Σ W
    for (int r = 0; r < R; ++r) {
      const __m512i sums = _mm512_sub_epi32(acc[r][t], offset);
      if (scales == nullptr) {
        _mm512_mask_storeu_epi32(static_cast<int32_t*>(out) + r * stride + t * TILE, lanes, sums);
      } else {
        const __m512 scaled = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sums), _mm512_set1_ps(row_scales[r])),
                                            _mm512_maskz_loadu_ps(lanes, scales + t * TILE));
        _mm512_mask_storeu_ps(static_cast<float*>(out) + r * stride + t * TILE, lanes, scaled);
      }
    }
  }
#else
  for (int r = 0; r < R; ++r)
    for (int t = 0; t < T; ++t) {
      int32_t sums[TILE] = {};
      for (int64_t j = 0; j < quads; ++j) {
        const int8_t* block = w + t * tile_bytes + j * 64;
        const uint8_t* x = xq + (r * quads + j) * 4;
        for (int64_t lane = 0; lane < TILE; ++lane)
          for (int64_t i = 0; i < 4; ++i) sums[lane] += static_cast<int32_t>(x[i]) * block[4 * lane + i];
      }
      for (int64_t lane = 0; lane < std::min<int64_t>(TILE, outputs - t * TILE); ++lane) {
        const int32_t sum = sums[lane] - 128 * row_sums[t * TILE + lane];
        const int64_t at = r * stride + t * TILE + lane;
        if (scales == nullptr)
          static_cast<int32_t*>(out)[at] = sum;
        else
          static_cast<float*>(out)[at] = static_cast<float>(sum) * row_scales[r] * scales[t * TILE + lane];
      }
    }
#endif
}

// x [rows, K] int8 · Wᵀ for W packed by `pack_int8_tiles`, exactly, as int32 [rows, N] (N = row_sums' length); with
// row_scales [rows] and scales [N] (float32), the float32 (float(x · Wᵀ) · row_scales[r]) · scales[n] instead.
Tensor int8_gemv(const Tensor& x, const Tensor& weight, const Tensor& row_sums, const c10::optional<Tensor>& row_scales,
                 const c10::optional<Tensor>& scales) {
  TORCH_CHECK(x.scalar_type() == at::kChar && x.dim() == 2 && weight.scalar_type() == at::kChar &&
                  weight.dim() == 2 && weight.is_contiguous(),
              "int8_gemv: int8 x [rows, K] and an int8 weight packed as tiles (native.pack_int8_tiles)");
  TORCH_CHECK(row_sums.scalar_type() == at::kInt && row_sums.dim() == 1 && row_sums.is_contiguous(),
              "int8_gemv: row_sums, int32 [N], the sums of the weight's rows");
  const int64_t rows = x.size(0), depth = x.size(1), n = row_sums.numel(), quads = (depth + 3) / 4;
  TORCH_CHECK(depth <= (1 << 16), "int8_gemv: K up to 65536 (int32 sums stay exact)");
  TORCH_CHECK(weight.size(0) == (n + TILE - 1) / TILE && weight.size(1) == quads * 64 &&
                  static_cast<int64_t>(row_sums.numel()) == n,
              "int8_gemv: the weight packed for N = ", n, " outputs and K = ", depth, " inputs");
  TORCH_CHECK(row_scales.has_value() == scales.has_value(), "int8_gemv: row_scales and scales together or neither");
  Tensor row_scale, scale;
  if (scales.has_value()) {
    row_scale = row_scales->to(at::kFloat).contiguous();
    scale = scales->to(at::kFloat).contiguous();
    TORCH_CHECK(row_scale.numel() == rows && scale.numel() == n, "int8_gemv: row_scales [rows] and scales [N]");
  }
  const Tensor in = x.contiguous();
  std::vector<uint8_t> shifted(rows * quads * 4, 128);  // x + 128; past K, 128 (x = 0) meets weight bytes of 0
  const int8_t* xs = in.const_data_ptr<int8_t>();
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < depth; ++k)
      shifted[r * quads * 4 + k] = static_cast<uint8_t>(static_cast<int32_t>(xs[r * depth + k]) + 128);
  Tensor out = at::empty({rows, n}, in.options().dtype(scales.has_value() ? at::kFloat : at::kInt));
  const int8_t* w = weight.const_data_ptr<int8_t>();
  const int32_t* sums = row_sums.const_data_ptr<int32_t>();
  const float* rs = scales.has_value() ? row_scale.const_data_ptr<float>() : nullptr;
  const float* s = scales.has_value() ? scale.const_data_ptr<float>() : nullptr;
  char* o = static_cast<char*>(out.data_ptr());
  const int64_t tile_bytes = quads * 64, element = out.element_size();
  by_passes<INT8_ROWS>(rows, [&](auto count, int64_t first) {
    constexpr int R = decltype(count)::value;
    by_tiles<R>(weight.size(0), [&](auto in_flight, int64_t tile) {
      constexpr int T = decltype(in_flight)::value;
      int8_tiles<R, T>(shifted.data() + first * quads * 4, quads, w + tile * tile_bytes, tile_bytes,
                       sums + tile * TILE, o + (first * n + tile * TILE) * element, n, n - tile * TILE,
                       rs == nullptr ? nullptr : rs + first, s == nullptr ? nullptr : s + tile * TILE);
    });
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


struct QuantisedRows {
  const int8_t* x8;       // [rows, K]
  const float* scale;     // σ per row and group [rows, groups]
  const float* sum;       // σ Σ x8 per row and group
  const int32_t* levels;  // Σ x8 per row and group
  int64_t depth, groups, group_size;

  QuantisedRows from(int64_t row) const {
    const int64_t at = row * groups;
    return {x8 + row * depth, scale + at, sum + at, levels + at, depth, groups, group_size};
  }
};

// The portable loops of the grouped kernels, for row r against one tile: per group, the integer sums of
// `block_dot(bytes of a lane, x8, block j)` over the group's 64-byte blocks, then `update(acc, sums, row's group
// index, group)`; at the end `store(acc)`.
template <typename BlockDot, typename Update, typename Store>
[[maybe_unused]] void portable_grouped(const QuantisedRows& in, int64_t r, const uint8_t* tile, int64_t blocks,
                                       const BlockDot& block_dot, const Update& update, const Store& store) {
  const int8_t* x8 = in.x8 + r * in.depth;
  float acc[TILE] = {};
  for (int64_t g = 0; g < in.groups; ++g) {
    int32_t sums[TILE] = {};
    for (int64_t j = g * blocks; j < (g + 1) * blocks; ++j)
      for (int64_t lane = 0; lane < TILE; ++lane) sums[lane] += block_dot(tile + j * 64 + 4 * lane, x8, j);
    update(acc, sums, r * in.groups + g, g);
  }
  store(acc);
}

// Outputs [16 · T] of R rows from T consecutive tiles (`w`, `scales` at the first).
template <int R, int T>
void int4_tiles(const QuantisedRows& in, const uint8_t* w, const c10::BFloat16* scales, int64_t tile_bytes,
                int64_t tile_scales, c10::BFloat16* out, int64_t n) {
  const int64_t blocks = in.group_size / 8;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  using namespace sparkgpt;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  __m512 acc[R][T];
  fill(acc, _mm512_setzero_ps());
  for (int64_t g = 0; g < in.groups; ++g) {
    __m512i sums[R][T];
    fill(sums, _mm512_setzero_si512());
    for (int64_t j = g * blocks; j < (g + 1) * blocks; ++j) {
      __m512i low[T], high[T];
      load_blocks(w, tile_bytes, j, low);
      for (int t = 0; t < T; ++t) {
        high[t] = _mm512_and_si512(_mm512_srli_epi16(low[t], 4), nibble);
        low[t] = _mm512_and_si512(low[t], nibble);
      }
      for (int r = 0; r < R; ++r) {
        const int8_t* x8 = in.x8 + r * in.depth + j * 8;
        const __m512i first = broadcast4(x8), second = broadcast4(x8 + 4);
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
    for (int r = 0; r < R; ++r)
      portable_grouped(
          in, r, w + t * tile_bytes, blocks,
          [](const uint8_t* bytes, const int8_t* x8, int64_t j) {  // low nibbles inputs 8j.., high ones 8j + 4..
            int32_t sum = 0;
            for (int64_t i = 0; i < 4; ++i) sum += (bytes[i] & 15) * x8[8 * j + i] + (bytes[i] >> 4) * x8[8 * j + 4 + i];
            return sum;
          },
          [&](float* acc, const int32_t* sums, int64_t at, int64_t g) {
            const c10::BFloat16* group = scales + t * tile_scales + g * 2 * TILE;
            for (int64_t lane = 0; lane < TILE; ++lane) {
              const float s = static_cast<float>(group[lane]), z = static_cast<float>(group[TILE + lane]);
              acc[lane] = std::fma(static_cast<float>(sums[lane]), s * in.scale[at], acc[lane]);
              acc[lane] = std::fma(std::fma(-8.f, s, z), in.sum[at], acc[lane]);
            }
          },
          [&](const float* acc) {
            for (int64_t lane = 0; lane < TILE; ++lane) out[r * n + t * TILE + lane] = c10::BFloat16(acc[lane]);
          });
#endif
}

// ---- int8 weights with 8-bit activations per group (a model's int8 layers) ----------------------------------
//
// W ≈ q · s per output row (quant.py's int8), x ≈ x8 · σ per group of G inputs as for int4 above. Per group the sum
// Σ x8 · q is exact: `vpdpbusd` takes q + 128 as the unsigned bytes (the weight is kept so: `pack_int8_weight`) and
// x8 as the signed ones, and 128 · Σ x8 comes back off. Then y = s · Σ_g σ_g · Σ x8·q, the float steps in one
// order in both loops. Layout: `int8_gemv`'s tiles, each byte + 128.

// Outputs [16 · T] of R rows from T consecutive tiles (the first `outputs` exist); out's row stride `stride`.
template <int R, int T>
void int8_weight_tiles(const QuantisedRows& in, const uint8_t* w, const float* scales, int64_t tile_bytes,
                       c10::BFloat16* out, int64_t stride, int64_t outputs) {
  const int64_t quads = in.group_size / 4;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  using namespace sparkgpt;
  __m512 acc[R][T];
  fill(acc, _mm512_setzero_ps());
  for (int64_t g = 0; g < in.groups; ++g) {
    __m512i sums[R][T];
    fill(sums, _mm512_setzero_si512());
    for (int64_t j = g * quads; j < (g + 1) * quads; ++j) {
      __m512i block[T];
      load_blocks(w, tile_bytes, j, block);
      for (int r = 0; r < R; ++r) {
        const __m512i x = broadcast4(in.x8 + r * in.depth + j * 4);
        for (int t = 0; t < T; ++t) sums[r][t] = _mm512_dpbusd_epi32(sums[r][t], block[t], x);
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t at = r * in.groups + g;
      const __m512i offset = _mm512_set1_epi32(128 * in.levels[at]);
      const __m512 sigma = _mm512_set1_ps(in.scale[at]);
      for (int t = 0; t < T; ++t)
        acc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(sums[r][t], offset)), sigma, acc[r][t]);
    }
  }
  for (int t = 0; t < T; ++t) {
    const int64_t left = std::min<int64_t>(TILE, outputs - t * TILE);
    if (left <= 0) continue;
    const __mmask16 lanes = left >= TILE ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512 s = _mm512_maskz_loadu_ps(lanes, scales + t * TILE);
    for (int r = 0; r < R; ++r) store16(out + r * stride + t * TILE, _mm512_mul_ps(acc[r][t], s), lanes);
  }
#else
  for (int t = 0; t < T; ++t)
    for (int r = 0; r < R; ++r)
      portable_grouped(
          in, r, w + t * tile_bytes, quads,
          [](const uint8_t* bytes, const int8_t* x8, int64_t j) {  // inputs 4j..4j+3, each byte q + 128
            int32_t sum = 0;
            for (int64_t i = 0; i < 4; ++i) sum += static_cast<int32_t>(bytes[i]) * x8[4 * j + i];
            return sum;
          },
          [&](float* acc, const int32_t* sums, int64_t at, int64_t) {
            for (int64_t lane = 0; lane < TILE; ++lane)
              acc[lane] = std::fma(static_cast<float>(sums[lane] - 128 * in.levels[at]), in.scale[at], acc[lane]);
          },
          [&](const float* acc) {
            for (int64_t lane = 0; lane < std::min<int64_t>(TILE, outputs - t * TILE); ++lane)
              out[r * stride + t * TILE + lane] = c10::BFloat16(acc[lane] * scales[t * TILE + lane]);
          });
#endif
}

// x8 = round(x · 127 / max|x|) for one group of x (bf16, n a multiple of 8); returns σ = max|x| / 127 and sets
// levels = Σ x8 and total = σ Σ x8. Rounding is to nearest even in both loops (the default mode), so both give the
// same bytes. A group below 1e-30 (127 / max|x| would overflow) is all zeros; one holding a NaN or an infinity
// gives σ = NaN, which carries into every output it reaches, as a float product would.
inline float quantise_group(const c10::BFloat16* x, int64_t n, int8_t* x8, int32_t& levels, float& total) {
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
  levels = 0;
  if (!finite || largest < 1e-30f) {
    std::fill(x8, x8 + n, static_cast<int8_t>(0));
    total = finite ? 0.f : std::numeric_limits<float>::quiet_NaN();
    return total;
  }
  const float inverse = 127.f / largest;
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

// Rows x [rows, K] (bf16) quantised per group of `group_size` (K a multiple of it), held for the kernels.
struct QuantisedBuffers {
  std::vector<int8_t> x8;
  std::vector<float> scale, sum;
  std::vector<int32_t> levels;
  QuantisedRows rows;  // views of the vectors above

  QuantisedBuffers(const QuantisedBuffers&) = delete;
  QuantisedBuffers(const Tensor& x, int64_t group_size) {
    const int64_t count = x.size(0), depth = x.size(1), groups = depth / group_size;
    x8.resize(count * depth);
    scale.resize(count * groups);
    sum.resize(count * groups);
    levels.resize(count * groups);
    const c10::BFloat16* xs = x.const_data_ptr<c10::BFloat16>();
    for (int64_t r = 0; r < count; ++r)
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t at = r * groups + g, first = r * depth + g * group_size;
        scale[at] = quantise_group(xs + first, group_size, x8.data() + first, levels[at], sum[at]);
      }
    rows = {x8.data(), scale.data(), sum.data(), levels.data(), depth, groups, group_size};
  }
};

}  // namespace

namespace sparkgpt {

Tensor int8_weight_gemv(const Tensor& x, const Tensor& weight, const Tensor& scales) {
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && x.dim() == 2 && weight.scalar_type() == at::kByte &&
                  weight.dim() == 2 && weight.is_contiguous() && scales.scalar_type() == at::kFloat &&
                  scales.dim() == 1 && scales.is_contiguous(),
              "int8_weight_gemv: bf16 x [rows, K], a uint8 weight in tiles (quant.pack_int8_weight) and float32 "
              "scales [N]");
  const int64_t rows = x.size(0), depth = x.size(1), n = scales.numel();
  TORCH_CHECK(depth % INT8_GROUP == 0 && weight.size(0) == (n + TILE - 1) / TILE && weight.size(1) == depth * 16,
              "int8_weight_gemv: K a multiple of ", INT8_GROUP, " and the weight packed for N = ", n, ", K = ", depth);
  const Tensor in = x.contiguous();
  const QuantisedBuffers quantised(in, INT8_GROUP);
  Tensor out = at::empty({rows, n}, in.options());
  const uint8_t* w = weight.const_data_ptr<uint8_t>();
  const float* s = scales.const_data_ptr<float>();
  c10::BFloat16* o = out.mutable_data_ptr<c10::BFloat16>();
  const int64_t tile_bytes = depth * 16;
  by_passes<GROUPED_ROWS>(rows, [&](auto count, int64_t first) {
    constexpr int R = decltype(count)::value;
    const QuantisedRows part = quantised.rows.from(first);
    by_tiles<R>(weight.size(0), [&](auto in_flight, int64_t tile) {
      int8_weight_tiles<R, decltype(in_flight)::value>(part, w + tile * tile_bytes, s + tile * TILE, tile_bytes,
                                                       o + first * n + tile * TILE, n, n - tile * TILE);
    });
  });
  return out;
}

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
  const QuantisedBuffers quantised(in, group_size);
  Tensor out = at::empty({rows, n}, in.options());
  const uint8_t* w = weight.const_data_ptr<uint8_t>();
  const c10::BFloat16* s = scales.const_data_ptr<c10::BFloat16>();
  c10::BFloat16* o = out.mutable_data_ptr<c10::BFloat16>();
  const int64_t tile_bytes = depth * 8, tile_scales = groups * 2 * TILE;
  by_passes<GROUPED_ROWS>(rows, [&](auto count, int64_t first) {
    constexpr int R = decltype(count)::value;
    const QuantisedRows part = quantised.rows.from(first);
    by_tiles<R>(n / TILE, [&](auto in_flight, int64_t tile) {
      int4_tiles<R, decltype(in_flight)::value>(part, w + tile * tile_bytes, s + tile * tile_scales, tile_bytes,
                                                tile_scales, o + first * n + tile * TILE, n);
    });
  });
  return out;
}

}  // namespace sparkgpt

TORCH_LIBRARY_FRAGMENT(sparkgpt, m) {
  m.def("gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("int8_gemv(Tensor x, Tensor weight, Tensor row_sums, Tensor? row_scales=None, Tensor? scales=None) -> Tensor");
  m.def("int4_gemv(Tensor x, Tensor weight, int group_size, Tensor scales) -> Tensor");
  m.def("int8_weight_gemv(Tensor x, Tensor weight, Tensor scales) -> Tensor");
  m.def("integer_loops() -> str", integer_loops);
}

TORCH_LIBRARY_IMPL(sparkgpt, CPU, m) {
  m.impl("gemv", gemv);
  m.impl("int8_gemv", int8_gemv);
  m.impl("int4_gemv", sparkgpt::int4_gemv);
  m.impl("int8_weight_gemv", sparkgpt::int8_weight_gemv);
}
