"""What is swapped into a loaded LLM for speed: packed attention, a fused RMSNorm, compiled decoder layers.

## Packed attention

Training batches mix clips of 100 to 2,000 positions. Padded, they pay for pad positions and for SDPA with a
mask (which rules out the flash kernel); packed, every position is real and attention runs per sample through
the variable-length flash kernel (`torch.nn.attention.varlen.varlen_attn`), given the samples' boundaries as
cumulative lengths (`cu_seq_lens_q/k`, the names transformers forwards to attention functions).

`ATTENTION` is registered with transformers as an attention implementation that is SDPA whenever no boundaries
are given (padded training, dev loss, generation with its KV cache), so one model serves every path. Where the
varlen kernel is missing (CPU, older torch) packed attention runs SDPA sample by sample: exact, just slower.

## Fused RMSNorm

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

## Compiled decoder layers (`--compile_layers`)

Regional `torch.compile`: each decoder layer's forward is compiled on its own, not the whole model. The layers
are identical, so one compilation serves all of them (parameters are graph inputs), the first step pays about
13 s on an 8B model instead of minutes, and the projectors, the splice and the loss stay eager. Shapes are
dynamic from the start: packed rows change length every step. Inductor fuses what eager PyTorch runs as
separate kernels (RoPE, the SwiGLU gate, residual adds, casts); on the H200, one 8B layer at 27,000 packed
positions went from 51.5 to 45.6 ms forward + backward with 1 GB less activation memory
(bench/profile_step.py layer). Evaluation and generation run the same layers eagerly (`eager_layers`):
their no-grad and KV-cache calls would each compile their own graphs, and CUDA-graph capture of the decode
step must not meet a first compilation.

## Activation memory budget (`--activation_memory_budget`)

Without checkpointing a compiled QLoRA layer keeps about 7 MB of activations a token on an 8B model (the H200
benchmark: LoRA's dropout copies of each linear layer's input, the SwiGLU's [tokens, 14336] tensors);
checkpointing keeps one hidden state a token but repeats every forward, ~30 % of a QLoRA step. In between,
torch's compiler can choose what each compiled layer saves for backward: given a budget between 0 (keep only
what cannot be recomputed, the layer's inputs) and 1 (all it would keep anyway), its partitioner keeps that
fraction of the difference and recomputes the rest in the backward graph, cheapest first (the elementwise ops
inductor fuses for free, then the matmuls with the fewest flops). So a packed budget large enough to keep the
GPU busy fits a smaller card without paying for whole recomputed forwards. On one CPU layer with LoRA on all
linears (no dropout), the bytes saved a token fell to 66 / 49 / 32 % of the unbudgeted at budgets 0.5 / 0.25 /
0; on the H200, QLoRA at budget 0.25 held 9,091 packed tokens in 21.3 GB (1.6 MB a token; 6.8 unbudgeted, with
dropout) at 13.7 samples/s, where checkpointing managed 10.6 (README, Performance). tests/test_packing.py pins
that losses and gradients do not change and that less is saved.

Not with dropout: the partitioner treats a dropout like any cheap op and recomputes it from a fresh random
draw (torch 2.13: gradients 30 % off on that CPU model while writing the test), so LoRA's dropout must be 0
below a budget of 1; compile_decoder_layers refuses the pair.
"""
from __future__ import annotations

import inspect
import logging
import types

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION = "signllava_packed"

log = logging.getLogger("signllava")


def _varlen_kernel():
    """(function, causal kwargs, takes enable_gqa) for this torch's varlen_attn, or None. Its signature moved
    between releases (is_causal=True, later window_size=(-1, 0)), so it is read rather than assumed."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "window_size" in params:
        causal = {"window_size": (-1, 0)}
    elif "is_causal" in params:
        causal = {"is_causal": True}
    else:
        return None
    return varlen_attn, causal, "enable_gqa" in params


_KERNEL = _varlen_kernel()
_reported: set[str] = set()


def _report(path: str):
    if path not in _reported:
        _reported.add(path)
        log.info("packed attention: %s", path)


def varlen_available(device: torch.device) -> bool:
    return _KERNEL is not None and device.type == "cuda"


def packed_attention(query, key, value, cu_seq_lens: torch.Tensor, max_length: int, scaling: float | None):
    """Causal attention within each packed sample. query [1, Hq, N, D], key/value [1, Hkv, N, D] (one row);
    cu_seq_lens [S+1] int32 from 0 to N. Returns [1, N, Hq, D], the layout attention functions return."""
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))      # [N, H, D]
    groups = q.shape[1] // k.shape[1]
    if varlen_available(q.device) and q.dtype in (torch.float16, torch.bfloat16):
        fn, causal, takes_gqa = _KERNEL
        kw = dict(causal, scale=scaling)
        if groups > 1:
            if takes_gqa:
                kw["enable_gqa"] = True
            else:
                k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        _report("varlen flash kernel")
        cu = cu_seq_lens.to(device=q.device, dtype=torch.int32)
        out = fn(q, k, v, cu, cu, max_length, max_length, **kw)
        return out.unsqueeze(0)
    _report("SDPA per sample (no varlen kernel for this device/dtype)")
    bounds = cu_seq_lens.tolist()
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))   # [1, H, n, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scaling, enable_gqa=groups > 1)
        outs.append(o[0].transpose(0, 1))
    return torch.cat(outs, 0).unsqueeze(0)


def attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                      is_causal=None, **kwargs):
    """transformers' attention-function contract. Packed when the caller passed `cu_seq_lens_q`;
    otherwise exactly transformers' SDPA."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if query.shape[0] != 1 or attention_mask is not None:
        raise ValueError("packed attention takes one row and no attention mask")
    return packed_attention(query, key, value, cu, int(kwargs["max_length_q"]), scaling), None


