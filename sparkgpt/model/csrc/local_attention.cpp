// Sliding-window causal attention on the CPU, forward and backward, touching only the band of keys each chunk of
// queries can see: query i attends keys j with i - w < j <= i.
//
// sparse.py's `_LocalWindowAttention` (torch's flash kernel over chunk windows with a mask) and the masked dense
// SDPA are its references in the tests. Here each chunk of C queries multiplies only its own key range
// [max(0, start - w + 1), start + C), at most C + w - 1 keys, with the matrix library's GEMM on views of the inputs
// (no padded or gathered copies of K and V); scaling, the band mask and softmax are one loop over the chunk's
// scores, which stay in cache. Each (batch, head) pair is one task, so its key and value gradients are summed in
// place with no other task writing them.
//
//   forward:  S = Q_c K_rᵀ · scale (band-masked), P = softmax(S), O_c = P V_r, lse = log Σ exp(S)
//   backward: P = exp(S - lse), dP = dO_c V_rᵀ, dS = P ⊙ (dP - rowsum(dO_c ⊙ O_c)),
//             dQ_c = dS K_r · scale, dK_r += dSᵀ Q_c · scale, dV_r += Pᵀ dO_c
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include "vector_math.h"

#include <algorithm>
#include <cmath>
#include <optional>
#include <tuple>

