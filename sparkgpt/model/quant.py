"""Quantised weights: int8 and int4 linear layers behind one interface (their checkpoint format is
`sparkgpt.checkpoint.quantized`).

A weight matrix W [out, in] is stored as small integers and scales:

- int8: symmetric, one scale per output row: W ≈ q · s, q ∈ [-127, 127].
- int4: asymmetric, one scale and one zero per group of 32 inputs of a row: W ≈ (q - 8) · s + z, q ∈ [0, 15],
  two values per byte (column 2j in the low nibble, 2j + 1 in the high one); s and z are bfloat16, the kernel's
  own precision, so a saved checkpoint holds exactly what the kernel multiplies by. GGUF's Q4_0 (W = d · (q - 8))
  and Q4_1 (W = d · q + m) blocks are this layout with z = 0 and z = m + 8d, so they load without a float round
  trip. The output head (and the token embedding tied to it) stays int8 under int4: it is one large matrix that
  the int8 kernel serves fastest, and llama.cpp's files keep it at 8 bits too.

Kernels (measurements per kernel and shape: benchmarks/RESULTS.md, "Quantised kernels"): decode rows (one token
each, up to `DECODE_ROWS`) go through an integer kernel: torch's (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`: bf16 activations) or, for an int4 model's layers (its int8 ones included), ours
(`int8_weight_gemv`, `int4_gemv`: 8-bit activations per group of inputs, as llama.cpp's quantised products take
them, and exact integer sums, so that several rows cost little more than one), whichever was timed faster here
(`decode_kernel`); an int8 model keeps torch's bf16 activations (`QuantizedLinear.int8_activations`). The output
head takes 8-bit activations, one scale per row so that no row's result depends on another's: an exact int8 product
over all rows at once where `torch._int_mm` multiplies exactly (`exact_int8_matmul`: VNNI CPUs), by it or by the
native `int8_gemv`, whichever was timed faster here (`native.int8_matmul`), else fbgemm's dynamic int8 linear row by
row. One 8-bit scale per row elsewhere blurs the outliers of the o_proj and down_proj inputs and costs perplexity,
while on the head it costs none and saves most of its time; one per group of 32 costs 0.2-0.7% of a text's
perplexity decoded token by token (`benchmarks/bench_decode_quality.py`). A prompt's rows go through the same kernel
while they are few enough that it beats dequantising (`kernel_rows`, timed per shape: a chat turn's few dozen
tokens, a draft being checked); more rows dequantise the matrix and multiply in bf16 where this CPU's bf16 matmul is
the faster (`prefill_dtype`, timed), else in float32. Elsewhere (CUDA) every call dequantises and multiplies in the
activations' dtype.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from sparkgpt import hardware
from sparkgpt.errors import SparkGPTError
from sparkgpt.model import native

METHODS = ("int8", "int4")
GROUP_SIZE = 32
DECODE_ROWS = 16  # decode steps of at most this many rows use the integer kernels; prompts dequantise
_PREFILL_DTYPES: dict[tuple[int, int], torch.dtype] = {}  # (in, out) -> the dtype prompts are multiplied in
_KERNEL_ROWS: dict[tuple[str, int, int, int], int] = {}  # (kernel, in, out, group) -> prompt rows the kernel takes
_INT4_INNER_K_TILES = 8  # torch's CPU int4 packing: inner k tiles of 2, 4 or 8 (8 measured fastest)
# The integer kernel a layer's packed (weight, scales) are for, by csrc/decode_layers.cpp's code for it.
KERNELS = {"int8 torch": 0, "int4 torch": 1, "int4 native": 2, "int8 native": 3}


def check_method(method: str) -> str:
    if method not in METHODS:
        raise SparkGPTError(f"quantization method {method!r} is not supported; expected one of {', '.join(METHODS)}")
    return method


# ---- quantise / dequantise ----------------------------------------------------------------------------------

def quantize_int8(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """{"qweight": int8 [out, in], "scales": float32 [out]}: symmetric per row, W ≈ q · s."""
    weight = weight.detach().float().contiguous()  # kernels need row-major integers (GPT-2's weights are not)
    scales = (weight.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    qweight = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return {"qweight": qweight, "scales": scales}


def quantize_int4(weight: torch.Tensor, group_size: int = GROUP_SIZE) -> dict[str, torch.Tensor]:
    """{"qweight": uint8 [out, in / 2], "scales", "zeros": bfloat16 [out, in / group]}: per group of inputs,
    W ≈ (q - 8) · s + z with q ∈ [0, 15] spanning the group's [min, max]."""
    rows, cols = weight.shape
    if cols % group_size:
        raise SparkGPTError(f"int4 needs the input width ({cols}) to be a multiple of the group size {group_size}")
    groups = weight.detach().float().view(rows, cols // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = ((high - low) / 15).clamp(min=1e-10).bfloat16()
    zeros = (low + 8 * scales.float()).bfloat16()
    # Levels against the rounded scale and zero the kernel will use, so rounding them costs no extra error.
    levels = torch.round((groups - zeros.float()[..., None]) / scales.float()[..., None] + 8).clamp(0, 15)
    return {"qweight": pack_nibbles(levels.to(torch.uint8).view(rows, cols)), "scales": scales, "zeros": zeros}


def pack_nibbles(levels: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, cols] of values 0..15 -> [rows, cols / 2], column 2j low nibble, 2j + 1 high."""
    return levels[:, 0::2] | (levels[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(packed.shape[0], -1)


def pack_int4_tiles(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 tensors in `int4_gemv`'s layout (csrc/gemv.cpp): the weight as uint8 [out / 16, in · 8], tiles of 16
    outputs in blocks of 8 inputs (64 bytes: output n's bytes 4n..4n+3 hold inputs 8j..8j+3 in their low nibbles,
    8j+4..8j+7 in their high ones), and the scales bf16 [out / 16, groups · 32]: per tile and group, 16 scales then
    16 zeros."""
    levels = unpack_nibbles(tensors["qweight"])
    rows, cols = levels.shape
    tiles, groups = rows // 16, tensors["scales"].shape[1]
    quads = levels.view(tiles, 16, cols // 8, 2, 4).permute(0, 2, 1, 4, 3)  # tile, block, output, input, half
    weight = (quads[..., 0] | (quads[..., 1] << 4)).reshape(tiles, cols * 8)
    per_tile = [tensors[name].reshape(tiles, 16, groups).transpose(1, 2) for name in ("scales", "zeros")]
    return weight, torch.stack(per_tile, dim=2).to(torch.bfloat16).reshape(tiles, groups * 32)


def pack_int8_weight(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 tensors in `int8_weight_gemv`'s layout (csrc/gemv.cpp): the weight as `native.pack_int8_tiles` lays it
    out with each byte + 128 (uint8, the operand VNNI takes unsigned), and the row scales in float32."""
    return native.pack_int8_tiles(tensors["qweight"]).view(torch.uint8) ^ 0x80, tensors["scales"].float().contiguous()


def pack_int8_torch(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 tensors as `torch._weight_int8pack_mm` takes them: (qweight, bf16 row scales)."""
    return tensors["qweight"], tensors["scales"].to(torch.bfloat16)


def pack_int4_torch(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """int4 tensors in `torch._weight_int4pack_mm_for_cpu`'s layout: (packed weight, scales and zeros)."""
    levels = unpack_nibbles(tensors["qweight"]).to(torch.int32)
    weight = torch._convert_weight_to_int4pack_for_cpu(levels, _INT4_INNER_K_TILES)
    scales, zeros = tensors["scales"], tensors["zeros"]
    return weight, torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()


PACKS = {"int8 torch": pack_int8_torch, "int8 native": pack_int8_weight, "int4 torch": pack_int4_torch,
         "int4 native": pack_int4_tiles}


def kernel_product(kernel: str, group_size: int = GROUP_SIZE) -> Callable[[torch.Tensor, torch.Tensor,
                                                                            torch.Tensor], torch.Tensor]:
    """`f(x, weight, scales)`: bf16 rows [rows, in] times a weight packed for `kernel` (`PACKS`) -> bf16 [rows, out];
    int4 in groups of `group_size` inputs."""
    if kernel == "int8 torch":
        return torch._weight_int8pack_mm
    if kernel == "int8 native":
        return native.ops().int8_weight_gemv
    product = native.ops().int4_gemv if kernel == "int4 native" else torch._weight_int4pack_mm_for_cpu
    return lambda x, weight, scales: product(x, weight, group_size, scales)


def dequantize(method: str, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The matrix [out, in] that quantised `tensors` stand for, in `dtype`. bfloat16 on the CPU (a prompt's
    matmul) is rebuilt by the native kernel in one pass where it is available: each value computed in float32
    and rounded once, so it equals the float32 matrix below rounded to bf16."""
    ops = native.ops() if dtype == torch.bfloat16 and tensors["qweight"].device.type == "cpu" else None
    if ops is not None:
        if method == "int8":
            return ops.dequantize_int8(tensors["qweight"], tensors["scales"])
        return ops.dequantize_int4(tensors["qweight"], tensors["scales"], tensors["zeros"],
                                   tensors["qweight"].shape[1] * 2 // tensors["scales"].shape[1])
    if method == "int8":
        return (tensors["qweight"].float() * tensors["scales"].float()[:, None]).to(dtype)
    levels = unpack_nibbles(tensors["qweight"])
    rows, groups = tensors["scales"].shape
    scales, zeros = tensors["scales"].float()[..., None], tensors["zeros"].float()[..., None]
    return (levels.view(rows, groups, -1).float() * scales + (zeros - 8 * scales)).view(rows, -1).to(dtype)


QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}


# ---- layers ---------------------------------------------------------------------------------------------------

def _fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines


_EXACT_INT_MM: list[bool] = []  # [whether torch._int_mm is exact here], probed once
_DECODE_KERNELS: dict[str, str] = {}  # method -> the decode kernel chosen for it on this CPU (a `KERNELS` key)


def exact_int8_matmul() -> bool:
    """Whether this CPU multiplies int8 rows by an int8 matrix exactly with `torch._int_mm` (oneDNN's VNNI path
    does; its AVX2 path sums byte pairs in saturating 16-bit lanes and gets large products wrong), probed once on
    full-range values. Exact integer products make each row's result independent of the rows beside it."""
    if not _EXACT_INT_MM:
        generator = torch.Generator().manual_seed(0)
        x = torch.randint(-127, 128, (3, 64), dtype=torch.int8, generator=generator)
        w = torch.randint(-127, 128, (64, 64), dtype=torch.int8, generator=generator)
        try:
            _EXACT_INT_MM.append(torch.equal(torch._int_mm(x, w.t()), x.int() @ w.int().t()))
        except RuntimeError:
            _EXACT_INT_MM.append(False)
    return _EXACT_INT_MM[0]


def decode_kernel(method: str) -> str:
    """Which kernel multiplies the decode rows of `method`'s layers in an int4 model on this CPU (a `KERNELS` key;
    an int8 model's layers keep torch's, see `QuantizedLinear.int8_activations`): "… native"
    (csrc/gemv.cpp's `int4_gemv` / `int8_weight_gemv`: 8-bit activations per group of inputs, as llama.cpp's
    quantised products take them, and exact integer sums, VNNI where compiled in) or "… torch"
    (`_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`: bf16 activations, float FMAs), whichever was timed faster
    for one row and for eight on a sweep of a small model's layers (cached per CPU). On a CPU with one FMA unit a
    row of bf16 products costs as much as reading the weight, so several rows (a batch, a draft being checked) cost
    several times one; byte products run four times as many multiplies an instruction. Untimed, the native kernel
    where it has VNNI."""
    library = native.ops()
    if library is None:
        return f"{method} torch"
    if method not in _DECODE_KERNELS:
        count, rows, columns = native.DECODE_SWEEP

        def random_layer(generator: torch.Generator) -> dict[str, torch.Tensor]:
            if method == "int8":
                return {"qweight": torch.randint(-127, 128, (rows, columns), generator=generator, dtype=torch.int8),
                        "scales": torch.rand(rows, generator=generator)}
            groups = columns // GROUP_SIZE
            return {"qweight": torch.randint(0, 256, (rows, columns // 2), generator=generator, dtype=torch.uint8),
                    "scales": torch.rand(rows, groups, generator=generator).bfloat16(),
                    "zeros": torch.rand(rows, groups, generator=generator).bfloat16()}

        _DECODE_KERNELS[method] = native.fastest_integer_product(
            f"{method} decode products", f"{method} decode kernel {count}x{rows}x{columns}",
            {kernel: (lambda generator, kernel=kernel: PACKS[kernel](random_layer(generator)), kernel_product(kernel))
             for kernel in (f"{method} torch", f"{method} native")}, torch.bfloat16, columns)
    return _DECODE_KERNELS[method]


def note_kernels() -> None:
    """Record for `sparkgpt info` which kernels quantised layers take on this CPU (see the module docstring)."""
    exact = "our int8_gemv" if native.int8_matmul() is not native.int_mm_rows else "torch._int_mm"
    head = (f"int8 activations per row through {exact}" if exact_int8_matmul() else
            "fbgemm's dynamic int8 linear, row by row" if _fbgemm_available() else "torch._weight_int8pack_mm")
    names = {"int8 torch": "torch._weight_int8pack_mm (bf16 activations)",
             "int8 native": "our int8_weight_gemv (8-bit activations per group; int8 models: torch's)",
             "int4 torch": "torch._weight_int4pack_mm_for_cpu (bf16 activations)",
             "int4 native": "our int4_gemv (8-bit activations per group)"}
    hardware.note("quantised decode (≤ 16 rows)", f"int8: {names[decode_kernel('int8')]}; int4: "
                  f"{names[decode_kernel('int4')]}; output head: {head}",
                  "integer kernels read 4× fewer bytes than bf16")
    dequantize = "native one-pass" if native.ops() is not None else "PyTorch"
    here = hardware.cpu()
    matmul = "AMX" if here.has("amx_bf16") else "AVX512-BF16" if here.native_bf16 else "bf16 emulated in float32"
    hardware.note("quantised prefill", f"the decode kernels up to the rows timed faster, then {dequantize} "
                  f"dequantisation and a float32 or bf16 matmul ({matmul}), whichever was timed faster",
                  "many rows: a dense matmul beats every integer kernel")


def prefill_dtype(in_features: int, out_features: int) -> torch.dtype:
    """The dtype a CPU multiplies a prompt's rows by a dequantised [out, in] matrix in: bfloat16 where its bf16
    matmul is the faster (AMX, most AVX512-BF16 CPUs), float32 where it is not (a CPU may flag AVX512-BF16 and run
    bf16 at half the float32 rate: benchmarks/RESULTS.md). Timed once per shape and CPU (`hardware.fastest`,
    cached); bfloat16 when timing is off."""
    key = (in_features, out_features)
    if key not in _PREFILL_DTYPES:
        operands: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

        def multiply(dtype: torch.dtype) -> Callable[[], Any]:
            def run() -> torch.Tensor:
                if dtype not in operands:  # made on first use: an untimed choice allocates nothing
                    operands[dtype] = (torch.randn(256, in_features).to(dtype),
                                       torch.randn(out_features, in_features).to(dtype))
                return F.linear(*operands[dtype])
            return run

        chosen = hardware.fastest(f"quantised layers' prompt matmul ({out_features}×{in_features})",
                                  f"quant-prefill-{out_features}x{in_features}",
                                  {"bfloat16": multiply(torch.bfloat16), "float32": multiply(torch.float32)})
        _PREFILL_DTYPES[key] = torch.bfloat16 if chosen == "bfloat16" else torch.float32
    return _PREFILL_DTYPES[key]


def kernel_rows(layer: QuantizedLinear) -> int:
    """The most rows of a prompt this CPU multiplies faster through the layer's decode kernel than
    by dequantising the weight and multiplying: the kernel reads 4 or 8 bits per weight, dequantising writes the
    whole matrix in floats first, which pays off only over many rows. Timed once per method and shape at 16, 32,
    ..., 512 rows until dequantising wins (`hardware.fastest`, cached); 0 when timing is off."""
    key = (layer.kernel_name, layer.in_features, layer.out_features, layer.group_size)
    if key not in _KERNEL_ROWS:
        most = 0
        for rows in (DECODE_ROWS, 32, 64, 128, 256, 512):
            x = torch.randn(rows, layer.in_features)
            compute = prefill_dtype(layer.in_features, layer.out_features)
            candidates = {"dequantise": lambda x=x, compute=compute: F.linear(x.to(compute), layer.dequantize(compute)),
                          "kernel": lambda x=x, rows=rows: layer.decode_kernel(x, rows)}
            shape = f"{layer.method} {layer.out_features}×{layer.in_features}"
            if hardware.fastest(f"a quantised {shape} layer's prompt of {rows} rows", f"quant-kernel-rows-"
                                f"{layer.kernel_name}-{layer.out_features}x{layer.in_features}-g{layer.group_size}-{rows}",
                                candidates) != "kernel":
                break
            most = rows
        _KERNEL_ROWS[key] = most
    return _KERNEL_ROWS[key]


class QuantizedLinear(nn.Module):
    """y = x Wᵀ + b with W quantised (`method` "int8" or "int4"); a drop-in replacement for nn.Linear.

    The stored tensors (`qweight`, `scales`, and `zeros` for int4) are buffers, so they follow `.to(device)` and
    appear in the state dict; the kernels' own packed layouts are built from them on first use and kept beside.
    """

    def __init__(self, in_features: int, out_features: int, method: str, bias: bool = False,
                 group_size: int = GROUP_SIZE, device: torch.device | str | None = None,
                 quantize_activations: bool = False, int8_activations: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.method, self.group_size = check_method(method), group_size
        # Whether an int8 layer's decode kernel may round its inputs to 8 bits per group of 32, as int4 layers' do:
        # in an int4 model (a GGUF file's 5-8-bit matrices; llama.cpp computes them so), not in an int8 model,
        # whose 8-bit weights lose less than 8-bit inputs would (SmolLM2: 1.9% of its perplexity against < 1%).
        self.int8_activations = int8_activations
        # int8 decode kernel: 8-bit activations (the head) if True, else bfloat16 ones (module docstring)
        self.quantize_activations = quantize_activations and method == "int8" and (
            _fbgemm_available() or exact_int8_matmul())
        if method == "int8":
            self.register_buffer("qweight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=torch.float32, device=device))
        else:
            groups = in_features // group_size
            self.register_buffer("qweight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                        device=device))
            self.register_buffer("scales", torch.empty(out_features, groups, dtype=torch.bfloat16, device=device))
            self.register_buffer("zeros", torch.empty(out_features, groups, dtype=torch.bfloat16, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        self._packed: Any = None
        self._packed_from: torch.Tensor | None = None
        self._kernel = f"{method} torch"  # what `_packed` is for (`kernel_name`)
        self._exact_cache: tuple[torch.Tensor, torch.Tensor] | None = None  # `_exact_operands`
        self._exact_of: tuple[torch.Tensor, Callable] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, method: str, group_size: int = GROUP_SIZE,
                    quantize_activations: bool = False, int8_activations: bool = False) -> QuantizedLinear:
        tensors = quantize_int8(linear.weight) if method == "int8" else quantize_int4(linear.weight, group_size)
        layer = cls(linear.in_features, linear.out_features, method, linear.bias is not None, group_size,
                    linear.weight.device, quantize_activations, int8_activations)
        layer.assign(tensors, linear.bias)
        return layer

    def assign(self, tensors: dict[str, torch.Tensor], bias: torch.Tensor | None = None) -> None:
        """Take quantised tensors (as `quantize_int8` / `quantize_int4` return them) as this layer's weight."""
        for name, tensor in tensors.items():
            own = getattr(self, name)
            if tensor.shape != own.shape or tensor.dtype != own.dtype:
                raise SparkGPTError(f"quantised tensor {name}: {tuple(tensor.shape)} {tensor.dtype}; expected "
                                    f"{tuple(own.shape)} {own.dtype}")
            setattr(self, name, tensor.to(own.device))
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().float().to(self.qweight.device), requires_grad=False)
        self._packed, self._packed_from = None, None

    def quantized_tensors(self) -> dict[str, torch.Tensor]:
        names = ("qweight", "scales") if self.method == "int8" else ("qweight", "scales", "zeros")
        return {name: getattr(self, name) for name in names}

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W [out, in] in `dtype`."""
        return dequantize(self.method, self.quantized_tensors(), dtype)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.method == "int4" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}{group}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if x.device.type != "cpu":
            return F.linear(x, self.dequantize(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        # Decode rows (one token per row: [rows, in] or [B, 1, in]) take the integer kernels; a prompt takes them
        # while its rows are few enough (`kernel_rows`). The kernels compute each row alone, so a sequence's numbers
        # depend on whether its forward had more rows than that, never on what the other rows hold.
        several_per_row = x.dim() > 2 and x.shape[-2] > 1
        kernel = ((not several_per_row and rows <= DECODE_ROWS and (self.has_kernel or self.quantize_activations))
                  or (self.has_kernel and not self.quantize_activations and rows <= kernel_rows(self)))
        if not kernel:
            compute = prefill_dtype(self.in_features, self.out_features)
            out = F.linear(x.to(compute), self.dequantize(compute))
            out = out.to(x.dtype)
            return out if self.bias is None else out + self.bias.to(x.dtype)
        return self.decode_kernel(x, rows)

    @property
    def has_kernel(self) -> bool:
        """Whether a decode kernel (not fbgemm's dynamic int8) takes this shape: `_weight_int8pack_mm` multiples of
        64 (it gave wrong results and crashed on some other shapes in torch 2.13); int4 layers exist only for shapes
        the int4 kernels take (`layer_method`)."""
        return self.method == "int4" or (self.in_features % 64 == 0 and self.out_features % 64 == 0)

    def row_kernel(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """For the lean decode step: x [rows <= DECODE_ROWS, in] (float32 or bfloat16) -> x Wᵀ + b [rows, out]
        (bfloat16 without a bias), the decode kernel with no per-call checks (about 14 µs less a call);
        None where `forward` must decide (off the CPU, the head's 8-bit activations, a shape the kernel refuses)."""
        operands = self.kernel_operands()
        if operands is None:
            return None
        (weight, scales), product = operands, kernel_product(self._kernel, self.group_size)

        def kernel(x: torch.Tensor) -> torch.Tensor:
            return product(x.to(torch.bfloat16), weight, scales)
        bias = self.bias
        return kernel if bias is None else lambda x: kernel(x) + bias

    def kernel_operands(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The decode kernel's (weight, scales) in its layout (`PACKS`), as `row_kernel` and the native decode step
        pass them, for the kernel chosen here (`kernel_name`); None where `forward` must decide (see
        `row_kernel`)."""
        if self.qweight.device.type != "cpu" or self.quantize_activations or not self.has_kernel:
            return None
        return self._packed if self._packed_from is self.qweight else self._pack()

    @property
    def kernel_name(self) -> str:
        """The key in `KERNELS` of the kernel `kernel_operands` are packed for."""
        if self._packed_from is not self.qweight:
            self._pack()
        return self._kernel

    def decode_kernel(self, x: torch.Tensor, rows: int) -> torch.Tensor:
        """The integer kernel for a few rows (CPU). The head's 8-bit activations take one scale per row, so that
        each row computes what it would alone: rows quantised each by its own absolute maximum and multiplied exactly in
        integers (`native.int8_matmul`: one pass over the weight for all rows) where that is exact (our kernel
        always; torch._int_mm on VNNI CPUs and for widths that are multiples of 8), else fbgemm's dynamic linear
        called row by row (its one scale per call would tie the rows of a batch together)."""
        shape = (*x.shape[:-1], self.out_features)
        product = native.int8_matmul() if self.quantize_activations else None
        if product is not None and (product is not native.int_mm_rows or (
                exact_int8_matmul() and self.in_features % 8 == self.out_features % 8 == 0)):
            flat = x.reshape(rows, self.in_features).float()
            row_scales = (flat.abs().amax(dim=1, keepdim=True) / 127).clamp(min=torch.finfo(torch.float32).tiny)
            levels = torch.round(flat / row_scales).to(torch.int8)
            out = product(levels, *self._exact_operands(product), row_scales, self.scales)
            return (out if self.bias is None else out + self.bias).to(x.dtype).view(shape)
        packed = self._packed if self._packed_from is self.qweight else self._pack()
        if self.quantize_activations:  # fbgemm's dynamic int8 linear, row by row
            if rows == 1:
                return torch.ops.quantized.linear_dynamic(x.float(), packed[1], False).to(x.dtype)
            per_row = [torch.ops.quantized.linear_dynamic(row, packed[1], False)
                       for row in x.float().reshape(rows, 1, self.in_features)]
            return torch.cat(per_row).to(x.dtype).view(shape)
        out = kernel_product(self._kernel, self.group_size)(x.reshape(-1, self.in_features).to(torch.bfloat16),
                                                            *packed).to(x.dtype)
        return (out if self.bias is None else out + self.bias.to(x.dtype)).view(shape)

    def _exact_operands(self, product: Callable) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, row sums Σ_k qweight[n, k] as int32 [out]) for the exact int8 product `product` chosen here
        (`native.int8_matmul`): the weight in its layout (tiles for the native kernel); made once (again only if
        the weight is replaced or the choice changes)."""
        if self._exact_of is None or self._exact_of[0] is not self.qweight or self._exact_of[1] is not product:
            weight = self.qweight if product is native.int_mm_rows else native.pack_int8_tiles(self.qweight)
            self._exact_cache = weight, self.qweight.sum(dim=1, dtype=torch.int32)
            self._exact_of = self.qweight, product
        return self._exact_cache

    def _pack(self) -> Any:
        """The kernel's layout of the stored weight, built once (again only if the weight is replaced): the head's
        (None, fbgemm's packed weight), else (weight, scales) for the decode kernel chosen here (`decode_kernel`;
        torch's where ours does not take the shape, or for an int8 layer without `int8_activations`)."""
        if self.quantize_activations:
            with warnings.catch_warnings():  # torch marks its quantized tensor types deprecated; fbgemm stays
                warnings.simplefilter("ignore")
                zero_points = torch.zeros(self.out_features, dtype=torch.long)
                weight = torch._make_per_channel_quantized_tensor(self.qweight, self.scales.double(), zero_points, 0)
                self._packed, self._kernel = (None, torch.ops.quantized.linear_prepack(weight, self.bias)), "int8 torch"
        else:
            fits = (self.group_size % 8 == 0 if self.method == "int4" else
                    self.int8_activations and self.in_features % 32 == 0)
            self._kernel = decode_kernel(self.method) if fits else f"{self.method} torch"
            self._packed = PACKS[self._kernel](self.quantized_tensors())
        self._packed_from = self.qweight
        return self._packed


def fuse_rows(layers: list[QuantizedLinear]) -> QuantizedLinear:
    """One layer computing `layers` (same input, same method) at once: their rows stacked, so one kernel call
    replaces several. Each layer's tensors become views of the fused layer's rows: nothing is stored twice."""
    first = layers[0]
    fused = QuantizedLinear(first.in_features, sum(layer.out_features for layer in layers), first.method,
                            first.bias is not None, first.group_size, first.qweight.device,
                            first.quantize_activations, first.int8_activations)
    fused.assign({name: torch.cat([layer.quantized_tensors()[name] for layer in layers])
                  for name in first.quantized_tensors()},
                 torch.cat([layer.bias for layer in layers]) if first.bias is not None else None)
    start = 0
    for layer in layers:
        rows = slice(start, start + layer.out_features)
        for name, tensor in fused.quantized_tensors().items():
            setattr(layer, name, tensor[rows])
        if layer.bias is not None:
            layer.bias = nn.Parameter(fused.bias[rows], requires_grad=False)
        layer._packed, start = None, rows.stop
    return fused


class QuantizedEmbedding(nn.Module):
    """Token embedding looked up in an int8 table (one scale per token row): E[t] = q[t] · s[t], in the dtype of
    the scales (the model's activation dtype). A tied output head shares the same int8 table."""

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)

    @property
    def weight(self) -> torch.Tensor:
        """An empty tensor with the device and dtype of the vectors this embedding returns: what code that asks
        an nn.Embedding's weight for them (to allocate a KV cache, say) needs. The table is `qweight`/`scales`."""
        return self.scales[:0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.qweight[ids].to(self.scales.dtype) * self.scales[ids][..., None]


# ---- whole models -----------------------------------------------------------------------------------------------

def _quantizable(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """The Linear layers quantisation replaces: every one of the blocks (a MoE router excepted: it picks experts,
    and is tiny) and the output head."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (name == "lm_head" or name.startswith("blocks.")) \
                and not name.endswith("router"):
            yield name, module


def _reads_a_norm(name: str) -> bool:
    """Whether layer `name` takes 8-bit activations at decode: the head only (see the module docstring)."""
    return name == "lm_head"


def layer_method(name: str, method: str, shape: tuple[int, ...], group_size: int = GROUP_SIZE) -> str:
    """The method layer `name` (weight `shape` [out, in]) gets under a model's `method`: int8 for the head (and
    embedding) always, and for matrices the int4 kernel cannot take (out not a multiple of 16, in not of the
    group size); `method` otherwise."""
    out_features, in_features = shape
    if name in ("lm_head", "token_embedding") or out_features % 16 or in_features % group_size:
        return "int8"
    return method


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_model(model: nn.Module, method: str, group_size: int = GROUP_SIZE,
                   prequantized: dict[str, dict[str, torch.Tensor]] | None = None,
                   int8_layers: Collection[str] = ()) -> nn.Module:
    """Replace the model's Linear layers (and its token embedding) by quantised ones, in place, by name.

    `prequantized` gives some layers' quantised tensors directly (a GGUF file's 4-bit blocks); the rest are
    quantised from their float weights. `int8_layers` stay int8 under int4 (a GGUF file's tensors its author kept
    at more than 4 bits). A decoder-only GPT is required; the model is returned for chaining."""
    check_method(method)
    config = getattr(model, "config", None)
    if config is None or config.architecture != "decoder" or not hasattr(model, "lm_head"):
        raise SparkGPTError("quantization supports decoder-only (GPT) models")
    prequantized = prequantized or {}
    device = model.token_embedding.weight.device
    for name, linear in list(_quantizable(model)):
        layer_kind = "int8" if name in int8_layers else layer_method(name, method, tuple(linear.weight.shape),
                                                                     group_size)
        if name in prequantized:  # its float weight may be a meta placeholder: never read
            layer = QuantizedLinear(linear.in_features, linear.out_features, layer_kind, linear.bias is not None,
                                    group_size, device, _reads_a_norm(name), method == "int4")
            layer.assign(prequantized[name], linear.bias)
        else:
            layer = QuantizedLinear.from_linear(linear, layer_kind, group_size, _reads_a_norm(name), method == "int4")
        _replace(model, name, layer)
    float_table = model.token_embedding.weight
    if config.tie_embeddings:
        table = {"qweight": model.lm_head.qweight, "scales": model.lm_head.scales}
    else:
        table = prequantized.get("token_embedding") or quantize_int8(float_table)
    model.token_embedding = QuantizedEmbedding(table["qweight"].to(float_table.device),
                                               table["scales"].to(float_table.device, float_table.dtype))
    model.quantization = _description(method, group_size, int8_layers)
    return model


def _description(method: str, group_size: int, int8_layers: Collection[str]) -> dict[str, Any]:
    """What a quantised checkpoint's config records: enough to rebuild every layer as it was."""
    mixed = sorted(int8_layers) if method == "int4" else []
    return {"method": method, "group_size": group_size, **({"int8_layers": mixed} if mixed else {})}


def float_tensors_to(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Every float tensor of the model but the quantised layers' own (norms, learned positions, the embedding's
    scales: what sets the activations' dtype) in `dtype`. The quantised layers' biases stay float32 (fbgemm's
    packed head takes them so) and are cast per call."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            continue
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor.is_floating_point() and tensor.dtype != dtype:
                converted = tensor.to(dtype)
                setattr(module, name, nn.Parameter(converted, tensor.requires_grad) if isinstance(tensor, nn.Parameter)
                        else converted)
    return model


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quantization", None) is not None


def quantize_loaded(model: nn.Module, method: str) -> nn.Module:
    """`quantize_model` for a model just loaded, which may already be quantised: with `method` (nothing to do) or
    with another (an error: re-quantising quantised weights would compound their errors)."""
    if not is_quantized(model):
        return quantize_model(model, method)
    if model.quantization["method"] != method:
        raise SparkGPTError(f"this checkpoint is quantised as {model.quantization['method']}; it cannot be loaded "
                            f"as {method} (quantise the original weights instead)")
    return model


def quantize_skeleton(model: nn.Module, method: str, group_size: int = GROUP_SIZE,
                      int8_layers: Collection[str] = ()) -> nn.Module:
    """A GPT built on the meta device, with every quantised layer in place (empty): the shape of a quantised
    checkpoint, ready for `load_state_dict(..., assign=True)`."""
    for name, linear in list(_quantizable(model)):
        kind = "int8" if name in int8_layers else layer_method(name, method, tuple(linear.weight.shape), group_size)
        _replace(model, name, QuantizedLinear(linear.in_features, linear.out_features, kind,
                                              linear.bias is not None, group_size, "meta", _reads_a_norm(name),
                                              method == "int4"))
    config = model.config
    model.token_embedding = QuantizedEmbedding(
        torch.empty(config.vocab_size, config.d_model, dtype=torch.int8, device="meta"),
        torch.empty(config.vocab_size, dtype=torch.float32, device="meta"))
    model.quantization = _description(method, group_size, int8_layers)
    return model
