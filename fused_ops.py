"""Leaner forms of two Llama blocks, swapped into a loaded model (same maths, less memory traffic).

transformers' LlamaRMSNorm runs in eager PyTorch: an fp32 copy of the hidden state, pow, mean, rsqrt, two
multiplies, casts -- about eight kernels forward and more backward, and autograd keeps fp32 copies of every
[tokens, hidden] input for the backward pass. In stage 1 nothing in the LLM trains, yet every position is
back-propagated, so on an 8B model those copies are a large part of the activation memory that caps the batch
and the elementwise passes a large part of the step (bench/profile_step.py). `F.rms_norm` is one fused kernel
each way on CUDA, computes in fp32 inside and keeps only its bf16 input and one scalar per row.

The gated MLP, down(silu(gate(x)) * up(x)), keeps three [tokens, intermediate] tensors for backward (gate,
silu(gate), up); `silu_mul` keeps two and recomputes the SiLU in backward.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)


class SiluMul(torch.autograd.Function):
    """silu(gate) * up, saving gate and up only."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        g = gate.float()
        sig = torch.sigmoid(g)
        silu = g * sig
        grad32 = grad.float()
        d_up = grad32 * silu
        d_gate = grad32 * up.float() * sig * (1 + g * (1 - sig))
        return d_gate.to(gate.dtype), d_up.to(up.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return SiluMul.apply(gate, up)
    return F.silu(gate) * up


def _gated_mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


def _is_rms_norm(m: nn.Module) -> bool:
    # Llama-family norms: a weight of the hidden size, `variance_epsilon`, and the plain x * rsqrt(mean x^2)
    # form (Gemma's 1 + weight variant has a different class body and is left alone).
    return (type(m).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and hasattr(m, "variance_epsilon"))


def _is_silu_gated_mlp(m: nn.Module) -> bool:
    act = getattr(m, "act_fn", None)
    return (all(hasattr(m, k) for k in ("gate_proj", "up_proj", "down_proj"))
            and (isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"))


def fuse(model: nn.Module, norms: bool = True, mlp: bool = True) -> dict[str, int]:
    """Swap the forward of every recognised RMSNorm and SiLU-gated MLP in `model` (in place: an instance
    attribute, so the class and other models are untouched); returns counts. Other modules stay as they are."""
    n = {"rms_norm": 0, "silu_mul": 0}
    for m in model.modules():
        if norms and _is_rms_norm(m):
            m.forward = types.MethodType(_rms_norm_forward, m)
            n["rms_norm"] += 1
        elif mlp and _is_silu_gated_mlp(m):
            m.forward = types.MethodType(_gated_mlp_forward, m)
            n["silu_mul"] += 1
    return n


def unfuse(model: nn.Module) -> int:
    """Back to the classes' own forward (for ablations); returns how many modules were restored."""
    n = 0
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), types.MethodType) and m.forward.__func__ in (_rms_norm_forward,
                                                                                              _gated_mlp_forward):
            del m.forward
            n += 1
    return n
