// The decode step's layers in one native call: every block of a quantised Llama- or Gemma-family model for one new
// token per row, with no Python between the kernels.
//
// decode.py's `DecodeStep` is the readable version of this loop and its reference (tests check the two agree). A
// decode token of SmolLM2-135M spends a few milliseconds in integer matrix-vector kernels and, from Python, as long
// again in about a thousand small operations (norms, rotary, cache writes, attention over a short prefix), each
// paying Python's and the dispatcher's few microseconds. Here those small operations are plain loops over a few
// hundred numbers, and the only library calls left are the integer kernels themselves (the same ones the Python
// step calls: torch's, or gemv.cpp's where they were timed faster on this CPU).
//
// Per block, on float32 residual rows x [B, d] (the parts in [brackets] where the block has them: Gemma):
//   h = RMSNorm(x)·g₁ (rounded to bf16: the kernels' input)
//   q, k, v = split(h W_qkvᵀ); [q, k = RMSNorm(q)·g_q, RMSNorm(k)·g_k per head]; q, k rotated by each row's
//   position (RoPE, at the layer's base); k, v written into the cache (a sliding-window layer: into its ring)
//   a = Attention(q, K, V) W_oᵀ        softmax(q·Kᵀ·scale) V over the columns each row may see
//   x += a  [or RMSNorm(a)·g₃]
//   h = RMSNorm(x)·g₂
//   f = (act(h W_gateᵀ) ⊙ h W_upᵀ) W_downᵀ   act: SiLU, or GELU's tanh form (GeGLU)
//   x += f  [or RMSNorm(f)·g₄]
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "gemv.h"
#include "vector_math.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::Tensor;
using c10::BFloat16;

// Tensors per block, in the order decode.py hands them over; the last four are empty where the block has no such
// norm.
enum Slot { kAttnNorm, kQkv, kQkvScales, kOut, kOutScales, kFfnNorm, kGateUp, kGateUpScales, kDown, kDownScales,
            kQNorm, kKNorm, kAttnPostNorm, kFfnPostNorm, kPerBlock };

enum Activation { kSilu = 0, kGeluTanh = 1 };

const float* gain_of(const Tensor& t) { return t.numel() == 0 ? nullptr : t.data_ptr<float>(); }

// Which integer kernel a projection's (weight, scales) are packed for (quant.py's `KERNELS`).
enum Kernel { kInt8Torch = 0, kInt4Torch = 1, kInt4Native = 2, kInt8Native = 3 };

// rows [B, in] bf16 -> [B, out] bf16 through the projection's kernel (int4: groups of `group_size` inputs).
Tensor project(const Tensor& rows, const Tensor& weight, const Tensor& scales, int64_t kernel, int64_t group_size) {
  TORCH_CHECK(kernel >= kInt8Torch && kernel <= kInt8Native, "kernels: 0 to 3 (quant.KERNELS)");
  if (kernel == kInt8Native) return sparkgpt::int8_weight_gemv(rows, weight, scales);
  if (kernel == kInt4Native) return sparkgpt::int4_gemv(rows, weight, group_size, scales);
  if (kernel == kInt4Torch) return at::_weight_int4pack_mm_for_cpu(rows, weight, group_size, scales);
  return at::_weight_int8pack_mm(rows, weight, scales);
}

float inverse_rms(const float* row, int64_t width, float eps) {
  float sum_squares = 0.f;
  for (int64_t i = 0; i < width; ++i) sum_squares += row[i] * row[i];
  return 1.f / std::sqrt(sum_squares / static_cast<float>(width) + eps);
}

// out[r] = bf16(x[r] / rms(x[r]) · gain): the float32 residual normalised, rounded once for the kernels.
void rms_norm(const float* x, const float* gain, BFloat16* out, int64_t rows, int64_t width, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * width;
    const float scale = inverse_rms(row, width, eps);
    for (int64_t i = 0; i < width; ++i) out[r * width + i] = BFloat16(row[i] * scale * gain[i]);
  }
}

// x += y (bf16 rows from a kernel) into the float32 residual, or x += RMSNorm(y)·gain (a sandwich norm).
void add_rows(float* x, const BFloat16* y, const float* gain, int64_t rows, int64_t width, float eps) {
  std::vector<float> row(width);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < width; ++i) row[i] = static_cast<float>(y[r * width + i]);
    const float scale = gain == nullptr ? 1.f : inverse_rms(row.data(), width, eps);
    for (int64_t i = 0; i < width; ++i) x[r * width + i] += gain == nullptr ? row[i] : row[i] * scale * gain[i];
  }
}

