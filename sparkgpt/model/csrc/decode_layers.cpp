// The decode step's layers in one native call: every block of a quantised Llama-family model for one new token per
// row, with no Python between the kernels.
//
// decode.py's `DecodeStep` is the readable version of this loop and its reference (tests check the two agree). A
// decode token of SmolLM2-135M spends a few milliseconds in integer matrix-vector kernels and, from Python, as long
// again in about a thousand small operations (norms, rotary, cache writes, attention over a short prefix), each
// paying Python's and the dispatcher's few microseconds. Here those small operations are plain loops over a few
// hundred numbers, and the only library calls left are the integer kernels themselves (torch's, the same ones the
// Python step calls).
//
// Per block, on float32 residual rows x [B, d]:
//   h = RMSNorm(x)·g₁ (rounded to bf16: the kernels' input)
//   q, k, v = split(h W_qkvᵀ); q, k rotated by each row's position (RoPE); k, v written into the cache
//   x += Attention(q, K, V) W_oᵀ        softmax(q·Kᵀ·scale) V over the columns each row may see
//   h = RMSNorm(x)·g₂
//   x += (silu(h W_gateᵀ) ⊙ h W_upᵀ) W_downᵀ
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vector_math.h"

#include <cmath>
#include <limits>
#include <vector>

namespace {

using at::Tensor;
using c10::BFloat16;

// Tensors per block, in the order decode.py hands them over.
enum Slot { kAttnNorm, kQkv, kQkvScales, kOut, kOutScales, kFfnNorm, kGateUp, kGateUpScales, kDown, kDownScales,
            kPerBlock };

// rows [B, in] bf16 -> [B, out] bf16 through torch's integer kernel for `bits` (4: int4 groups, 8: int8 rows).
Tensor project(const Tensor& rows, const Tensor& weight, const Tensor& scales, int64_t bits, int64_t group_size) {
  if (bits == 4) return at::_weight_int4pack_mm_for_cpu(rows, weight, group_size, scales);
  return at::_weight_int8pack_mm(rows, weight, scales);
}

// out[r] = bf16(x[r] / rms(x[r]) · gain): the float32 residual normalised, rounded once for the kernels.
void rms_norm(const float* x, const float* gain, BFloat16* out, int64_t rows, int64_t width, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* row = x + r * width;
    float sum_squares = 0.f;
    for (int64_t i = 0; i < width; ++i) sum_squares += row[i] * row[i];
    const float inverse_rms = 1.f / std::sqrt(sum_squares / static_cast<float>(width) + eps);
    for (int64_t i = 0; i < width; ++i) out[r * width + i] = BFloat16(row[i] * inverse_rms * gain[i]);
  }
}

// x += y (bf16 rows from a kernel) into the float32 residual.
void add_rows(float* x, const BFloat16* y, int64_t count) {
  for (int64_t i = 0; i < count; ++i) x[i] += static_cast<float>(y[i]);
}

// One head vector from the kernel's bf16 output, rotated (RoPE: v·cos + swap_halves(v)·sin, the sign of the half
// rotation folded into sin) or copied, into T (the cache's dtype).
template <typename T>
void rotate(const BFloat16* in, const float* cos, const float* sin, T* out, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < head_dim; ++i) {
    const float value = static_cast<float>(in[i]);
    out[i] = cos == nullptr ? T(value)
                            : T(value * cos[i] + static_cast<float>(in[i < half ? i + half : i - half]) * sin[i]);
  }
}

struct Shape {
  int64_t batch, width, n_heads, n_kv_heads, head_dim, span;
};

