// Causal attention (optionally a sliding window: query i sees keys j with i - w < j <= i) in bfloat16 with float32
// accumulation, forward and backward, on oneDNN's small-GEMM micro-kernel (`at::native::cpublas::brgemm`: AMX tiles
// on CPUs that have them).
//
// Why a kernel of our own: torch's CPU flash-attention kernel in bf16 runs its backward several times slower than
// its float32 one ([64, 6, 256, 64]: 4.6×), so training kept attention in float32; and `at::mm` on bf16 returns
// bf16, so scores cannot be summed in float32 through it. The micro-kernel multiplies a 64 × 64 × 64 bf16 block
// into float32 at over 1 TFLOP/s on one core here, about 30× `at::mm` on such small blocks.
//
// The structure is local_attention.cpp's: each chunk of 64 queries multiplies the whole range of keys it can see
// (rounded out to blocks of 64; the softmax masks the rest) and takes its softmax over the chunk's full rows, with
// no online rescaling. The micro-kernel wants its right-hand operand packed (pairs of rows interleaved, panels of at
// most 64 columns: vnni.h), so K, V, Kᵀ and Vᵀ are packed once per key/value head, padded with zero keys to a
// multiple of 64; queries and output gradients are read in place. P and dS are rounded to bf16 for their GEMMs, as
// flash attention does on GPUs; every sum is float32.
//
//   forward:  S = Q_c K_rᵀ · scale (masked), E = exp(S - max S), O_c = (E V_r) / Σ E, lse = log Σ exp(S)
//   backward: P = exp(S - lse), dP = dO_c V_rᵀ, dS = P ⊙ (dP - rowsum(dO_c ⊙ O_c)) · scale,
//             dQ_c = dS K_r, dK_r += dSᵀ Q_c, dV_r += Pᵀ dO_c
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include "vector_math.h"
#include "vnni.h"

#include <algorithm>
#include <cmath>
#include <memory>
#include <tuple>
#include <vector>

namespace {

using at::Tensor;
using bf16 = c10::BFloat16;
namespace blas = at::native::cpublas;
using sparkgpt::exp_row;
using sparkgpt::max_row;

constexpr int64_t BLOCK = 64;  // queries per chunk, keys per block, columns per packed panel

int64_t round_up(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

static_assert(BLOCK == sparkgpt::vnni::PANEL);

// The micro-kernel's B operand [rows, cols]: panels of BLOCK columns, each [rows, width] with pairs of rows
// interleaved (rows even), so an even row offset is a plain pointer offset.
struct Packed {
  int64_t rows = 0, cols = 0, capacity = 0;
  std::unique_ptr<bf16[]> data;  // not initialised: packing writes every element, padding included

  // B = X for X [count, cols] (row stride ld), zero in rows count..padded
  void pack_rows(const bf16* x, int64_t count, int64_t ld, int64_t cols_, int64_t padded) {
    rows = padded;
    cols = cols_;
    reserve(rows * round_up(cols, BLOCK));
    sparkgpt::vnni::pack_rows(x, count, ld, cols, padded, data.get());
  }
  // B = Xᵀ for X [count, dim] (row stride ld), zero in columns count..padded (a multiple of BLOCK)
  void pack_transposed(const bf16* x, int64_t count, int64_t ld, int64_t dim, int64_t padded) {
    rows = dim;
    cols = padded;
    reserve(rows * cols);
    sparkgpt::vnni::pack_transposed(x, count, ld, dim, padded, data.get());
  }
  void reserve(int64_t size) {  // grows only: the backward repacks P and dS at several widths
    if (capacity < size) {
      data.reset(new bf16[size]);
      capacity = size;
    }
  }
  int64_t width(int64_t panel) const { return std::min(BLOCK, cols - panel * BLOCK); }
  const bf16* at(int64_t panel, int64_t row) const { return data.get() + panel * rows * BLOCK + row * width(panel); }
};

// C[m, columns first..end) (+)= A[m, depth] · B[row.., first..end), A bf16 row stride lda, C float row stride ldc,
// C's column 0 being B's column `first` (first and end multiples of BLOCK, or end = B.cols).
void gemm(int64_t m, int64_t depth, const bf16* a, int64_t lda, const Packed& b, int64_t row, int64_t first,
          int64_t end, float* c, int64_t ldc, bool accumulate) {
  for (int64_t p = first / BLOCK; p * BLOCK < end; ++p)
    blas::brgemm(m, b.width(p), depth, lda, b.width(p), ldc, accumulate, a, b.at(p, row),
                 c + p * BLOCK - first, /*is_vnni=*/true);
}

struct Band {
  int64_t window;
  // the keys a chunk of queries [start, start + rows) may see, rounded out to whole blocks: [first, end)
  int64_t first(int64_t start) const { return std::max<int64_t>(0, start - window + 1) / BLOCK * BLOCK; }
  static int64_t end(int64_t start, int64_t rows) { return round_up(start + rows, BLOCK); }
  // visible keys of query `query`, relative to `first`: [low, high)
  int64_t low(int64_t query, int64_t first) const { return std::max<int64_t>(0, query - window + 1) - first; }
  static int64_t high(int64_t query, int64_t first) { return query - first + 1; }
};

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 && k.scalar_type() == at::kBFloat16 &&
                  v.scalar_type() == at::kBFloat16,
              "attention_bf16: bfloat16 q, k, v");
  TORCH_CHECK(q.dim() == 4 && k.sizes() == v.sizes() && q.size(0) == k.size(0) && q.size(2) == k.size(2) &&
                  q.size(3) == k.size(3) && q.size(1) % k.size(1) == 0 && q.size(3) % 2 == 0,
              "attention_bf16: q [B, H, T, d], k and v [B, H_kv, T, d] with H a multiple of H_kv and d even");
}