// One head vector of the kernel's bf16 output in float32, RMS-normalised with `gain` where given (q/k norm).
void load_head(const BFloat16* in, const float* gain, float eps, float* out, int64_t head_dim) {
  for (int64_t i = 0; i < head_dim; ++i) out[i] = static_cast<float>(in[i]);
  if (gain == nullptr) return;
  const float scale = inverse_rms(out, head_dim, eps);
  for (int64_t i = 0; i < head_dim; ++i) out[i] *= scale * gain[i];
}

// A head vector rotated (RoPE: v·cos + swap_halves(v)·sin, the sign of the half rotation folded into sin) or copied
// (cos null), into T (the cache's dtype).
template <typename T>
void rotate(const float* in, const float* cos, const float* sin, T* out, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < head_dim; ++i)
    out[i] = cos == nullptr ? T(in[i]) : T(in[i] * cos[i] + in[i < half ? i + half : i - half] * sin[i]);
}

struct Shape {
  int64_t batch, width, n_heads, n_kv_heads, head_dim;
};

// Where a layer's keys and values live: the full-history cache [slots, kv_heads, capacity, head_dim] or a
// sliding-window ring [rows, kv_heads, window, head_dim], the columns [0, span) attention reads, which of them each
// row may see (`visible` [B, ≥span] or null: all) and the cache row of each row (`slot_of`; null: its own).
template <typename T>
struct KeyValues {
  T* keys;
  T* values;
  int64_t slot_stride, head_stride, span;
  const bool* visible;
  int64_t visible_stride;
  const int64_t* slot_of;
};

// Attention of every (row, query head) over its key/value head's columns [0, span) where `visible` allows.
template <typename T>
void attend(const T* queries, const KeyValues<T>& kv, const Shape& s, float scale, BFloat16* out) {
  const int64_t group = s.n_heads / s.n_kv_heads;
  at::parallel_for(0, s.batch * s.n_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(kv.span), query(s.head_dim), mixed(s.head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / s.n_heads, head = task % s.n_heads;
      const T* q = queries + task * s.head_dim;
      const int64_t slot = kv.slot_of == nullptr ? row : kv.slot_of[row];
      const T* k = kv.keys + slot * kv.slot_stride + (head / group) * kv.head_stride;
      const T* v = kv.values + slot * kv.slot_stride + (head / group) * kv.head_stride;
      const bool* allowed = kv.visible == nullptr ? nullptr : kv.visible + row * kv.visible_stride;
      for (int64_t i = 0; i < s.head_dim; ++i) query[i] = static_cast<float>(q[i]) * scale;
      sparkgpt::dot_rows(query.data(), k, kv.span, s.head_dim, scores.data());
      if (allowed != nullptr)
        for (int64_t j = 0; j < kv.span; ++j)
          if (!allowed[j]) scores[j] = -std::numeric_limits<float>::infinity();
      const float top = sparkgpt::max_row(scores.data(), 0, kv.span);
      const float total = sparkgpt::exp_row(scores.data(), 0, kv.span, 1.f, top);  // masked columns: e^-inf = 0
      sparkgpt::weighted_sum(scores.data(), v, kv.span, s.head_dim, mixed.data());
      BFloat16* o = out + (row * s.n_heads + head) * s.head_dim;
      for (int64_t i = 0; i < s.head_dim; ++i) o[i] = BFloat16(mixed[i] / total);
    }
  });
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;

// As torch computes act(gate) * up on bf16 tensors: each result rounded to bf16 (the portable loop below).
[[maybe_unused]] BFloat16 gated(float gate, float up, int64_t activation) {
  const float acted = activation == kGeluTanh
                          ? 0.5f * gate * (1.f + std::tanh(kSqrt2OverPi * (gate + 0.044715f * gate * gate * gate)))
                          : gate / (1.f + std::exp(-gate));
  return BFloat16(static_cast<float>(BFloat16(acted)) * up);
}

