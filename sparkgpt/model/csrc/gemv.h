// What gemv.cpp offers the other kernels: the int4 decode product, for decode_layers.cpp's projections.
#pragma once

#include <ATen/ATen.h>

namespace sparkgpt {

// x [rows, K] bf16 times an int4 weight packed by quant.py's `pack_int4_tiles` -> [rows, N] bf16 (gemv.cpp); the
// arguments in torch._weight_int4pack_mm_for_cpu's order.
at::Tensor int4_gemv(const at::Tensor& x, const at::Tensor& weight, int64_t group_size, const at::Tensor& scales);

// x [rows, K] bf16 times an int8 weight packed by quant.py's `pack_int8_weight`, float32 row scales [N] -> [rows, N]
// bf16 (gemv.cpp): 8-bit activations per group of 32 inputs.
at::Tensor int8_weight_gemv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scales);

}  // namespace sparkgpt