def build_mask(*args, **kwargs):
    """The mask builder for ATTENTION: none for a packed row (no padding, no cache: the boundaries do the
    masking and transformers would otherwise build an N x N block mask), SDPA's everywhere else."""
    from transformers.masking_utils import sdpa_mask
    if (kwargs.get("attention_mask") is None and kwargs.get("q_length") == kwargs.get("kv_length")
            and not kwargs.get("q_offset") and not kwargs.get("kv_offset")):
        return None
    return sdpa_mask(*args, **kwargs)


def register():
    """Make ATTENTION known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(ATTENTION, attention_forward)
    AttentionMaskInterface.register(ATTENTION, build_mask)


def use_packed_attention(llm):
    """Switch a loaded model (or a PeftModel around one) to ATTENTION."""
    register()
    base = llm.get_base_model() if hasattr(llm, "get_base_model") else llm
    base.set_attn_implementation(ATTENTION)


# ------------------------------------------------------------------------------------------ fused RMSNorm
def _rms_norm_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)


def _is_rms_norm(m: nn.Module) -> bool:
    # Llama-family norms: a weight of the hidden size, `variance_epsilon`, and the plain x * rsqrt(mean x^2)
    # form (Gemma's 1 + weight variant has a different class body and is left alone).
    return (type(m).__name__ in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")
            and isinstance(getattr(m, "weight", None), torch.Tensor) and hasattr(m, "variance_epsilon"))


def fuse_rms_norm(model: nn.Module) -> int:
    """Swap the forward of every recognised RMSNorm in `model` (in place: an instance attribute, so the class
    and other models are untouched); returns how many. Other modules stay as they are."""
    n = 0
    for m in model.modules():
        if _is_rms_norm(m):
            m.forward = types.MethodType(_rms_norm_forward, m)
            n += 1
    return n


def unfuse_rms_norm(model: nn.Module) -> int:
    """Back to the classes' own forward (for ablations); returns how many modules were restored."""
    n = 0
    for m in model.modules():
        if isinstance(m.__dict__.get("forward"), types.MethodType) and m.forward.__func__ is _rms_norm_forward:
            del m.forward
            n += 1
    return n


# ------------------------------------------------------------------------------------------ compiled layers
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a causal LM (or a PeftModel around one): its decoder's `layers`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = getattr(base.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(base).__name__}: no list of decoder layers to compile")
    return layers


def compile_decoder_layers(model: nn.Module, backend: str = "inductor",
                           activation_memory_budget: float = 1.0) -> int:
    """Compile each decoder layer's forward in place (nn.Module.compile), dynamic shapes; returns how many.
    `backend`: torch.compile's (inductor generates kernels; aot_eager only traces, for debugging).
    `activation_memory_budget`: how much of the layers' activations is kept for backward, 0-1 (module
    docstring); a process-wide compiler setting, read when a graph compiles, so graphs compiled earlier keep
    theirs."""
    if not 0 <= activation_memory_budget <= 1:
        raise ValueError(f"activation memory budget {activation_memory_budget}: must be in [0, 1]")
    layers = decoder_layers(model)
    if activation_memory_budget < 1 and active_dropouts(layers):
        raise ValueError(f"activation memory budget {activation_memory_budget} with dropout in the decoder layers "
                         "(LoRA's): the compiler would draw new masks when it recomputes, and the gradients would "
                         "not be those of the forward; use a LoRA dropout of 0")
    torch._functorch.config.activation_memory_budget = activation_memory_budget
    # Python floats (RMSNorm's eps, LoRA's scaling) as constants: with dynamic shapes dynamo would first trace
    # them as symbols, find that the graph needs them specialised, and restart the whole trace, doubling
    # dynamo's and AOT autograd's share of every compilation (one LoRA + FP8 layer, aot_eager on the CPU: one
    # trace instead of two, 28.8 -> 12.4 s and 22.2 -> 15.1 s in two runs). No float a layer reads varies.
    torch._dynamo.config.specialize_float = True
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return len(layers)


def active_dropouts(module: nn.Module) -> list[nn.Dropout]:
    """The dropouts in `module` that drop something (p > 0): LoRA's, in a stage-2 model."""
    return [m for m in module.modules() if isinstance(m, nn.Dropout) and m.p > 0]


def uncompile_decoder_layers(model: nn.Module):
    """Back to the eager layers (nn.Module.compile keeps its compiled call in `_compiled_call_impl`) and the
    compiler's settings back to their defaults: benchmarks time both in one process."""
    for layer in decoder_layers(model):
        layer._compiled_call_impl = None
    torch._functorch.config.activation_memory_budget = 1.0
    torch._dynamo.config.specialize_float = False


def eager_layers():
    """A context in which compiled layers run their eager forward (evaluation, generation)."""
    return torch.compiler.set_stance("force_eager")