// act[r] = gated(gate, up) over rows of the fused [B, 2 · hidden] projection (gate half, then up half); with
// AVX-512 sixteen at a time, e^x by exp16 and tanh(y) as 1 - 2 / (e^2y + 1).
void gate_rows(const BFloat16* gate_up, BFloat16* act, int64_t rows, int64_t hidden, int64_t activation) {
  for (int64_t row = 0; row < rows; ++row) {
    const BFloat16* gate = gate_up + row * 2 * hidden;
    const BFloat16* up = gate + hidden;
    BFloat16* out = act + row * hidden;
#if defined(__AVX512F__) && defined(__AVX512BW__)
    using namespace sparkgpt;
    const __m512 one = _mm512_set1_ps(1.f);
    for_lanes(0, hidden, [&](int64_t i, __mmask16 lanes) {
      const __m512 g = load16(gate + i, lanes);
      __m512 acted;
      if (activation == kGeluTanh) {
        const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
        const __m512 y =
            _mm512_mul_ps(_mm512_set1_ps(kSqrt2OverPi), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), cube, g));
        const __m512 twice = _mm512_min_ps(_mm512_add_ps(y, y), _mm512_set1_ps(88.f));  // e^88: tanh = 1 already
        const __m512 tanh = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.f), _mm512_add_ps(exp16(twice), one)));
        acted = _mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(one, tanh));
      } else {
        acted = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
      }
      store16(out + i, _mm512_mul_ps(round16(acted), load16(up + i, lanes)), lanes);
    });
#else
    for (int64_t i = 0; i < hidden; ++i)
      out[i] = gated(static_cast<float>(gate[i]), static_cast<float>(up[i]), activation);
#endif
  }
}

// A view of the cache tensor [blocks, slots, kv_heads, columns, head_dim] at one block.
template <typename T>
KeyValues<T> block_view(Tensor& keys, Tensor& values, int64_t block, int64_t span, const bool* visible,
                        int64_t visible_stride, const int64_t* slot_of) {
  const int64_t head_stride = keys.size(3) * keys.size(4), slot_stride = keys.size(2) * head_stride;
  const int64_t block_stride = keys.size(1) * slot_stride;
  return {keys.data_ptr<T>() + block * block_stride, values.data_ptr<T>() + block * block_stride, slot_stride,
          head_stride, span, visible, visible_stride, slot_of};
}

struct Ring {  // the sliding-window layers' keys and values, where the model has any
  Tensor* keys;
  Tensor* values;
  int64_t column, span;
  const bool* visible;
  int64_t visible_stride;
};