namespace {

using at::Tensor;
using sparkgpt::exp_row;
using sparkgpt::max_row;

struct Band {
  int64_t window, chunk;
  // key range [first, end) of the chunk starting at query `start` in a sequence of `length`
  int64_t first(int64_t start) const { return std::max<int64_t>(0, start - window + 1); }
  int64_t end(int64_t start, int64_t length) const { return std::min(start + chunk, length); }
};

// In place on scores [rows, keys] of queries start.., keys first..: P = softmax over each query's band (others 0);
// lse[i] = log-sum-exp of the scaled band scores.
void band_softmax(float* scores, int64_t rows, int64_t keys, int64_t ld, int64_t start, int64_t first,
                  int64_t window, float scale, float* lse) {
  for (int64_t i = 0; i < rows; ++i) {
    float* row = scores + i * ld;
    const int64_t query = start + i;
    const int64_t low = std::max<int64_t>(0, query - window + 1 - first), high = query - first + 1;  // [low, high)
    const float top = max_row(row, low, high) * scale;  // scale > 0
    std::fill(row, row + low, 0.f);
    std::fill(row + high, row + keys, 0.f);
    const float total = exp_row(row, low, high, scale, top);
    const float inverse = 1.f / total;
    for (int64_t j = low; j < high; ++j) row[j] *= inverse;
    lse[i] = top + std::log(total);
  }
}

// q, k, v [B, H, T, d] float32 (any strides with unit stride on d) -> out [B, H, T, d], lse [B, H, T]
// (An autograd.Function calls these with tensors that require grad: the GEMMs take detached views, so nothing is
// recorded, also on the worker threads, where a thread-local no-grad guard would not reach.)
std::tuple<Tensor, Tensor> local_attention_forward(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                                    int64_t window, double scale, int64_t chunk) {
  const Tensor q = q_in.detach(), k = k_in.detach(), v = v_in.detach();
  TORCH_CHECK(q.scalar_type() == at::kFloat && q.dim() == 4 && q.sizes() == k.sizes() && q.sizes() == v.sizes(),
              "local attention: float32 q, k, v of one shape [B, H, T, d]");
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2);
  const Band band{window, chunk};
  // in q's own layout (the projections' [B, T, H, d] seen as [B, H, T, d]), so the caller's merge of heads
  // is a view, not a copy; the gradients below likewise
  Tensor out = at::empty_like(q);
  Tensor lse = at::empty({batch, heads, length}, q.options());
  // out is an inference tensor under torch.inference_mode, and the pool's threads do not inherit the mode: each
  // takes the caller's, or writing into out would be refused there
  const bool inference = c10::InferenceMode::is_enabled();
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    std::optional<c10::InferenceMode> mode;
    if (inference) mode.emplace();
    Tensor scores = at::empty({chunk, chunk + window - 1}, q.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const Tensor qs = q[b][h], ks = k[b][h], vs = v[b][h], os = out[b][h];
      float* lses = lse[b][h].data_ptr<float>();
      for (int64_t start = 0; start < length; start += chunk) {
        const int64_t first = band.first(start), stop = band.end(start, length);
        const int64_t rows = stop - start, keys = stop - first;
        Tensor s = scores.narrow(0, 0, rows).narrow(1, 0, keys);
        at::mm_out(s, qs.narrow(0, start, rows), ks.narrow(0, first, keys).t());
        band_softmax(s.data_ptr<float>(), rows, keys, s.stride(0), start, first, window,
                     static_cast<float>(scale), lses + start);
        Tensor o = os.narrow(0, start, rows);
        at::mm_out(o, s, vs.narrow(0, first, keys));
      }
    }
  });
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> local_attention_backward(const Tensor& grad_in, const Tensor& q_in,
                                                            const Tensor& k_in, const Tensor& v_in,
                                                            const Tensor& out, const Tensor& lse, int64_t window,
                                                            double scale, int64_t chunk) {
  const Tensor grad = grad_in.detach(), q = q_in.detach(), k = k_in.detach(), v = v_in.detach();
  const int64_t batch = q.size(0), heads = q.size(1), length = q.size(2);
  const Band band{window, chunk};
  const float scaling = static_cast<float>(scale);
  Tensor grad_q = at::empty_like(q);
  Tensor grad_k = at::zeros_like(k);
  Tensor grad_v = at::zeros_like(v);
  // D_i = dO_i · O_i for every query: [B, H, T]
  const Tensor row_dots = (grad * out).sum(-1);
  at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) {
    Tensor probs = at::empty({chunk, chunk + window - 1}, q.options());
    Tensor dprobs = at::empty({chunk, chunk + window - 1}, q.options());
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / heads, h = task % heads;
      const Tensor qs = q[b][h], ks = k[b][h], vs = v[b][h], gs = grad[b][h];
      Tensor gq = grad_q[b][h], gk = grad_k[b][h], gv = grad_v[b][h];
      const float* lses = lse[b][h].data_ptr<float>();
      const float* dots = row_dots[b][h].data_ptr<float>();
      for (int64_t start = 0; start < length; start += chunk) {
        const int64_t first = band.first(start), stop = band.end(start, length);
        const int64_t rows = stop - start, keys = stop - first;
        Tensor p = probs.narrow(0, 0, rows).narrow(1, 0, keys);
        Tensor dp = dprobs.narrow(0, 0, rows).narrow(1, 0, keys);
        const Tensor q_chunk = qs.narrow(0, start, rows), g_chunk = gs.narrow(0, start, rows);
        const Tensor k_range = ks.narrow(0, first, keys), v_range = vs.narrow(0, first, keys);
        at::mm_out(p, q_chunk, k_range.t());
        at::mm_out(dp, g_chunk, v_range.t());
        float* pp = p.data_ptr<float>();
        float* dpp = dp.data_ptr<float>();
        const int64_t ld = p.stride(0);
        for (int64_t i = 0; i < rows; ++i) {
          const int64_t query = start + i;
          const int64_t low = std::max<int64_t>(0, query - window + 1 - first), high = query - first + 1;
          float* pr = pp + i * ld;
          float* dr = dpp + i * ld;
          std::fill(pr, pr + low, 0.f);
          std::fill(dr, dr + low, 0.f);
          std::fill(pr + high, pr + keys, 0.f);
          std::fill(dr + high, dr + keys, 0.f);
          exp_row(pr, low, high, scaling, lses[query]);  // P, from the forward's log-sum-exp
          const float dot = dots[query];
          for (int64_t j = low; j < high; ++j) dr[j] = pr[j] * (dr[j] - dot) * scaling;  // dS, scale folded in
        }
        Tensor gq_chunk = gq.narrow(0, start, rows);
        at::mm_out(gq_chunk, dp, k_range);
        Tensor gk_range = gk.narrow(0, first, keys), gv_range = gv.narrow(0, first, keys);
        gk_range.addmm_(dp.t(), q_chunk);
        gv_range.addmm_(p.t(), g_chunk);
      }
    }
  });
  return {grad_q, grad_k, grad_v};
}

}  // namespace

// Declared, then implemented for the CPU key (not as composites), so torch.compile can trace a model that calls
// them through the shapes native.py registers; sparse.py's autograd.Function pairs them.
TORCH_LIBRARY_FRAGMENT(sparkgpt, m) {
  m.def("local_attention_forward(Tensor q, Tensor k, Tensor v, int window, float scale, int chunk) "
        "-> (Tensor, Tensor)");
  m.def("local_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, int window, "
        "float scale, int chunk) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(sparkgpt, CPU, m) {
  m.impl("local_attention_forward", local_attention_forward);
  m.impl("local_attention_backward", local_attention_backward);
}
