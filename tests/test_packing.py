"""Packed training rows (SignLLM.packing, attention.py) compute what padded batches compute, on CPU.

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q test_packing.py

On CPU packed attention runs SDPA sample by sample (the varlen flash kernel is CUDA-only; bench/benchmark.py checks it
against the padded path on the GPU); the packing itself -- positions, boundaries, targets -- is the same code.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.synthetic import (SHAPES, Synth, assemble_with, build_llm, collate, make_specs, quantize_4bit_,
                             set_gradient_checkpointing, sign_config)

pytestmark = pytest.mark.usefixtures("one_thread")     # conftest: small matmuls on one CPU thread

CPU = torch.device("cpu")
F32 = torch.float32
KEYS = ("input_ids", "attention_mask", "labels", "features", "frame_index")


def loss_and_grads(model, batch, packing: bool):
    model.packing = packing
    model.zero_grad(set_to_none=True)
    loss_sum, n = model(**{k: batch[k] for k in KEYS})
    (loss_sum / n).backward()
    return loss_sum.item(), int(n), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def assert_same(a, b):
    assert a[1] == b[1]                                  # the same target tokens
    assert a[0] == pytest.approx(b[0], rel=1e-5)
    assert a[2].keys() == b[2].keys() and a[2]
    for k in a[2]:
        torch.testing.assert_close(a[2][k], b[2][k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_stage1_equals_padded(tok, synth, padding_side, checkpointing):
    specs = make_specs(5, 11, frames=(6, 60), answer=(5, 30))      # very different lengths: lots of padding
    batch = collate(synth, specs, list(range(5)), padding_side)
    torch.manual_seed(0)
    model = assemble_with(build_llm("tiny", CPU, F32), sign_config(1, 16), tok, CPU, F32).train()
    set_gradient_checkpointing(model, checkpointing)
    assert_same(loss_and_grads(model, batch, True), loss_and_grads(model, batch, False))


def test_packed_equals_one_sample_at_a_time(tok, synth):
    """Nothing leaks across a packed boundary: the packed row's loss is the sum of the samples' own losses."""
    specs = make_specs(4, 2, frames=(6, 40), answer=(5, 30))
    model = assemble_with(build_llm("tiny", CPU, F32), sign_config(1, 16), tok, CPU, F32).eval()
    model.packing = True
    with torch.no_grad():
        whole = model(**{k: v for k, v in collate(synth, specs, [0, 1, 2, 3]).items() if k in KEYS})
        parts = [model(**{k: v for k, v in collate(synth, specs, [i]).items() if k in KEYS}) for i in range(4)]
    assert int(whole[1]) == sum(int(n) for _, n in parts) == sum(s.answer + 1 for s in specs)
    assert whole[0].item() == pytest.approx(sum(l.item() for l, _ in parts), rel=1e-5)


def test_packed_qlora_equals_padded(tok, synth):
    specs = make_specs(4, 5, frames=(6, 40), answer=(5, 30))
    batch = collate(synth, specs, [0, 1, 2, 3])
    llm = build_llm("tiny", CPU, F32)
    quantize_4bit_(llm, CPU, F32)
    model = assemble_with(llm, sign_config(2, 4), tok, CPU, F32, adapter="new").eval()   # eval: no LoRA dropout
    packed, padded = loss_and_grads(model, batch, True), loss_and_grads(model, batch, False)
    assert any(".lora_" in k for k in packed[2])
    assert_same(packed, padded)


def test_packed_token_budget_plan_counts_real_tokens(synth):
    """Packed, a micro-batch costs its real tokens, not rows x longest: the same budget holds more samples."""
    from data import plan_epoch
    from training import prompt_tokens
    specs = make_specs(600, 0, frames=(50, 600))
    lengths = np.array([Synth.approx_length(s) for s in specs])
    seq = np.array([synth.seq_len(s) for s in specs])
    overhead = prompt_tokens(synth.builder, len(synth.modalities))
    budget = 4 * int(seq.max())
    for grouped in (True, False):
        packed = plan_epoch(lengths, 0, 0, 0, grouped, max_tokens=budget, overhead=overhead, packed=True)
        padded = plan_epoch(lengths, 0, 0, 0, grouped, max_tokens=budget, overhead=overhead)
        assert sorted(i for b in packed for i in b) == list(range(600))
        assert all(seq[b].sum() <= budget for b in packed)
        assert len(packed) < len(padded)
        # full batches: every batch but the last of each window leaves less than one sample of room
        assert np.mean([seq[b].sum() for b in packed]) > 0.8 * budget


# ------------------------------------------------------------------------------------------ fused_ops
@pytest.mark.parametrize("stage", [1, 2])
def test_fused_ops_equal_stock_llama(tok, synth, stage):
    """assemble() swaps in fused_ops; transformers' own forward gives the same loss and gradients."""
    from signllava import kernels
    specs = make_specs(3, 4, frames=(6, 40), answer=(5, 30))
    batch = collate(synth, specs, [0, 1, 2])
    llm = build_llm("tiny", CPU, F32)
    if stage == 2:
        quantize_4bit_(llm, CPU, F32)
    model = assemble_with(llm, sign_config(stage, 16 if stage == 1 else 4), tok, CPU, F32,
                          adapter="new" if stage == 2 else None).eval()
    n_layers = SHAPES["tiny"]["num_hidden_layers"]
    fused = loss_and_grads(model, batch, True)
    assert kernels.unfuse_rms_norm(model) == 2 * n_layers + 1                  # two norms a layer and the final norm
    stock = loss_and_grads(model, batch, True)
    assert kernels.fuse_rms_norm(model) == 2 * n_layers + 1
    assert_same(fused, stock)