// t itself, or a contiguous copy unless its rows have unit stride on d and start at even offsets: rows are read as
// 32-bit words (vnni.h).
Tensor word_rows(const Tensor& t) {
  const Tensor detached = t.detach();
  const bool readable = detached.dim() != 4 || (detached.stride(3) == 1 && detached.stride(2) % 2 == 0);
  return readable ? detached : detached.contiguous();  // a wrong rank is left for check_inputs to name
}

// Rows of a [B, H, T, d] bf16 tensor (unit stride on d) by raw pointer: the inner loops make no tensor calls.
template <typename T>
struct Rows {
  T* data;
  int64_t batch_stride, head_stride, row_stride;
  template <typename Tensor_>
  explicit Rows(Tensor_& t)
      : data(reinterpret_cast<T*>(t.data_ptr())), batch_stride(t.stride(0)), head_stride(t.stride(1)),
        row_stride(t.stride(2)) {}
  T* operator()(int64_t b, int64_t h, int64_t r) const {
    return data + b * batch_stride + h * head_stride + r * row_stride;
  }
};
using InRows = Rows<const bf16>;
using OutRows = Rows<bf16>;

std::tuple<Tensor, Tensor> attention_bf16_forward(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                  int64_t window, double scale) {
  const Tensor q = word_rows(q_in), k = word_rows(k_in), v = word_rows(v_in);
  check_inputs(q, k, v);
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k.size(1), length = q.size(2), dim = q.size(3);
  const int64_t group = heads / kv_heads, padded = round_up(length, BLOCK), chunks = padded / BLOCK;
  const Band band{window};
  const float scaling = static_cast<float>(scale);
  Tensor out = at::empty_like(q);  // q's layout: [B, T, H, d] seen as [B, H, T, d] keeps the merge of heads a view
  Tensor lse = at::empty({batch, heads, length}, q.options().dtype(at::kFloat));
  const InRows queries(q), keys(k), values(v);
  const OutRows outs(out);
  float* lse_data = lse.data_ptr<float>();

  std::vector<Packed> keys_t(batch * kv_heads), values_packed(batch * kv_heads);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads;
      keys_t[task].pack_transposed(keys(b, g, 0), length, keys.row_stride, dim, padded);
      values_packed[task].pack_rows(values(b, g, 0), length, values.row_stride, dim, padded);
    }
  });
  // A task is chunk i and chunk n-1-i of one head: equal work per task under the causal triangle.
  const int64_t pairs = (chunks + 1) / 2;
  at::parallel_for(0, batch * heads * pairs, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(BLOCK * padded), acc(BLOCK * dim), inverse_sums(BLOCK);
    std::vector<bf16> probs(BLOCK * padded);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (heads * pairs), h = task / pairs % heads, pair = task % pairs;
      const Packed &kt = keys_t[b * kv_heads + h / group], &vs = values_packed[b * kv_heads + h / group];
      float* lses = lse_data + (b * heads + h) * length;
      const int64_t mine[2] = {pair, chunks - 1 - pair};
      for (int64_t n = 0; n < (mine[0] == mine[1] ? 1 : 2); ++n) {
        const int64_t start = mine[n] * BLOCK, rows = std::min(BLOCK, length - start);
        const int64_t first = band.first(start), stop = Band::end(start, rows), width = stop - first;
        gemm(rows, dim, queries(b, h, start), queries.row_stride, kt, 0, first, stop, scores.data(), width, false);
        for (int64_t i = 0; i < rows; ++i) {
          float* row = scores.data() + i * width;
          bf16* prob = probs.data() + i * width;
          const int64_t low = band.low(start + i, first), high = Band::high(start + i, first);
          const float top = max_row(row, low, high) * scaling;
          // e^(s - max) in bf16 for the GEMM; the division by their sum waits for the output row (as in flash
          // attention), one pass fewer over the scores
          const float total = exp_row(row, prob, low, high, scaling, top);
          std::fill(prob, prob + low, bf16(0.f));
          std::fill(prob + high, prob + width, bf16(0.f));
          lses[start + i] = top + std::log(total);
          inverse_sums[i] = 1.f / total;
        }
        gemm(rows, width, probs.data(), width, vs, first, 0, dim, acc.data(), dim, false);
        for (int64_t i = 0; i < rows; ++i)
          sparkgpt::to_bf16(acc.data() + i * dim, outs(b, h, start + i), dim, inverse_sums[i]);
      }
    }
    blas::brgemm_release();
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bf16_backward(const Tensor& grad_in, const Tensor& q_in,
                                                           const Tensor& k_in, const Tensor& v_in,
                                                           const Tensor& out_in, const Tensor& lse, int64_t window,
                                                           double scale) {
  const Tensor q = word_rows(q_in), k = word_rows(k_in), v = word_rows(v_in), out = word_rows(out_in);
  const Tensor grad = word_rows(grad_in.to(at::kBFloat16));
  check_inputs(q, k, v);
  const int64_t batch = q.size(0), heads = q.size(1), kv_heads = k.size(1), length = q.size(2), dim = q.size(3);
  const int64_t group = heads / kv_heads, padded = round_up(length, BLOCK);
  const Band band{window};
  const float scaling = static_cast<float>(scale);
  Tensor grad_q = at::empty_like(q), grad_k = at::empty_like(k), grad_v = at::empty_like(v);
  const InRows queries(q), keys(k), values(v), outs(out), grads(grad);
  const OutRows grad_queries(grad_q), grad_keys(grad_k), grad_values(grad_v);
  const float* lse_data = lse.const_data_ptr<float>();

  // Each task is one key/value head of one batch row, so its key and value gradients are summed in place: as
  // dKᵀ += Q_cᵀ dS and dVᵀ += dO_cᵀ P, whose right-hand operands (dS, P) the packing routine lays out (a transpose
  // of the small Q_c and dO_c costs less than one of dS and P).
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    Packed kt, vt, ks, ds_packed, p_packed;
    std::vector<bf16> ds(BLOCK * padded), p(BLOCK * padded), q_t(dim * BLOCK), grad_t(dim * BLOCK);
    std::vector<float> probs(BLOCK * padded), dprobs(BLOCK * padded), acc(BLOCK * dim);
    std::vector<float> key_sums(dim * padded), value_sums(dim * padded);  // dKᵀ, dVᵀ
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / kv_heads, g = task % kv_heads;
      kt.pack_transposed(keys(b, g, 0), length, keys.row_stride, dim, padded);
      vt.pack_transposed(values(b, g, 0), length, values.row_stride, dim, padded);
      ks.pack_rows(keys(b, g, 0), length, keys.row_stride, dim, padded);
      std::fill(key_sums.begin(), key_sums.end(), 0.f);
      std::fill(value_sums.begin(), value_sums.end(), 0.f);
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const float* lses = lse_data + (b * heads + h) * length;
        for (int64_t start = 0; start < length; start += BLOCK) {
          const int64_t rows = std::min(BLOCK, length - start);
          const int64_t first = band.first(start), stop = Band::end(start, rows), width = stop - first;
          gemm(rows, dim, queries(b, h, start), queries.row_stride, kt, 0, first, stop, probs.data(), width, false);
          gemm(rows, dim, grads(b, h, start), grads.row_stride, vt, 0, first, stop, dprobs.data(), width, false);
          for (int64_t i = 0; i < rows; ++i) {
            const float dot = sparkgpt::dot(grads(b, h, start + i), outs(b, h, start + i), dim);  // dO_i · O_i
            float *pr = probs.data() + i * width, *dpr = dprobs.data() + i * width;
            bf16 *p_row = p.data() + i * width, *ds_row = ds.data() + i * width;
            const int64_t low = band.low(start + i, first), high = Band::high(start + i, first);
            exp_row(pr, low, high, scaling, lses[start + i]);  // P, from the forward's log-sum-exp
            for (int64_t j = low; j < high; ++j) dpr[j] = pr[j] * (dpr[j] - dot);
            for (bf16* row : {p_row, ds_row}) {
              std::fill(row, row + low, bf16(0.f));
              std::fill(row + high, row + width, bf16(0.f));
            }
            sparkgpt::to_bf16(pr + low, p_row + low, high - low);
            sparkgpt::to_bf16(dpr + low, ds_row + low, high - low, scaling);
          }
          gemm(rows, width, ds.data(), width, ks, first, 0, dim, acc.data(), dim, false);
          for (int64_t i = 0; i < rows; ++i) sparkgpt::to_bf16(acc.data() + i * dim, grad_queries(b, h, start + i), dim);
          ds_packed.pack_rows(ds.data(), rows, width, width, BLOCK);
          p_packed.pack_rows(p.data(), rows, width, width, BLOCK);
          sparkgpt::vnni::transpose(queries(b, h, start), rows, queries.row_stride, dim, BLOCK, q_t.data());
          sparkgpt::vnni::transpose(grads(b, h, start), rows, grads.row_stride, dim, BLOCK, grad_t.data());
          gemm(dim, BLOCK, q_t.data(), BLOCK, ds_packed, 0, 0, width, key_sums.data() + first, padded, true);
          gemm(dim, BLOCK, grad_t.data(), BLOCK, p_packed, 0, 0, width, value_sums.data() + first, padded, true);
        }
      }
      sparkgpt::vnni::transpose_rounded(key_sums.data(), dim, length, padded, grad_keys(b, g, 0),
                                        grad_keys.row_stride);
      sparkgpt::vnni::transpose_rounded(value_sums.data(), dim, length, padded, grad_values(b, g, 0),
                                        grad_values.row_stride);
    }
    blas::brgemm_release();
  });
  return {grad_q, grad_k, grad_v};
}

