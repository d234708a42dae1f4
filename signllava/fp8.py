"""FP8 matmuls for the frozen LLM's linear layers (`--fp8`): stage 1's whole LLM, stage 2's LoRA base.

Hopper's tensor cores multiply e4m3 operands at twice the bf16 rate. The LLM's linear weights never train here
(stage 1 freezes the LLM, stage 2 trains LoRA beside it), so no weight gradient is ever computed, only the
gradient to each layer's input. That makes the FP8 path simple:

- each weight is quantised once, at load: e4m3 with one power-of-two scale per output row, and the bf16 copy is
  freed (an 8B model's decoder holds 7 GB instead of 14);
- each forward quantises its input per row (token) the same way and multiplies with `torch._scaled_mm`
  (row-wise scales, fp32 accumulation, bf16 out);
- each backward quantises the output gradient per row, after folding the weight's row scales into it (exact:
  they are powers of two), and multiplies by the same e4m3 weight, transposed for the kernel in that step
  (Hopper's FP8 kernels want both operands contiguous along the reduced dimension; a transposed copy of one
  layer's weight lives for one matmul, cheaper than holding a second copy of all of them).

Power-of-two scales keep every rescaling exact, as torchao's row-wise recipe does. torchao's own
`Float8Linear` is built for training the weight: it keeps the bf16 weight (twice the memory), re-casts it to
e4m3 twice every step, and its autograd function computes the weight gradient too (in eager mode a third more
matmul work; a compiled graph can drop it). On one compiled 8B layer on the H200 it ran 1.41x bf16 against this
module's 1.52x, with 1.3 GiB more peak memory (bench/fp8_layer.py).

Where no FP8 matmul exists (the CPU), the same quantised operands are multiplied in fp32 instead ("emulated");
`torch._scaled_mm` on an FP8 GPU computes the same sums (fp32 accumulation; on the H200 its outputs were the
emulation's to 2.3e-3, its input gradients to 6.6e-4), so the CPU tests pin the quantisation, the scales and
the backward against the fp32 layers. A GPU without FP8 tensor cores is
refused in one line naming the flag.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from signllava.errors import RunError

log = logging.getLogger("signllava")

E4M3 = torch.float8_e4m3fn
FLAG = "--fp8"


def fp8_matmul_available(device: torch.device) -> bool:
    """FP8 tensor cores: compute capability 8.9 (Ada) and later (Hopper 9.0, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def check_support(device: torch.device, zero3: bool = False, bits: int = 16):
    """Refuse what --fp8 cannot run on, in one line naming the flag; the CPU runs it emulated."""
    if bits != 16:
        raise RunError(f"{FLAG} with --bits {bits}: the frozen base is either nf4 or FP8; use --bits 16 {FLAG}")
    if zero3:
        raise RunError(f"{FLAG}: not with ZeRO-3, which partitions parameters only (every rank would hold all FP8 "
                       "weights); use ZeRO-2 (ds_config_zero2.json)")
    if device.type == "cuda" and not fp8_matmul_available(device):
        major, minor = torch.cuda.get_device_capability(device)
        raise RunError(f"{FLAG}: {torch.cuda.get_device_name(device)} (compute capability {major}.{minor}) has no FP8 "
                       f"tensor cores (8.9 and later: Ada, Hopper); run without {FLAG}")
    if device.type not in ("cuda", "cpu"):
        raise RunError(f"{FLAG}: no FP8 matmul on {device.type}; run without {FLAG}")


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scale [M, 1] fp32), x ~ q * scale, each row's scale the smallest power of two
    that brings its largest magnitude within e4m3's range. Dividing by a power of two is exact in x's own dtype
    (bf16 has fp32's exponent range), so no fp32 copy of x is made. An all-zero row gets a tiny scale and zeros;
    a non-finite value makes its row non-finite (the training loop's bad-step check sees it)."""
    # torch.finfo(E4M3).max, written out: dynamo (torch 2.13) turns a module-level float into a graph input,
    # which fails inside an autograd.Function's traced forward
    top = 448.0
    amax = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / top)))
    q = (x / scale.to(x.dtype)).clamp(-top, top).to(E4M3)
    return q.contiguous(), scale          # row-major, as _scaled_mm takes its first operand (x may be strided)