# ------------------------------------------------------------------------------------------ compiled layers
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("backend", ["traced"])
def test_compiled_layers_equal_eager(tok, synth, backend, checkpointing):
    """--compile_layers: every decoder layer goes through torch.compile, and the loss and gradients are the eager
    ones, packed and padded, with and without gradient checkpointing; under eager_layers() (evaluation) the
    layers run eagerly again. `traced` runs
    dynamo's graphs as traced (it counts them). `inductor` (generated CPU kernels) passes too, but its
    compilation takes about a minute on two cores: run it with -k inductor after adding it here."""
    from signllava import kernels
    torch._dynamo.reset()
    specs = make_specs(4, 6, frames=(6, 40), answer=(5, 20))
    batch = collate(synth, specs, [0, 1, 2, 3])
    torch.manual_seed(0)
    model = assemble_with(build_llm("tiny", CPU, F32), sign_config(1, 16), tok, CPU, F32).train()
    set_gradient_checkpointing(model, checkpointing)     # compiled, the checkpoint is traced into the graph
    eager = [loss_and_grads(model, batch, packing) for packing in (True, False)]
    graphs = []

    def traced(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    assert kernels.compile_decoder_layers(model.llm, traced if backend == "traced" else backend) == \
        SHAPES["tiny"]["num_hidden_layers"]
    compiled = [loss_and_grads(model, batch, packing) for packing in (True, False)]
    for a, b in zip(eager, compiled):
        assert_same(a, b)
    if backend == "traced":
        assert graphs                                            # dynamo really traced the layers
        seen = len(graphs)
        with kernels.eager_layers():
            assert_same(loss_and_grads(model, batch, False), eager[1])
        assert len(graphs) == seen                               # nothing compiled for the eager pass
    torch._dynamo.reset()


def loss_grads_and_saved_bytes(model, batch) -> tuple:
    """loss_and_grads (packed), and the bytes autograd kept for backward on the way: saved_tensors_hooks sees
    what compiled graphs save too."""
    saved = []

    @torch._dynamo.disable                      # a plain hook, not a frame for dynamo to compile
    def keep(t):
        saved.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        result = loss_and_grads(model, batch, True)
    return result, sum(saved)


def test_activation_memory_budget_recomputes_without_changing_the_step(tok, synth):
    """--activation_memory_budget: at 0.3 the compiled layers keep about half what eager layers keep for backward
    (compiling alone: three quarters), and the loss and gradients stay the eager ones (stage 2, LoRA on all
    linears). Refused with LoRA dropout: the partitioner recomputes a dropout from a new draw (seen while writing
    this test: gradients 30 % off at budget 0). aot_eager_decomp_partition runs inductor's partitioner without
    generating kernels (inductor itself: a minute a compilation here)."""
    from signllava import kernels
    specs = make_specs(4, 6, frames=(6, 40), answer=(5, 20))
    batch = collate(synth, specs, [0, 1, 2, 3])
    torch.manual_seed(0)
    model = assemble_with(build_llm("tiny", CPU, F32), sign_config(2, 16), tok, CPU, F32, adapter="new").train()
    with pytest.raises(ValueError, match="dropout"):
        kernels.compile_decoder_layers(model.llm, "aot_eager_decomp_partition", 0.5)
    for m in kernels.active_dropouts(model):
        m.p = 0.0
    eager, eager_bytes = loss_grads_and_saved_bytes(model, batch)
    torch._dynamo.reset()
    try:
        kernels.compile_decoder_layers(model.llm, "aot_eager_decomp_partition", 0.3)
        budgeted, budgeted_bytes = loss_grads_and_saved_bytes(model, batch)
        kernels.uncompile_decoder_layers(model.llm)
    finally:
        torch._dynamo.reset()
    assert_same(budgeted, eager)
    assert torch._functorch.config.activation_memory_budget == 1.0
    # measured 11.3 MB against 21.9 eager; compiled at budget 1 (fusion alone) keeps 17.0
    assert budgeted_bytes < 0.6 * eager_bytes