// Whether this CPU and this torch build run the micro-kernel on operands packed as vnni.h packs them: oneDNN takes
// pairs-of-rows bf16 operands on AVX-512 CPUs and AMX ones (torch's `could_pack` asks for AMX, but only its own
// packing needs that), and torch refuses them elsewhere. So multiply a small product of known integers, exact in
// bf16 and float32, and compare: a refusal or a wrong layout both answer false.
bool attention_bf16_supported() {
  constexpr int64_t m = 2, n = 16, depth = 4;
  bf16 a[m * depth], b[depth * n];
  float c[m * n], expected[m * n] = {};
  for (int64_t i = 0; i < m; ++i)
    for (int64_t k = 0; k < depth; ++k) a[i * depth + k] = static_cast<float>(i + 2 * k - 3);
  for (int64_t k = 0; k < depth; ++k)
    for (int64_t j = 0; j < n; ++j) {
      const float value = static_cast<float>((j * 3 + k) % 7 - 3);
      b[((k / 2) * n + j) * 2 + k % 2] = value;  // row pairs interleaved, as vnni.h packs a panel
      for (int64_t i = 0; i < m; ++i) expected[i * n + j] += static_cast<float>(a[i * depth + k]) * value;
    }
  try {
    blas::brgemm(m, n, depth, depth, n, n, /*add_C=*/false, a, b, c, /*is_vnni=*/true);
    blas::brgemm_release();
  } catch (const std::exception&) {  // torch's refusal (c10::Error) or oneDNN's (no kernel for this ISA)
    return false;
  }
  return std::equal(c, c + m * n, expected);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparkgpt, m) {
  m.def("attention_bf16_forward(Tensor q, Tensor k, Tensor v, int window, float scale) -> (Tensor, Tensor)");
  m.def("attention_bf16_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int window, "
        "float scale) -> (Tensor, Tensor, Tensor)");
  m.def("attention_bf16_supported() -> bool", attention_bf16_supported);
}

TORCH_LIBRARY_IMPL(sparkgpt, CPU, m) {
  m.impl("attention_bf16_forward", attention_bf16_forward);
  m.impl("attention_bf16_backward", attention_bf16_backward);
}