template <typename T>
void run_blocks(Tensor& x, const float* cos_rows, const float* sin_rows, const float* local_cos,
                const float* local_sin, Tensor& keys, Tensor& values, const Tensor& columns,
                const c10::optional<Tensor>& slots, int64_t span, const c10::optional<Tensor>& visible,
                const Ring& ring, const std::vector<Tensor>& tensors, const std::vector<int64_t>& kernels,
                const std::vector<int64_t>& windowed, const Shape& s, int64_t group_size, double eps_, double scale,
                int64_t activation) {
  const float eps = static_cast<float>(eps_);
  const int64_t n_blocks = static_cast<int64_t>(tensors.size()) / kPerBlock;
  const int64_t q_width = s.n_heads * s.head_dim, kv_width = s.n_kv_heads * s.head_dim;
  const auto bf16 = x.options().dtype(at::kBFloat16);
  Tensor normed = at::empty({s.batch, s.width}, bf16);
  Tensor mixed = at::empty({s.batch, q_width}, bf16);
  Tensor queries = at::empty({s.batch, q_width}, x.options().dtype(keys.scalar_type()));
  std::vector<float> head(s.head_dim);
  float* residual = x.data_ptr<float>();
  const int64_t* column = columns.data_ptr<int64_t>();
  const int64_t* slot_of = slots ? slots->data_ptr<int64_t>() : nullptr;
  const bool* visible_rows = visible ? visible->data_ptr<bool>() : nullptr;
  const int64_t visible_stride = visible ? visible->stride(0) : 0;
  int64_t full_block = 0, ring_block = 0;  // each block's row in its kind of cache

  for (int64_t block = 0; block < n_blocks; ++block) {
    const Tensor* t = tensors.data() + block * kPerBlock;
    const int64_t* kernel = kernels.data() + block * 4;
    const bool local = windowed[block] != 0;
    const KeyValues<T> kv = local ? block_view<T>(*ring.keys, *ring.values, ring_block++, ring.span, ring.visible,
                                                  ring.visible_stride, nullptr)
                                  : block_view<T>(keys, values, full_block++, span, visible_rows, visible_stride,
                                                  slot_of);
    const float* cos_of = local && local_cos != nullptr ? local_cos : cos_rows;
    const float* sin_of = local && local_sin != nullptr ? local_sin : sin_rows;
    const float *q_gain = gain_of(t[kQNorm]), *k_gain = gain_of(t[kKNorm]);

    rms_norm(residual, t[kAttnNorm].data_ptr<float>(), normed.data_ptr<BFloat16>(), s.batch, s.width, eps);
    const Tensor qkv = project(normed, t[kQkv], t[kQkvScales], kernel[0], group_size);
    const BFloat16* qkv_rows = qkv.data_ptr<BFloat16>();
    for (int64_t row = 0; row < s.batch; ++row) {
      const BFloat16* in = qkv_rows + row * (q_width + 2 * kv_width);
      const float* c = cos_of == nullptr ? nullptr : cos_of + row * s.head_dim;
      const float* n = sin_of == nullptr ? nullptr : sin_of + row * s.head_dim;
      for (int64_t h = 0; h < s.n_heads; ++h) {
        load_head(in + h * s.head_dim, q_gain, eps, head.data(), s.head_dim);
        rotate(head.data(), c, n, queries.data_ptr<T>() + row * q_width + h * s.head_dim, s.head_dim);
      }
      const int64_t slot = kv.slot_of == nullptr ? row : kv.slot_of[row];
      const int64_t write_column = local ? ring.column : column[row];
      for (int64_t h = 0; h < s.n_kv_heads; ++h) {
        const int64_t at = slot * kv.slot_stride + h * kv.head_stride + write_column * s.head_dim;
        load_head(in + q_width + h * s.head_dim, k_gain, eps, head.data(), s.head_dim);
        rotate(head.data(), c, n, kv.keys + at, s.head_dim);
        load_head(in + q_width + kv_width + h * s.head_dim, nullptr, eps, head.data(), s.head_dim);
        rotate<T>(head.data(), nullptr, nullptr, kv.values + at, s.head_dim);
      }
    }
    attend(queries.data_ptr<T>(), kv, s, static_cast<float>(scale), mixed.data_ptr<BFloat16>());
    add_rows(residual, project(mixed, t[kOut], t[kOutScales], kernel[1], group_size).data_ptr<BFloat16>(),
             gain_of(t[kAttnPostNorm]), s.batch, s.width, eps);

    rms_norm(residual, t[kFfnNorm].data_ptr<float>(), normed.data_ptr<BFloat16>(), s.batch, s.width, eps);
    const Tensor gate_up = project(normed, t[kGateUp], t[kGateUpScales], kernel[2], group_size);
    const int64_t hidden = gate_up.size(1) / 2;
    Tensor activated = at::empty({s.batch, hidden}, bf16);
    const BFloat16* gu = gate_up.data_ptr<BFloat16>();
    BFloat16* act = activated.data_ptr<BFloat16>();
    gate_rows(gu, act, s.batch, hidden, activation);
    add_rows(residual, project(activated, t[kDown], t[kDownScales], kernel[3], group_size).data_ptr<BFloat16>(),
             gain_of(t[kFfnPostNorm]), s.batch, s.width, eps);
  }
}

const float* rows_of(const c10::optional<Tensor>& t) {
  if (!t) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous(), "rotary tables: contiguous float32 [B, d]");
  return t->data_ptr<float>();
}