// Attention of every (row, query head) over columns [0, span) of its key/value head in the row's slot (`slot_of`:
// the row's own index where null), where `visible` allows.
template <typename T>
void attend(const T* queries, const T* keys, const T* values, const bool* visible, int64_t visible_stride,
            const int64_t* slot_of, const Shape& s, int64_t slot_stride, int64_t head_stride, float scale,
            BFloat16* out) {
  const int64_t group = s.n_heads / s.n_kv_heads;
  at::parallel_for(0, s.batch * s.n_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(s.span), query(s.head_dim), mixed(s.head_dim);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / s.n_heads, head = task % s.n_heads;
      const T* q = queries + task * s.head_dim;
      const int64_t slot = slot_of == nullptr ? row : slot_of[row];
      const T* k = keys + slot * slot_stride + (head / group) * head_stride;
      const T* v = values + slot * slot_stride + (head / group) * head_stride;
      const bool* allowed = visible == nullptr ? nullptr : visible + row * visible_stride;
      for (int64_t i = 0; i < s.head_dim; ++i) query[i] = static_cast<float>(q[i]) * scale;
      for (int64_t j = 0; j < s.span; ++j)
        scores[j] = allowed != nullptr && !allowed[j] ? -std::numeric_limits<float>::infinity()
                                                      : sparkgpt::dot(query.data(), k + j * s.head_dim, s.head_dim);
      const float top = sparkgpt::max_row(scores.data(), 0, s.span);
      const float total = sparkgpt::exp_row(scores.data(), 0, s.span, 1.f, top);  // masked columns: e^-inf = 0
      std::fill(mixed.begin(), mixed.end(), 0.f);
      for (int64_t j = 0; j < s.span; ++j)
        if (scores[j] != 0.f) sparkgpt::add_scaled(mixed.data(), scores[j], v + j * s.head_dim, s.head_dim);
      BFloat16* o = out + (row * s.n_heads + head) * s.head_dim;
      for (int64_t i = 0; i < s.head_dim; ++i) o[i] = BFloat16(mixed[i] / total);
    }
  });
}

template <typename T>
void run_blocks(Tensor& x, const c10::optional<Tensor>& cos, const c10::optional<Tensor>& sin, Tensor& keys,
                Tensor& values, const Tensor& columns, const c10::optional<Tensor>& slots,
                const c10::optional<Tensor>& visible,
                const std::vector<Tensor>& tensors, const std::vector<int64_t>& bits, const Shape& s,
                int64_t group_size, double eps, double scale) {
  const int64_t n_blocks = static_cast<int64_t>(tensors.size()) / kPerBlock;
  const int64_t q_width = s.n_heads * s.head_dim, kv_width = s.n_kv_heads * s.head_dim;
  // keys/values: [blocks, slots, kv_heads, capacity, head_dim], contiguous (checked by the caller)
  const int64_t head_stride = keys.size(3) * s.head_dim, slot_stride = s.n_kv_heads * head_stride;
  const int64_t block_stride = keys.size(1) * slot_stride;
  const auto bf16 = x.options().dtype(at::kBFloat16);
  Tensor normed = at::empty({s.batch, s.width}, bf16);
  Tensor mixed = at::empty({s.batch, q_width}, bf16);
  Tensor queries = at::empty({s.batch, q_width}, x.options().dtype(keys.scalar_type()));
  float* residual = x.data_ptr<float>();
  const int64_t* column = columns.data_ptr<int64_t>();
  const int64_t* slot_of = slots ? slots->data_ptr<int64_t>() : nullptr;
  const float* cos_rows = cos ? cos->data_ptr<float>() : nullptr;
  const float* sin_rows = sin ? sin->data_ptr<float>() : nullptr;
  const bool* visible_rows = visible ? visible->data_ptr<bool>() : nullptr;
  const int64_t visible_stride = visible ? visible->stride(0) : 0;

  for (int64_t block = 0; block < n_blocks; ++block) {
    const Tensor* t = tensors.data() + block * kPerBlock;
    const int64_t* b = bits.data() + block * 4;
    T* block_keys = keys.data_ptr<T>() + block * block_stride;
    T* block_values = values.data_ptr<T>() + block * block_stride;

    rms_norm(residual, t[kAttnNorm].data_ptr<float>(), normed.data_ptr<BFloat16>(), s.batch, s.width, eps);
    const Tensor qkv = project(normed, t[kQkv], t[kQkvScales], b[0], group_size);
    const BFloat16* qkv_rows = qkv.data_ptr<BFloat16>();
    for (int64_t row = 0; row < s.batch; ++row) {
      const BFloat16* in = qkv_rows + row * (q_width + 2 * kv_width);
      const float* c = cos_rows == nullptr ? nullptr : cos_rows + row * s.head_dim;
      const float* n = sin_rows == nullptr ? nullptr : sin_rows + row * s.head_dim;
      for (int64_t head = 0; head < s.n_heads; ++head)
        rotate(in + head * s.head_dim, c, n, queries.data_ptr<T>() + row * q_width + head * s.head_dim,
               s.head_dim);
      for (int64_t head = 0; head < s.n_kv_heads; ++head) {
        const int64_t slot = slot_of == nullptr ? row : slot_of[row];
        const int64_t at = slot * slot_stride + head * head_stride + column[row] * s.head_dim;
        rotate(in + q_width + head * s.head_dim, c, n, block_keys + at, s.head_dim);
        rotate<T>(in + q_width + kv_width + head * s.head_dim, nullptr, nullptr, block_values + at, s.head_dim);
      }
    }
    attend(queries.data_ptr<T>(), block_keys, block_values, visible_rows, visible_stride, slot_of, s, slot_stride,
           head_stride, static_cast<float>(scale), mixed.data_ptr<BFloat16>());
    add_rows(residual, project(mixed, t[kOut], t[kOutScales], b[1], group_size).data_ptr<BFloat16>(),
             s.batch * s.width);

    rms_norm(residual, t[kFfnNorm].data_ptr<float>(), normed.data_ptr<BFloat16>(), s.batch, s.width, eps);
    const Tensor gate_up = project(normed, t[kGateUp], t[kGateUpScales], b[2], group_size);
    const int64_t hidden = gate_up.size(1) / 2;
    Tensor activated = at::empty({s.batch, hidden}, bf16);
    const BFloat16* gu = gate_up.data_ptr<BFloat16>();
    BFloat16* act = activated.data_ptr<BFloat16>();
    for (int64_t row = 0; row < s.batch; ++row)
      for (int64_t i = 0; i < hidden; ++i) {
        // as torch computes silu(gate) * up on bf16 tensors: each result rounded to bf16
        const float gate = static_cast<float>(gu[row * 2 * hidden + i]);
        const BFloat16 silu(gate / (1.f + std::exp(-gate)));
        const float up = static_cast<float>(gu[row * 2 * hidden + hidden + i]);
        act[row * hidden + i] = BFloat16(static_cast<float>(silu) * up);
      }
    add_rows(residual, project(activated, t[kDown], t[kDownScales], b[3], group_size).data_ptr<BFloat16>(),
             s.batch * s.width);
  }
}

