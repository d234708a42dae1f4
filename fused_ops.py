"""A fused RMSNorm swapped into a loaded model (same maths, less memory traffic and activation memory).

transformers' LlamaRMSNorm runs in eager PyTorch: an fp32 copy of the hidden state, pow, mean, rsqrt, two
multiplies, casts -- about eight kernels forward and more backward, and autograd keeps fp32 copies of every
[tokens, hidden] input for the backward pass. In stage 1 nothing in the LLM trains, yet every position is
back-propagated, so on an 8B model those copies are a large part of the activation memory that caps the batch
and the elementwise passes a large part of the step (bench/profile_step.py). `F.rms_norm` is one fused kernel
each way on CUDA, computes in fp32 inside and keeps only its bf16 input and one scalar per row.

Measured on one 8B-shaped decoder layer, 9,000 packed positions, forward + backward on the H100
(`python bench/profile_step.py layer`): 19.4 -> 16.3 ms and 2,181 -> 1,971 MiB peak. Tried and dropped: a
SiLU-gate autograd function keeping two of the MLP's three [tokens, 14336] tensors; its unfused fp32
backward made the layer slower (21.1 ms) and raised the peak (5,170 MiB).
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)


def _is_rms_norm(m: nn.Module) -> bool:
    # Llama-family norms: a weight of the hidden size, `variance_epsilon`, and the plain x * rsqrt(mean x^2)
    # form (Gemma's 1 + weight variant has a different class body and is left alone).
    return (type(m).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and hasattr(m, "variance_epsilon"))


def fuse(model: nn.Module) -> int:
    """Swap the forward of every recognised RMSNorm in `model` (in place: an instance attribute, so the class
    and other models are untouched); returns how many. Other modules stay as they are."""
    n = 0
    for m in model.modules():
        if _is_rms_norm(m):
            m.forward = types.MethodType(_rms_norm_forward, m)
            n += 1
    return n


def unfuse(model: nn.Module) -> int:
    """Back to the classes' own forward (for ablations); returns how many modules were restored."""
    n = 0
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), types.MethodType) and m.forward.__func__ is _rms_norm_forward:
            del m.forward
            n += 1
    return n