// x [B, d] float32 (updated in place and returned); cos, sin [B, head_dim] float32 or None (no rotary);
// keys, values [blocks, slots, kv_heads, capacity, head_dim] (float32 or bfloat16); columns [B] int64: where each
// row writes its key/value; slots [B] int64 or None: the cache slot of each row (None: row r is slot r; several
// rows may share a slot, as a draft's tokens do: every row's key/value is written before any row attends); span:
// columns attention reads; visible [B, span] bool or None (every column).
// Sliding-window layers (`windowed` per block, 1 for such a layer): local_cos/local_sin their rope rows (None: the
// global ones), ring_keys/ring_values [windowed blocks, B, kv_heads, window, head_dim], each row's key/value written
// at ring column `ring_column`, attention over ring columns [0, ring_span) where ring_visible [B, ring_span] allows.
// activation: 0 SiLU (SwiGLU), 1 GELU's tanh form (GeGLU).
Tensor decode_layers(Tensor x, const c10::optional<Tensor>& cos, const c10::optional<Tensor>& sin, Tensor keys,
                     Tensor values, const Tensor& columns, const c10::optional<Tensor>& slots, int64_t span,
                     const c10::optional<Tensor>& visible,
                     std::vector<Tensor> tensors, std::vector<int64_t> kernels, int64_t n_heads, int64_t n_kv_heads,
                     int64_t group_size, double eps, double scale, const c10::optional<Tensor>& local_cos,
                     const c10::optional<Tensor>& local_sin, c10::optional<Tensor> ring_keys,
                     c10::optional<Tensor> ring_values, int64_t ring_column, int64_t ring_span,
                     const c10::optional<Tensor>& ring_visible, std::vector<int64_t> windowed, int64_t activation) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x: contiguous float32 [B, d]");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.dim() == 5, "keys/values: contiguous 5-d");
  const int64_t n_blocks = static_cast<int64_t>(tensors.size()) / kPerBlock;
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) % kPerBlock == 0 &&
                  static_cast<int64_t>(kernels.size()) == 4 * n_blocks &&
                  static_cast<int64_t>(windowed.size()) == n_blocks, "tensors: ", kPerBlock, " per block");
  TORCH_CHECK(!slots || (slots->scalar_type() == at::kLong && slots->is_contiguous() && slots->numel() == x.size(0)),
              "slots: contiguous int64 [B]");
  TORCH_CHECK(activation == kSilu || activation == kGeluTanh, "activation: 0 (SiLU) or 1 (GELU tanh)");
  Ring ring{nullptr, nullptr, ring_column, ring_span, nullptr, 0};
  const int64_t n_windowed = std::count_if(windowed.begin(), windowed.end(), [](int64_t w) { return w != 0; });
  if (n_windowed > 0) {
    TORCH_CHECK(ring_keys && ring_values && ring_keys->is_contiguous() && ring_values->is_contiguous() &&
                    ring_keys->dim() == 5 && ring_keys->sizes() == ring_values->sizes() &&
                    ring_keys->scalar_type() == keys.scalar_type() &&
                    ring_values->scalar_type() == keys.scalar_type() && !slots &&
                    ring_keys->size(0) == n_windowed && ring_keys->size(1) == x.size(0) &&
                    ring_keys->size(2) == n_kv_heads && ring_keys->size(4) == keys.size(4) && ring_column >= 0 &&
                    ring_column < ring_keys->size(3) && ring_span > ring_column && ring_span <= ring_keys->size(3),
                "ring_keys/ring_values: contiguous [windowed blocks, B, kv_heads, window, head_dim] of the cache's "
                "dtype, ring_column < ring_span <= window, no slots");
    ring.keys = &*ring_keys;
    ring.values = &*ring_values;
    if (ring_visible) {
      TORCH_CHECK(ring_visible->scalar_type() == at::kBool && ring_visible->dim() == 2 &&
                      ring_visible->size(0) == x.size(0) && ring_visible->stride(1) == 1 &&
                      ring_visible->size(1) >= ring_span, "ring_visible: bool [B, ring_span]");
      ring.visible = ring_visible->data_ptr<bool>();
      ring.visible_stride = ring_visible->stride(0);
    }
  }
  TORCH_CHECK(keys.size(0) == n_blocks - n_windowed && keys.size(2) == n_kv_heads && values.sizes() == keys.sizes(),
              "keys/values: [full-history blocks, slots, kv_heads, capacity, head_dim]");
  TORCH_CHECK(span <= keys.size(3) && (!visible || (visible->size(0) == x.size(0) && visible->size(1) >= span)),
              "span within the cache's capacity; visible: [B, span]");
  const Shape shape{x.size(0), x.size(1), n_heads, n_kv_heads, keys.size(4)};
  const float *c = rows_of(cos), *n = rows_of(sin), *lc = rows_of(local_cos), *ln = rows_of(local_sin);
  if (keys.scalar_type() == at::kFloat)
    run_blocks<float>(x, c, n, lc, ln, keys, values, columns, slots, span, visible, ring, tensors, kernels, windowed,
                      shape, group_size, eps, scale, activation);
  else if (keys.scalar_type() == at::kBFloat16)
    run_blocks<BFloat16>(x, c, n, lc, ln, keys, values, columns, slots, span, visible, ring, tensors, kernels, windowed,
                         shape, group_size, eps, scale, activation);
  else
    TORCH_CHECK(false, "keys/values: float32 or bfloat16");
  return x;
}

}  // namespace

TORCH_LIBRARY(sparkgpt, m) {
  m.def("decode_layers(Tensor(a!) x, Tensor? cos, Tensor? sin, Tensor(b!) keys, Tensor(c!) values, Tensor columns, "
        "Tensor? slots, int span, "
        "Tensor? visible, Tensor[] tensors, int[] kernels, int n_heads, int n_kv_heads, int group_size, float eps, "
        "float scale, Tensor? local_cos, Tensor? local_sin, Tensor(d!)? ring_keys, Tensor(e!)? ring_values, "
        "int ring_column, int ring_span, Tensor? ring_visible, int[] windowed, int activation) -> Tensor(a!)",
        decode_layers);
}
