"""--fp8 (signllava/fp8.py) on the CPU, emulated: the FP8 layers compute what the fp32 layers compute, within
e4m3's rounding, and the refusals are one line naming the flag.

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q tests/test_fp8.py

Emulated means the same e4m3 operands and power-of-two scales as on the GPU, multiplied in fp32; where this
torch has `_scaled_mm` on the CPU, the test below shows it gives the emulation's numbers bit for bit, so the
operand layouts and scales handed to the kernel are the ones the emulation checks. e4m3 keeps 3 mantissa bits
(relative rounding up to 2^-4, about 3 % RMS through one matmul of two rounded operands): the tolerances below
are loose enough for that and tight enough to catch a wrong scale, a missing transpose or an unquantised path.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.synthetic import Synth, assemble_with, build_llm, collate, make_specs, sign_config
from signllava import fp8, kernels
from signllava.errors import RunError

pytestmark = pytest.mark.usefixtures("one_thread")     # conftest: small matmuls on one CPU thread

CPU = torch.device("cpu")
F32 = torch.float32
KEYS = ("input_ids", "attention_mask", "labels", "features", "frame_index")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def forward_backward(layer: nn.Module, x: torch.Tensor, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype))
    return y.detach(), x.grad


def frozen_linear(n_in=256, n_out=384, bias=False, seed=0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias).requires_grad_(False)


def test_rows_quantise_to_e4m3_with_power_of_two_scales():
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * torch.logspace(-6, 6, 64)[:, None]
    x[3] = 0.0
    q, scale = fp8.quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1)
    assert torch.equal(scale, torch.exp2(torch.log2(scale).round()))            # powers of two: exact rescaling
    big = q.float().abs().amax(1)
    assert torch.finfo(torch.float8_e4m3fn).max == 448 and torch.all(big <= 448) and torch.all(big[torch.arange(64) != 3] >= 224)  # the top binade
    assert torch.all(q[3].float() == 0)
    err = (q.float() * scale - x).abs()
    # e4m3 rounding: half a step of 2^-3 relative for normal values, 2^-10 x scale below them (subnormals)
    assert torch.all(err <= 2 ** -4 * x.abs() + 2 ** -10 * scale)
    assert 0 < rel(q.float() * scale, x) < 0.05


@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_computes_the_linear_and_its_input_gradient(bias):
    lin = frozen_linear(bias=bias)
    x = torch.randn(3, 50, 256, generator=torch.Generator().manual_seed(2))
    ref_y, ref_g = forward_backward(lin, x)
    layer = fp8.FrozenFP8Linear(lin, emulate=True)
    y, g = forward_backward(layer, x)
    assert y.shape == ref_y.shape and g.shape == x.shape
    # measured 0.035 and 0.036: quantised (not zero), and nowhere near a wrong scale or transpose (~1)
    assert 0.01 < rel(y, ref_y) < 0.06 and 0.01 < rel(g, ref_g) < 0.06
    # the weight it multiplies by is the quantised one, exactly: the same layer in fp32 from that weight
    # differs only by the input's and the gradient's rounding
    assert 0 < rel(layer.dequantized_weight(), lin.weight) < 0.05
    assert not list(layer.parameters(recurse=False)) or all(not p.requires_grad for p in layer.parameters())
    assert set(layer.state_dict()) == ({"bias"} if bias else set())        # e4m3 buffers are never saved


def test_scaled_mm_gives_the_emulated_numbers():
    """The kernel path (torch._scaled_mm, as on the GPU) against the emulation, forward and backward."""
    lin = frozen_linear()
    x = torch.randn(70, 256, generator=torch.Generator().manual_seed(3))
    emulated = forward_backward(fp8.FrozenFP8Linear(lin, emulate=True), x)
    try:
        kernel = forward_backward(fp8.FrozenFP8Linear(lin, emulate=False), x)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"this torch has no CPU _scaled_mm for row-wise scales ({str(e).splitlines()[0][:100]})")
    for a, b in zip(kernel, emulated):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def fp8_and_reference(tok, stage: int):
    """The tiny model twice from one seed: fp32 layers, and --fp8 (assemble's own path)."""
    def build(use_fp8):
        torch.manual_seed(0)
        llm = build_llm("tiny", CPU, F32, seed=0)
        return assemble_with(llm, sign_config(stage, 16), tok, CPU, F32, adapter="new" if stage == 2 else None,
                             fp8=use_fp8).train()
    return build(False), build(True)


def loss_and_grads(model, batch):
    model.packing = True
    model.zero_grad(set_to_none=True)
    loss_sum, n = model(**{k: batch[k] for k in KEYS})
    (loss_sum / n).backward()
    return (loss_sum / n).item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("stage", [1, 2])
def test_fp8_model_trains_what_the_fp32_model_trains(tok, synth: Synth, stage):
    """Stage 1 (the whole frozen LLM in FP8) and stage 2 (LoRA on an FP8 base): every frozen decoder linear is
    swapped, lm_head and LoRA's own layers are not, and the loss and the trainable gradients are the fp32
    model's within e4m3's rounding."""
    ref, model = fp8_and_reference(tok, stage)
    layers = kernels.decoder_layers(model.llm)
    swapped = [m for m in layers.modules() if isinstance(m, fp8.FrozenFP8Linear)]
    assert len(swapped) == 7 * len(layers)                   # q, k, v, o, gate, up, down
    assert not [m for m in layers.modules() if type(m) is nn.Linear and not m.weight.requires_grad]
    assert type(model.llm.get_output_embeddings()) is nn.Linear
    if stage == 2:
        lora = [m for n, m in layers.named_modules() if type(m) is nn.Linear and "lora_" in n]
        assert len(lora) == 2 * len(swapped) and all(m.weight.requires_grad for m in lora)
    specs = make_specs(4, 6, frames=(6, 40), answer=(5, 20))
    batch = collate(synth, specs, [0, 1, 2, 3])
    (l_ref, g_ref), (l_fp8, g_fp8) = loss_and_grads(ref, batch), loss_and_grads(model, batch)
    assert g_ref.keys() == g_fp8.keys() and g_ref
    assert l_fp8 != l_ref and l_fp8 == pytest.approx(l_ref, rel=0.01)        # measured 2.4e-4 and 1.5e-4
    flat = lambda g: torch.cat([t.flatten() for t in g.values()])          # noqa: E731
    assert 0 < rel(flat(g_fp8), flat(g_ref)) < 0.1                            # measured 0.059 and 0.059


def test_compiled_fp8_layers_equal_eager(tok, synth):
    """--compile_layers with --fp8: dynamo traces the FP8 matmul (its autograd function and the quantisation)
    into the layers' graphs, and the loss and gradients are the eager FP8 ones. aot_eager_decomp_partition
    runs the partitioner inductor uses, without generating kernels."""
    _, model = fp8_and_reference(tok, 1)
    batch = collate(synth, make_specs(3, 6, frames=(6, 30), answer=(5, 20)), [0, 1, 2])
    eager = loss_and_grads(model, batch)
    torch._dynamo.reset()
    try:
        kernels.compile_decoder_layers(model.llm, "aot_eager_decomp_partition")
        compiled = loss_and_grads(model, batch)
        kernels.uncompile_decoder_layers(model.llm)
    finally:
        torch._dynamo.reset()
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    for k in eager[1]:
        torch.testing.assert_close(compiled[1][k], eager[1][k], rtol=1e-4, atol=1e-6, msg=k)


def test_refusals_name_the_flag(monkeypatch):
    """A GPU without FP8 tensor cores, ZeRO-3 and an nf4 base are refused in one line naming --fp8."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    gpu = torch.device("cuda", 0)
    assert not fp8.fp8_matmul_available(gpu)
    for kw, words in (({}, "A100-SXM4-80GB (compute capability 8.0) has no FP8 tensor cores"),
                      ({"zero3": True}, "not with ZeRO-3"), ({"bits": 4}, "with --bits 4")):
        with pytest.raises(RunError) as e:
            fp8.check_support(gpu, **kw)
        assert str(e.value).startswith("--fp8") and words in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8.fp8_matmul_available(gpu)
    fp8.check_support(gpu)                                   # an H100/H200 passes
    fp8.check_support(CPU)                                   # the CPU runs it emulated


def test_finetune_refuses_fp8_on_an_nf4_base(capsys):
    import finetune
    from training import validate_args
    p = finetune.parser()
    args = p.parse_args(["--projector", "x", "--fp8", "--max_steps", "1"])
    with pytest.raises(SystemExit) as e:
        validate_args(p, args)
    assert e.value.code == 2 and "--fp8 with --bits 4: the frozen base is either nf4 or FP8; add --bits 16" in \
        capsys.readouterr().err