// x [B, d] float32 (updated in place and returned); cos, sin [B, head_dim] float32 or None (no rotary);
// keys, values [blocks, slots, kv_heads, capacity, head_dim] (float32 or bfloat16); columns [B] int64: where each
// row writes its key/value; slots [B] int64 or None: the cache slot of each row (None: row r is slot r; several
// rows may share a slot, as a draft's tokens do: every row's key/value is written before any row attends); span:
// columns attention reads; visible [B, span] bool or None (every column).
Tensor decode_layers(Tensor x, const c10::optional<Tensor>& cos, const c10::optional<Tensor>& sin, Tensor keys,
                     Tensor values, const Tensor& columns, const c10::optional<Tensor>& slots, int64_t span,
                     const c10::optional<Tensor>& visible,
                     std::vector<Tensor> tensors, std::vector<int64_t> bits, int64_t n_heads, int64_t n_kv_heads,
                     int64_t group_size, double eps, double scale) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 2, "x: contiguous float32 [B, d]");
  TORCH_CHECK(keys.is_contiguous() && values.is_contiguous() && keys.dim() == 5, "keys/values: contiguous 5-d");
  TORCH_CHECK(static_cast<int64_t>(tensors.size()) % kPerBlock == 0 &&
                  bits.size() * kPerBlock == tensors.size() * 4, "tensors: ", kPerBlock, " per block");
  TORCH_CHECK(!slots || (slots->scalar_type() == at::kLong && slots->is_contiguous() && slots->numel() == x.size(0)),
              "slots: contiguous int64 [B]");
  const Shape shape{x.size(0), x.size(1), n_heads, n_kv_heads, keys.size(4), span};
  if (keys.scalar_type() == at::kFloat)
    run_blocks<float>(x, cos, sin, keys, values, columns, slots, visible, tensors, bits, shape, group_size, eps, scale);
  else if (keys.scalar_type() == at::kBFloat16)
    run_blocks<BFloat16>(x, cos, sin, keys, values, columns, slots, visible, tensors, bits, shape, group_size, eps, scale);
  else
    TORCH_CHECK(false, "keys/values: float32 or bfloat16");
  return x;
}

}  // namespace

TORCH_LIBRARY(sparkgpt, m) {
  m.def("decode_layers(Tensor(a!) x, Tensor? cos, Tensor? sin, Tensor(b!) keys, Tensor(c!) values, Tensor columns, "
        "Tensor? slots, int span, "
        "Tensor? visible, Tensor[] tensors, int[] bits, int n_heads, int n_kv_heads, int group_size, float eps, "
        "float scale) -> Tensor(a!)", decode_layers);
}