def scaled_matmul(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype, emulate: bool, fast_accum: bool) -> torch.Tensor:
    """(a * a_scale) @ (b * b_scale) for e4m3 a [M, K] (row-major) and b [K, N] (column-major), a_scale [M, 1],
    b_scale [1, N]: torch._scaled_mm, or the same operands in fp32 when emulated."""
    if emulate:
        return ((a.float() * a_scale) @ (b.float() * b_scale)).to(out_dtype)
    return torch._scaled_mm(a, b, scale_a=a_scale, scale_b=b_scale, out_dtype=out_dtype, use_fast_accum=fast_accum)


class _FrozenFP8Matmul(torch.autograd.Function):
    """y = x @ W^T with W frozen in e4m3 (weight_q [N, K], weight_scale [N, 1]); the gradient goes to x only."""

    @staticmethod
    def forward(ctx, x, weight_q, weight_scale, emulate: bool):
        lead = x.shape[:-1]
        x_q, x_scale = quantize_rows(x.reshape(-1, x.shape[-1]))
        # Fast accumulation in the forward, full-precision accumulation for the gradient (torchao's choice).
        y = scaled_matmul(x_q, x_scale, weight_q.t(), weight_scale.view(1, -1), x.dtype, emulate, fast_accum=True)
        ctx.save_for_backward(weight_q, weight_scale)
        ctx.emulate = emulate
        return y.reshape(*lead, -1)

    @staticmethod
    def backward(ctx, grad):
        weight_q, weight_scale = ctx.saved_tensors
        lead = grad.shape[:-1]
        # dL/dx = g @ W = (g * s) @ Q with W = s Q row by row; s are powers of two, so folding them is exact.
        g_q, g_scale = quantize_rows(grad.reshape(-1, grad.shape[-1]) * weight_scale.view(1, -1).to(grad.dtype))
        w_kmajor = weight_q.t().contiguous().t()           # [N, K], contiguous along N: the reduced dimension
        ones = weight_scale.new_ones(1, weight_q.shape[1])
        gx = scaled_matmul(g_q, g_scale, w_kmajor, ones, grad.dtype, ctx.emulate, fast_accum=False)
        return gx.reshape(*lead, -1), None, None, None


class FrozenFP8Linear(nn.Module):
    """An nn.Linear whose weight is frozen and held in e4m3 (non-persistent buffers: never saved, never cast by
    DeepSpeed's bf16 mode, which casts parameters only). The bias, if any, stays the frozen original."""

    def __init__(self, linear: nn.Linear, emulate: bool):
        super().__init__()
        self.in_features, self.out_features, self.emulate = linear.in_features, linear.out_features, emulate
        with torch.no_grad():
            q, scale = quantize_rows(linear.weight)
        self.register_buffer("weight_q", q, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _FrozenFP8Matmul.apply(x, self.weight_q, self.weight_scale, self.emulate)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The weight the layer multiplies by, in fp32 (for checks)."""
        return self.weight_q.float() * self.weight_scale

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{'emulated' if self.emulate else 'scaled_mm'}")


def frozen_linears_in(module: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) of every plain nn.Linear with a frozen weight in `module`, except LoRA's own
    A and B (they train, and a loaded adapter's are frozen but must stay exact): LoRA's base layers are found."""
    found = []
    for parent_name, parent in module.named_modules():
        for name, child in parent.named_children():
            if type(child) is nn.Linear and not child.weight.requires_grad and "lora_" not in f"{parent_name}.{name}":
                found.append((parent, name, child))
    return found


def frozen_linears(llm: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """frozen_linears_in each decoder layer: the attention and MLP projections (or LoRA's base layers around
    them); never lm_head or the embeddings."""
    from signllava.kernels import decoder_layers
    return [found for layer in decoder_layers(llm) for found in frozen_linears_in(layer)]


def convert_frozen_linears(llm: nn.Module, device: torch.device) -> int:
    """Swap each frozen linear layer of the decoder (frozen_linears) for a FrozenFP8Linear on `device`, in
    place; the bf16 weights are freed unless the caller holds them. Returns how many were swapped."""
    emulate = not fp8_matmul_available(device)
    swaps = frozen_linears(llm)
    if not swaps:
        raise RunError(f"{FLAG}: no frozen linear layer in the model's decoder layers to run in FP8")
    for parent, name, linear in swaps:
        setattr(parent, name, FrozenFP8Linear(linear, emulate))
    log.info("%s: %d linear layers hold e4m3 weights (%s)", FLAG, len(swaps),
             "emulated in fp32: no FP8 matmul on this device" if emulate else "torch._scaled_mm, row-wise scales")
    return len(swaps)
