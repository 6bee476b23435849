// A Llama block's per-token steps for bfloat16 inference on the CPU, each one pass over memory instead of
// PyTorch's four to seven (at a 512-token prompt of SmolLM2 these small ops took a quarter of the bf16 forward):
// RMSNorm, SiLU(gate) ⊙ up, and the rotary turn. Each rounds to bf16 where PyTorch's composite does, so results
// match it to the last bit but for the order of a sum (RMSNorm's mean) and the last bit of e^x.
//
// bf16 only: float32 models keep PyTorch's ops, so their logits stay bit for bit what they were (a dynamic-int8
// model rounds its activations to int8, and there a last-bit change can move a near-tied greedy choice).
// layers.py and attention.py keep the PyTorch formulas, which are the references in tests/test_native.py and what
// autograd and torch.compile see; these run only outside both (native.inference_ops).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "vector_math.h"

#include <cmath>
#include <string>

namespace {

using at::Tensor;
using bf16 = c10::BFloat16;

inline float rounded(float x) { return static_cast<float>(bf16(x)); }

void check_bf16(const Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16, what, ": bfloat16 expected");
}

// x / sqrt(mean(x²) + eps) in float32, rounded to bf16, times weight (rounded again): RMSNorm in layers.py.
Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps) {
  check_bf16(x, "rms_norm");
  check_bf16(weight, "rms_norm");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.numel() == x.size(-1),
              "rms_norm: contiguous x, and a weight of x's last size");
  Tensor out = at::empty_like(x);
  const int64_t dim = x.size(-1), rows = x.numel() / dim;
  const bf16 *in = x.const_data_ptr<bf16>(), *w = weight.const_data_ptr<bf16>();
  bf16* o = out.mutable_data_ptr<bf16>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const bf16* row = in + r * dim;
      bf16* dst = o + r * dim;
      const float inverse = 1.f / std::sqrt(sparkgpt::dot(row, row, dim) / dim + static_cast<float>(eps));
#if defined(__AVX512F__) && defined(__AVX512BW__)
      using namespace sparkgpt;
      for_lanes(0, dim, [&](int64_t c, __mmask16 lanes) {
        const __m512 normalised = round16(_mm512_mul_ps(load16(row + c, lanes), _mm512_set1_ps(inverse)));
        store16(dst + c, _mm512_mul_ps(load16(w + c, lanes), normalised), lanes);
      });
#else
      for (int64_t c = 0; c < dim; ++c)
        dst[c] = bf16(static_cast<float>(w[c]) * rounded(static_cast<float>(row[c]) * inverse));
#endif
    }
  });
  return out;
}

// SiLU(gate) ⊙ up, SiLU rounded to bf16 first: SwiGLUFFN in layers.py.
Tensor silu_mul(const Tensor& gate, const Tensor& up) {
  check_bf16(gate, "silu_mul");
  check_bf16(up, "silu_mul");
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous() && up.sizes() == gate.sizes(),
              "silu_mul: contiguous gate and up of one shape");
  Tensor out = at::empty_like(gate);
  const bf16 *g = gate.const_data_ptr<bf16>(), *u = up.const_data_ptr<bf16>();
  bf16* o = out.mutable_data_ptr<bf16>();
  at::parallel_for(0, gate.numel(), 4096, [&](int64_t begin, int64_t end) {
#if defined(__AVX512F__) && defined(__AVX512BW__)
    using namespace sparkgpt;
    for_lanes(begin, end, [&](int64_t i, __mmask16 lanes) {
      const __m512 x = load16(g + i, lanes);
      const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));  // e^-x: inf past 88, and SiLU then -0
      const __m512 silu = round16(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.f), e)));
      store16(o + i, _mm512_mul_ps(silu, load16(u + i, lanes)), lanes);
    });
#else
    for (int64_t i = begin; i < end; ++i) {
      const float x = static_cast<float>(g[i]);
      o[i] = bf16(rounded(x / (1.f + std::exp(-x))) * static_cast<float>(u[i]));
    }
#endif
  });
  return out;
}

// x · cos + rotate_half(x) · sin, each product rounded to bf16, then their sum: apply_rotary in attention.py.
// x [B, H, T, d] (unit stride on d), cos and sin [B or 1, 1, T, d] contiguous; the result is laid out as x.
Tensor rotary(const Tensor& x, const Tensor& cos, const Tensor& sin) {
  for (const Tensor* t : {&x, &cos, &sin}) check_bf16(*t, "rotary");
  TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1 && cos.is_contiguous() && sin.is_contiguous() &&
                  (cos.size(0) == x.size(0) || cos.size(0) == 1) && cos.size(1) == 1 && cos.size(2) == x.size(2) &&
                  cos.size(3) == x.size(3) && sin.sizes() == cos.sizes(),
              "rotary: x [B, H, T, d] and cos, sin [B or 1, 1, T, d]");
  Tensor out = at::empty_like(x);
  const int64_t heads = x.size(1), length = x.size(2), dim = x.size(3), half = dim / 2;
  const bf16 *in = x.const_data_ptr<bf16>(), *c = cos.const_data_ptr<bf16>(), *s = sin.const_data_ptr<bf16>();
  bf16* o = out.mutable_data_ptr<bf16>();
  at::parallel_for(0, x.size(0) * length, 16, [&](int64_t begin, int64_t end) {
    for (int64_t bt = begin; bt < end; ++bt) {
      const int64_t b = bt / length, t = bt % length;
      const int64_t angles = (cos.size(0) == 1 ? t : bt) * dim;
      const bf16 *cr = c + angles, *sr = s + angles;
      for (int64_t h = 0; h < heads; ++h) {
        const bf16* row = in + b * x.stride(0) + h * x.stride(1) + t * x.stride(2);
        bf16* dst = o + b * out.stride(0) + h * out.stride(1) + t * out.stride(2);
#if defined(__AVX512F__) && defined(__AVX512BW__)
        using namespace sparkgpt;
        for_lanes(0, half, [&](int64_t i, __mmask16 lanes) {  // the pairs (i, i + d/2)
          const __m512 low = load16(row + i, lanes), high = load16(row + half + i, lanes);
          store16(dst + i,
                  _mm512_sub_ps(round16(_mm512_mul_ps(low, load16(cr + i, lanes))),
                                round16(_mm512_mul_ps(high, load16(sr + i, lanes)))),
                  lanes);
          store16(dst + half + i,
                  _mm512_add_ps(round16(_mm512_mul_ps(high, load16(cr + half + i, lanes))),
                                round16(_mm512_mul_ps(low, load16(sr + half + i, lanes)))),
                  lanes);
        });
#else
        for (int64_t i = 0; i < dim; ++i) {
          const float turned = i < half ? -static_cast<float>(row[i + half]) : static_cast<float>(row[i - half]);
          dst[i] = bf16(rounded(static_cast<float>(row[i]) * static_cast<float>(cr[i])) +
                        rounded(turned * static_cast<float>(sr[i])));
        }
#endif
      }
    }
  });
  return out;
}

// Which loops this build compiled (its flags decide: -march=native on the CPU at hand), for `sparkgpt info`.
std::string compiled_loops() {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
  return "AVX-512 with AVX512-BF16";
#elif defined(__AVX512F__) && defined(__AVX512BW__)
  return "AVX-512";
#else
  return "portable";
#endif
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(sparkgpt, m) {
  m.def("compiled_loops() -> str", compiled_loops);
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin) -> Tensor");
}

TORCH_LIBRARY_IMPL(sparkgpt, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("silu_mul", silu_mul);
  m.impl("rotary", rotary);
}
