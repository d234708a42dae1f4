"""CPU checks of bench/benchmark.py's correctness-critical parts on the tiny shape (no GPU, no downloads, < 60 s).

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q tests/test_bench.py

The fast paths timed by the benchmark must compute the same thing as the plain path: a length-grouped,
padded batch gives the loss of its samples run one at a time; checkpointing changes neither loss nor
gradients; the in-memory nf4 quantisation is what from_pretrained(BitsAndBytesConfig) loads; the plain-HF
generation ablation returns Translator.generate_ids' tokens; the "ours" and "ours <= N GiB" picks.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from bench import benchmark as bench
from bench.benchmark import matmul_params, mfu
from bench.synthetic import (DIMS, SHAPES, Spec, Synth, assemble_with, build_llm, collate, frame_counts, make_specs,
                             quantize_4bit_, sign_config)

CPU = torch.device("cpu")
F32 = torch.float32


pytestmark = pytest.mark.usefixtures("one_thread")     # conftest: small matmuls on one CPU thread


def short_specs(n=8, seed=3):
    return make_specs(n, seed, frames=(6, 40), answer=(20, 80))


def stage1_model(tok, seed=0):
    llm = build_llm("tiny", CPU, F32, seed)
    model = assemble_with(llm, sign_config(1, 16), tok, CPU, F32)
    return model.train()


def loss_over(model, synth, specs, batches, padding_side="right"):
    tot = cnt = 0.0
    for b in batches:
        batch = collate(synth, specs, b, padding_side)
        loss_sum, n = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels", "features", "frame_index")})
        tot += loss_sum.item()
        cnt += n.item()
    return tot / cnt, cnt


# ------------------------------------------------------------------------------------------ arithmetic
def test_mfu_formula():
    assert mfu(7e9, 1000.0, 1e15) == pytest.approx(4 * 7e9 * 1000 / 1e15)
    # Llama-3-8B: 32 x (q 4096^2 + k,v 2 x 4096x1024 + o 4096^2 + gate/up/down 3 x 4096x14336)
    assert matmul_params(SHAPES["8b"]) == 6_979_321_856
    # At the measured peak, 4 P FLOP per token: MFU 1 exactly.
    p = matmul_params(SHAPES["8b"])
    assert mfu(p, 1e15 / (4 * p), 1e15) == pytest.approx(1.0)


def test_matmul_params_counts_the_decoder_linears():
    llm = build_llm("tiny", CPU, F32)
    n = sum(m.weight.numel() for m in llm.model.layers.modules() if isinstance(m, nn.Linear))
    assert matmul_params(SHAPES["tiny"]) == n


def test_systematic_sample():
    assert bench.systematic(10, 3) == [0, 3, 6]
    assert bench.systematic(4, 10) == [0, 1, 2, 3]
    assert bench.systematic(5, 1) == [0]


# ------------------------------------------------------------------------------------------ samples
@pytest.mark.parametrize("dist", ["loguniform", "uniform"])
def test_spec_ranges_and_determinism(dist):
    specs = make_specs(3000, 0, frames=(50, 600), answer=(20, 80), dist=dist)
    T = np.array([s.frames for s in specs])
    A = np.array([s.answer for s in specs])
    assert T.min() >= 50 and T.max() <= 600 and A.min() >= 20 and A.max() <= 80
    assert T.min() < 60 and T.max() > 560 and A.min() == 20 and A.max() == 80      # the whole range is used
    if dist == "loguniform":
        assert np.median(T) < 200 < T.mean() + 60        # skewed to short clips: median ~ sqrt(50 * 600) = 173
    else:
        assert 300 < np.median(T) < 350
    assert specs == make_specs(3000, 0, frames=(50, 600), answer=(20, 80), dist=dist)
    assert specs != make_specs(3000, 1, frames=(50, 600), answer=(20, 80), dist=dist)


def test_sample_layout(synth):
    from signllava.prompts import special_ids
    ids = special_ids(synth.tok)
    for i, s in enumerate([Spec(50, 20), Spec(51, 80), Spec(600, 33)]):
        it = synth.item(i, s)
        fc = frame_counts(s.frames)
        assert fc == [s.frames, s.frames // 2, s.frames, s.frames]           # mae, sign2vec, dino, pose
        assert [f.shape for f in it["features"]] == [(t, DIMS[m]) for t, m in zip(fc, DIMS)]
        assert all(f.dtype == np.float16 for f in it["features"])
        assert [int((it["segments"] == k).sum()) for k in range(4)] == fc
        assert int((it["input_ids"] == ids["markers"][0]).sum()) == 4 == int((it["input_ids"] == ids["markers"][1]).sum())
        target = it["labels"][it["labels"] != -100]
        assert len(target) == s.answer + 1 and target[-1] == ids["eot"]
        assert np.array_equal(it["input_ids"][-len(target):], target)       # the answer closes the sequence
        assert not np.isin(target[:-1], [*ids["markers"], ids["pad"], ids["eot"]]).any()
        assert len(it["input_ids"]) == synth.seq_len(s) and it["input_ids"].max() < synth.vocab
        gen = synth.item(i, s, generation=True)
        assert len(gen["input_ids"]) == synth.prompt_len(s) and (gen["labels"] == -100).all()
        assert np.array_equal(gen["input_ids"], it["input_ids"][:len(gen["input_ids"])])
        for a, b in zip(gen["features"], it["features"]):
            assert np.array_equal(a, b)                                      # features depend on (seed, i) only


def test_prompt_is_the_real_chat_prompt(synth):
    it = synth.item(0, Spec(8, 20), generation=True)
    text = synth.tok.decode(it["input_ids"])
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert "Translate the given American Sign Language video into English." in text
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


# ------------------------------------------------------------------------------------------ same loss
def test_batched_loss_equals_one_at_a_time(tok, synth):
    """The "fast paths give the same loss as the plain path" check: padded, length-grouped batches and
    ungrouped batches give sum(loss_sum) / sum(n) of the same samples run one at a time."""
    specs = short_specs(8)
    model = stage1_model(tok)
    lengths = np.array([Synth.approx_length(s) for s in specs])
    with torch.no_grad():
        one, n1 = loss_over(model, synth, specs, [[i] for i in range(len(specs))])
        grouped, n2 = loss_over(model, synth, specs, bench.plan_batches(lengths, 4, 0, True))
        ungrouped, n3 = loss_over(model, synth, specs, bench.plan_batches(lengths, 3, 0, False))
        whole, n4 = loss_over(model, synth, specs, [list(range(len(specs)))])
    assert n1 == n2 == n3 == n4 == sum(s.answer + 1 for s in specs)
    for v in (grouped, ungrouped, whole):
        assert v == pytest.approx(one, abs=1e-4)
    assert 5 < one < 9                                  # ~ln(1000): a random model, a real cross-entropy


def test_grouping_cuts_padding(synth):
    specs = make_specs(512, 0, frames=(50, 600))
    lengths = np.array([Synth.approx_length(s) for s in specs])
    seq = np.array([synth.seq_len(s) for s in specs])

    def pad_frac(plan):
        return 1 - sum(seq[b].sum() for b in plan) / sum(len(b) * seq[b].max() for b in plan)
    assert pad_frac(bench.plan_batches(lengths, 8, 0, True)) < 0.05 < 0.3 < pad_frac(bench.plan_batches(lengths, 8, 0, False))


def test_token_budget_plan(synth):
    from training import prompt_tokens
    specs = make_specs(700, 0, frames=(50, 600))
    lengths = np.array([Synth.approx_length(s) for s in specs])
    seq = np.array([synth.seq_len(s) for s in specs])
    overhead = prompt_tokens(synth.builder, len(synth.modalities))
    assert set((seq - lengths).tolist()) == {overhead}              # training's overhead = the real prompt tokens
    budget = 4 * int(seq.max())
    plan = bench.plan_batches(lengths, 0, 0, True, budget, overhead)   # data.plan_epoch, as training calls it
    assert sorted(i for b in plan for i in b) == list(range(700))
    assert all(len(b) * seq[b].max() <= budget for b in plan)
    sizes = [len(b) for b in plan]
    assert min(sizes) <= 5 and max(sizes) >= 12          # long clips in small batches, short ones in large
    assert 1 - seq.sum() / sum(len(b) * seq[b].max() for b in plan) < 0.05
    assert plan == bench.plan_batches(lengths, 0, 0, True, budget, overhead)


def test_checkpointing_keeps_loss_and_gradients(tok, synth):
    specs = short_specs(3)
    batch = collate(synth, specs, [0, 1, 2])
    args = {k: batch[k] for k in ("input_ids", "attention_mask", "labels", "features", "frame_index")}
    model = stage1_model(tok)
    out = {}
    for on in (False, True):
        bench.set_gradient_checkpointing(model, on)
        model.zero_grad(set_to_none=True)
        loss_sum, n = model(**args)
        (loss_sum / n).backward()
        out[on] = (loss_sum.item(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
    assert out[True][0] == pytest.approx(out[False][0], rel=1e-6)
    for k, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], g, rtol=1e-5, atol=1e-7)


def test_two_training_steps_with_and_without_grouping(tok, synth):
    specs = short_specs(8)
    lengths = np.array([Synth.approx_length(s) for s in specs])
    for grouped in (False, True):
        model = stage1_model(tok)
        tr = bench.Trainer(model, 1e-3, CPU)
        before = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
        frozen = model.llm.model.layers[0].mlp.up_proj.weight.detach().clone()
        plan = bench.plan_batches(lengths, 4, 0, grouped)
        res = bench.timed_steps(tr.step, [collate(synth, specs, b) for b in plan], 0, CPU)
        assert res["steps"] == 2 and res["samples"] == 8 and res["targets"] == sum(s.answer + 1 for s in specs)
        assert res["real"] == sum(synth.seq_len(s) for s in specs) <= res["padded"]
        assert np.isfinite(res["loss_per_token"])
        assert all(not torch.equal(before[k], p) for k, p in model.named_parameters() if p.requires_grad)
        assert torch.equal(frozen, model.llm.model.layers[0].mlp.up_proj.weight)


# ------------------------------------------------------------------------------------------ 4-bit
@pytest.mark.parametrize("method", ["hf", "manual"])
def test_in_memory_nf4_equals_from_pretrained(tmp_path, tok, method):
    """quantize_4bit_ builds what model.load_llm(path, bits=4) loads: same modules, same packed weights and
    quantisation state, same logits; and peft then puts its bnb LoRA layers on it, as in stage 2."""
    import bitsandbytes as bnb
    import model as M
    src = build_llm("tiny", CPU, F32, seed=1)
    src.save_pretrained(tmp_path / "m")
    ref = M.load_llm(str(tmp_path / "m"), 4, F32, CPU)
    ours = build_llm("tiny", CPU, F32, seed=1)
    assert quantize_4bit_(ours, CPU, F32, method=method) == 7 * SHAPES["tiny"]["num_hidden_layers"]
    assert ours._bench_quantizer == method
    mods_r = {n: m for n, m in ref.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    mods_o = {n: m for n, m in ours.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(mods_r) == sorted(mods_o) and "lm_head" not in mods_o
    for n, a in mods_r.items():
        b = mods_o[n]
        qa, qb = a.weight.quant_state, b.weight.quant_state
        assert torch.equal(a.weight.data, b.weight.data)
        assert (qa.quant_type, qa.blocksize, qa.nested, qa.dtype) == (qb.quant_type, qb.blocksize, qb.nested, qb.dtype) == ("nf4", 64, True, F32)
        assert torch.equal(qa.absmax, qb.absmax) and torch.equal(qa.state2.absmax, qb.state2.absmax)
        assert a.compute_dtype == b.compute_dtype and a.weight.quant_storage == b.weight.quant_storage == torch.uint8
    assert ours.is_loaded_in_4bit and ours.config.quantization_config.bnb_4bit_use_double_quant
    x = torch.randint(12, 1000, (2, 9))
    ref.eval(), ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, ours(x).logits, rtol=0, atol=0)
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit
    for llm in (ref, ours):
        model = assemble_with(llm, sign_config(2, 4), tok, CPU, F32, adapter="new")
        lora = [m for m in model.modules() if isinstance(m, LoraLinear4bit)]
        assert len(lora) == 7 * SHAPES["tiny"]["num_hidden_layers"] and lora[0].r["default"] == 64


def test_qlora_batched_loss_equals_one_at_a_time(tok, synth):
    specs = short_specs(4, seed=5)
    llm = build_llm("tiny", CPU, F32)
    quantize_4bit_(llm, CPU, F32)
    model = assemble_with(llm, sign_config(2, 4), tok, CPU, F32, adapter="new").eval()   # eval: no LoRA dropout
    with torch.no_grad():
        one, _ = loss_over(model, synth, specs, [[i] for i in range(len(specs))])
        batched, _ = loss_over(model, synth, specs, [[0, 1, 2, 3]])
    assert batched == pytest.approx(one, abs=1e-4)


# ------------------------------------------------------------------------------------------ OOM handling
def test_oom_is_recorded_and_the_next_size_tried(tok, synth):
    specs = short_specs(16)
    model = stage1_model(tok)
    args = bench.parse_args(["--shape", "tiny", "--steps", "1", "--ref_steps", "1", "--warmup", "0",
                             "--batch_sizes", "8,4,2"])
    ctx = {"mean_real_tokens": 100.0, "matmul_params": 1, "peak_flops": 1e12}

    def fake_oom_above_2(trainer):
        def step(batch):
            if len(batch["input_ids"]) > 2:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
            return trainer.step(batch)
        return step
    res = bench.bench_training("stage1", model, synth, specs, args, CPU, ctx, lr=1e-3, step_override=fake_oom_above_2)
    by = {(r["batch_size"], r["gradient_checkpointing"], r["role"]): r for r in res}
    assert by[(1, True, "baseline")]["status"] == "ok"
    assert [by[(b, False, "ours")]["status"] for b in (8, 4, 2)] == ["OOM", "OOM", "ok"]
    assert [by[(b, True, "ours")]["status"] for b in (8, 4, 2)] == ["OOM", "OOM", "ok"]
    assert sum(bool(r.get("best")) for r in res) == 1
    abl = [r for r in res if r["role"] == "ablation" and not r["packed"]]     # the packed one: fused-ops ablation
    assert len(abl) == 1 and abl[0]["status"] == "ok" and abl[0]["batch_size"] == 2 and not abl[0]["grouped"]
    assert "out of memory" in by[(8, False, "ours")]["error"].lower()
    # (d) padded and (f) packed at one budget = bs2's longest batch: they may hold > 2 clips
    cand = [r for r in res if r.get("max_tokens") and r["role"] == "ours"]
    assert [r["packed"] for r in cand] == [False, True] and len({r["max_tokens"] for r in cand}) == 1
    assert all(r["role"] == "ours" and r["status"] in ("ok", "OOM") and not r["gradient_checkpointing"] for r in cand)
    ok = [r for r in res if r["role"] == "ours" and r["status"] == "ok"]
    assert next(r for r in res if r.get("best")) is max(ok, key=lambda r: r["pop_samples_per_s"])


def fake_memory(monkeypatch, model=None, compiled_factor: float = 1.0, resident: float | None = None,
                fail_budgeted: bool = False):
    """Fake peak memory for the memory-target tests: 1 GiB plus 0.01 GiB per token of the largest batch since
    the last reset (real tokens when packed), 3x that without checkpointing, x compiled_factor while `model`'s
    layers are compiled (and x the compiler's activation memory budget); `resident`: the memory held between
    steps, where the device would count it. Returns the step override that records the tokens (and raises
    inductor's failure on a compiled step under an activation memory budget with fail_budgeted)."""
    from torch._dynamo.exc import BackendCompilerFailed
    from bench.synthetic import base_llm
    from signllava import kernels
    layer = kernels.decoder_layers(base_llm(model))[0] if model is not None else None
    compiled = lambda: layer is not None and layer._compiled_call_impl is not None      # noqa: E731
    state = {"gc": False, "tok": 0}
    set_gc = bench.set_gradient_checkpointing
    monkeypatch.setattr(bench, "set_gradient_checkpointing", lambda m, on: (state.update(gc=on), set_gc(m, on)))
    monkeypatch.setattr(bench, "reset_peak_mem", lambda d: state.update(tok=0))
    monkeypatch.setattr(bench, "resident_mem_gb", lambda d: resident)
    monkeypatch.setattr(bench, "peak_mem_gb", lambda d: 1 + 0.01 * state["tok"] * (1 if state["gc"] else 3)
                        * (compiled_factor * torch._functorch.config.activation_memory_budget if compiled() else 1))

    def recording(trainer):
        def step(batch):
            if fail_budgeted and compiled() and torch._functorch.config.activation_memory_budget < 1:
                raise BackendCompilerFailed(lambda: None, AssertionError("the cause\nmore detail"), None)
            state["tok"] = max(state["tok"], bench.batch_stats(batch)["real" if trainer.model.packing else "padded"])
            return trainer.step(batch)
        return step
    return recording


def test_memory_target_adds_checkpointed_configs(tok, synth, monkeypatch):
    specs = short_specs(16)
    args = bench.parse_args(["--shape", "tiny", "--steps", "1", "--ref_steps", "1", "--warmup", "0",
                             "--batch_sizes", "4,2"])
    ctx = {"mean_real_tokens": 100.0, "matmul_params": 1, "peak_flops": 1e12}
    recording = fake_memory(monkeypatch)
    first = bench.bench_training("qlora", stage1_model(tok), synth, specs, args, CPU, ctx, lr=1e-3,
                                 step_override=recording)
    assert not any(r.get("best_mem") for r in first)
    ref = first[0]["peak_mem_gb"]
    lim = ref + 0.5 * (min(r["peak_mem_gb"] for r in first if r["role"] == "ours") - ref)
    res = bench.bench_training("qlora", stage1_model(tok), synth, specs, args, CPU, ctx, lr=1e-3,
                               step_override=recording, mem_target_gb=lim)
    extra = [r for r in res if r["name"].startswith("(e)")]
    assert 1 <= len(extra) <= 2 and all(r["gradient_checkpointing"] and r["role"] == "ours" for r in extra)
    fit = [r for r in res if r.get("best_mem")]
    assert len(fit) <= 1 and all(bench.fits(r, lim) for r in fit)
    assert bool(fit) == any(bench.fits(r, lim) for r in extra)
    rows = bench.summary_rows({"qlora": {"configs": res, "mem_target_gb": lim}})
    row = [r for r in rows if r["config"].startswith("ours <=")]
    assert len(row) == 1 and (row[0]["ratio"] is not None) == bool(fit)


def test_memory_target_tries_an_activation_memory_budget(tok, synth, monkeypatch):
    """After (g), the memory target's (e) row: compiled layers under --memory_budget (compiled anew, no
    checkpointing), at the packed budget that (g)'s memory a token times the budget predicts fills 90 % of the
    target; the eager checkpointed fallback only runs when none fits."""
    from bench.synthetic import base_llm
    from signllava import kernels
    specs = short_specs(16)
    args = bench.parse_args(["--shape", "tiny", "--steps", "1", "--ref_steps", "1", "--warmup", "0",
                             "--batch_sizes", "4,2", "--compile_backend", "eager"])   # dynamo traces, runs eagerly
    ctx = {"mean_real_tokens": 100.0, "matmul_params": 1, "peak_flops": 1e12}
    model = stage1_model(tok)
    layer = kernels.decoder_layers(base_llm(model))[0]
    recording = fake_memory(monkeypatch, model, compiled_factor=0.5, resident=1.0)
    longest = max(synth.seq_len(s) for s in specs)
    lim = 1 + 0.02 * longest          # the longest sample alone fits compiled without checkpointing, eager not
    try:
        res = bench.bench_training("qlora", model, synth, specs, args, CPU, ctx, lr=1e-3, step_override=recording,
                                   mem_target_gb=lim)
    finally:
        torch._dynamo.reset()
    g = next(r for r in res if r["name"].startswith("(g)"))
    assert g["status"] == "ok" and g["dynamo"]["unique_graphs"] > 0 and not bench.fits(g, lim)
    extra = [r for r in res if r["name"].startswith("(e)")]
    assert len(extra) == 1 and all(bench.fits(r, lim) and r["dynamo"] and not r["gradient_checkpointing"]
                                   for r in extra)
    assert all(r["name"].endswith("activation memory budget 0.25, LoRA dropout 0") for r in extra)
    # (g) costs 0.015 GiB a token over the 1 GiB held (0.01 x 3 without checkpointing x 0.5 compiled); at budget
    # 0.25 that predicts 0.00375, exactly what the fake then costs: no second row
    assert abs(extra[0]["max_tokens"] - bench.tokens_within(1.0, 0.00375, 0.9 * lim)) <= 1 < longest < extra[0]["max_tokens"]
    assert layer._compiled_call_impl is None                     # eager again for what follows
    assert torch._functorch.config.activation_memory_budget == 1.0
    fit = [r for r in res if r.get("best_mem")]
    assert len(fit) == 1 and fit[0] in extra


@pytest.mark.parametrize("case", ["predicted", "missed", "no basis"])
def test_memory_budgeted_rows_are_sized_then_re_aimed_once(case):
    """fit_memory_budgeted: the first row at the budget the basis row's memory a token x the activation memory
    budget predicts fills 0.9 x the limit; a second only when that row peaked outside [0.8, 1] x the limit, aimed
    by its own cost; without a basis, the longest sample first. Fake rows: 2 GiB held + cost x tokens."""
    cost = {"predicted": 0.001, "missed": 0.002, "no basis": 0.001}[case]        # GiB a token under the budget
    held, limit, longest = 2.0, 12.0, 1000
    results = [{"status": "ok", "resident_mem_gb": held}]
    basis = None if case == "no basis" else {"status": "ok", "peak_mem_gb": held + 0.004 * 5000, "max_batch_tokens": 5000}
    asked = []

    def run_budget(tokens):
        asked.append(tokens)
        return {"status": "ok", "max_batch_tokens": tokens, "peak_mem_gb": held + cost * tokens}
    bench.fit_memory_budgeted(results, limit, longest, run_budget, basis, memory_budget=0.25)
    aimed = lambda c: bench.tokens_within(held, c, 0.9 * limit)         # noqa: E731
    assert asked == {"predicted": [aimed(0.001)], "missed": [aimed(0.001), aimed(0.002)],
                     "no basis": [longest, aimed(0.001)]}[case]


def test_a_compile_failure_is_a_row_and_the_eager_memory_fallback_runs(tok, synth, monkeypatch):
    """torch.compile failing on the memory target's compiled rows is recorded on that row with the backend's
    own exception, and the eager checkpointed (e) still seeks the target -- even past --time_limit_s."""
    specs = short_specs(16)
    args = bench.parse_args(["--shape", "tiny", "--steps", "1", "--ref_steps", "1", "--warmup", "0",
                             "--batch_sizes", "4,2", "--compile_backend", "eager", "--no_ablation"])
    ctx = {"mean_real_tokens": 100.0, "matmul_params": 1, "peak_flops": 1e12}
    model = stage1_model(tok)
    recording = fake_memory(monkeypatch, model, resident=1.0, fail_budgeted=True)
    lim = 1 + 0.02 * max(synth.seq_len(s) for s in specs)
    args.t0 = -1e9            # past --time_limit_s by the memory target's turn: only its own tries run
    within = bench.out_of_time
    monkeypatch.setattr(bench, "out_of_time", lambda a, what, into=None: "(e)" in what and within(a, what, into))
    try:
        res = bench.bench_training("qlora", model, synth, specs, args, CPU, ctx, lr=1e-3, step_override=recording,
                                   mem_target_gb=lim)
    finally:
        torch._dynamo.reset()
    failed = [r for r in res if r["status"] == "error"]
    assert len(failed) == 1 and "activation memory budget" in failed[0]["name"]
    assert failed[0]["error"].startswith("BackendCompilerFailed (AssertionError): the cause / more detail")
    eager = [r for r in res if r["name"].startswith("(e)") and "dynamo" not in r]
    assert len(eager) == 1 and eager[0]["status"] == "ok" and eager[0]["gradient_checkpointing"]


def test_fp8_rows_against_their_bf16_row(tok, synth, monkeypatch):
    """(h), --fp8: the model with its frozen linears in FP8 (emulated here) at its bf16 row's token budget, the
    ratio to that row, then the memory target's compiled rows under the activation memory budget; role "fp8",
    and lora_fp8's summary ratios are to QLoRA's reference."""
    from signllava import kernels
    from signllava.fp8 import FrozenFP8Linear, convert_frozen_linears
    specs = short_specs(16)
    args = bench.parse_args(["--shape", "tiny", "--steps", "1", "--warmup", "0", "--compile_backend", "eager"])
    ctx = {"mean_real_tokens": 100.0, "matmul_params": 1, "peak_flops": 1e12}
    model = stage1_model(tok)
    assert convert_frozen_linears(model.llm, CPU) == 14
    recording = fake_memory(monkeypatch, model, compiled_factor=0.5, resident=1.0)
    longest = max(synth.seq_len(s) for s in specs)
    lim = 1 + 0.02 * longest
    base = {"name": "(g) ours: bf16", "status": "ok", "max_tokens": 2 * longest, "pop_samples_per_s": 2.0}
    try:
        res = bench.bench_fp8("lora_fp8", model, synth, specs, args, CPU, ctx, 1e-3, base, [], mem_target_gb=lim,
                              step_override=recording)
    finally:
        torch._dynamo.reset()
    assert [r["role"] for r in res] == ["fp8"] * 2 and all(r["status"] == "ok" and r["dynamo"] for r in res)
    assert res[0]["max_tokens"] == base["max_tokens"] and res[0]["name"].endswith("compiled layers, FP8")
    assert all(r["vs_base"] == r["pop_samples_per_s"] / 2.0 and r["base"] == base["name"] for r in res)
    assert abs(res[1]["max_tokens"] - bench.tokens_within(1.0, 0.00375, 0.9 * lim)) <= 1    # sized from (h)
    assert all("FP8, activation memory budget 0.25" in r["name"] for r in res[1:])
    assert [bool(r.get("best_mem")) for r in res].count(True) == 1 and not bench.fits(res[0], lim)
    assert isinstance(kernels.decoder_layers(model.llm)[0].self_attn.q_proj, FrozenFP8Linear)
    ref = {"name": "(a) ref: bs1 GC", "role": "baseline", "status": "ok", "pop_samples_per_s": 0.5}
    rows = bench.summary_rows({"qlora": {"configs": [ref]}, "lora_fp8": {"configs": res, "mem_target_gb": lim}})
    fp8_rows = [r for r in rows if r["section"] == "lora_fp8"]
    assert len(fp8_rows) == 3 and all(r["ratio"] == r["value"] / 0.5 for r in fp8_rows)
    skipped = bench.bench_fp8("stage1", model, synth, specs, args, CPU, ctx, 1e-3, None, [])
    assert [r["status"] for r in skipped] == ["skipped"]


def test_timed_steps_budget_keeps_a_prefix():
    batches = [{"input_ids": torch.zeros(2, 5, dtype=torch.long), "attention_mask": torch.ones(2, 5, dtype=torch.long),
                "labels": torch.zeros(2, 5, dtype=torch.long)} for _ in range(10)]
    seen = []
    res = bench.timed_steps(lambda b: seen.append(b) or 1.0, batches, 2, CPU, budget_s=0.0)
    assert res["steps"] == 3 and res["samples"] == 6 and res["stopped_by_budget"] and len(seen) == 5
    res = bench.timed_steps(lambda b: 1.0, batches, 2, CPU)
    assert res["steps"] == 8 and "stopped_by_budget" not in res and res["targets"] == 8 * 2 * 4


def test_time_limit_skips_the_optional_configs(tok, synth):
    specs = short_specs(8)
    args = bench.parse_args(["--shape", "tiny", "--steps", "1", "--ref_steps", "1", "--warmup", "0",
                             "--batch_sizes", "4", "--time_limit_s", "0"])
    args.t0 = 0.0                           # long past
    ctx = {"mean_real_tokens": 100.0, "matmul_params": 1, "peak_flops": 1e12}
    res = bench.bench_training("stage1", stage1_model(tok), synth, specs, args, CPU, ctx, lr=1e-3)
    assert [(r["role"], r["status"]) for r in res] == [("baseline", "ok"), ("ours", "ok")] + [("skipped", "skipped")] * 3
    assert all(r["ratio"] is None for r in bench.summary_rows({"stage1": {"configs": res}}) if r["status"] != "ok")


# ------------------------------------------------------------------------------------------ generation
def test_plain_hf_generates_what_translator_generates(tok, synth):
    from generate import Translator
    llm = build_llm("tiny", CPU, F32, seed=2)
    model = assemble_with(llm, sign_config(1, 16), tok, CPU, F32).eval()
    tr = Translator(model, tok, model.cfg, CPU)
    specs = short_specs(5, seed=7)
    items = [synth.item(i, s, generation=True) for i, s in enumerate(specs)]
    for beams in (1, 3):
        ref = tr.generate_ids(items, num_beams=beams, max_new_tokens=8)
        got = bench.generate_ids_plain_hf(tr, items, num_beams=beams, max_new_tokens=8)
        assert got == ref and all(len(r) > 0 for r in ref)


def test_generation_oom_retries_at_half_the_batch(synth):
    class FakeTranslator:
        calls = []
        decode_steps = "eager"

        def generate_ids(self, items, num_beams, max_new_tokens):
            self.calls.append(len(items))
            if len(items) > 4:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 30.00 GiB")
            return [[7] * max_new_tokens for _ in items]
    args = bench.parse_args(["--shape", "tiny", "--gen_batch_size", "16", "--gen_batches", "3", "--gen_serial", "3",
                             "--max_new_tokens", "2", "--no_plain_hf"])
    specs = make_specs(40, 1, frames=(6, 40), answer=(1, 1))
    g = bench.bench_generation(FakeTranslator(), synth, specs, args, CPU)
    b = g["batched"]
    assert b["status"] == "ok" and b["batch_size"] == 4 and [o["batch_size"] for o in b["oom_at"]] == [16, 8]
    assert b["n_batches"] == 10 and b["clips_per_s"] > 0 and b["new_tokens"] == 2 * b["clips"]
    assert g["serial"]["clips"] == 3 and g["serial"]["same_output_as_batched"] == 1.0
    assert "plain_hf" not in g


# ------------------------------------------------------------------------------------------ end to end
def test_a_failing_section_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("boom in generation")
    monkeypatch.setattr(bench, "bench_generation", boom)
    out = tmp_path / "r.json"
    R = bench.main(["--shape", "tiny", "--device", "cpu", "--only", "gen,loader", "--samples", "8", "--frames", "6,20",
                    "--loader_clips", "12", "--loader_batches", "2", "--workers", "0", "--out", str(out),
                    "--tmp_dir", str(tmp_path)])
    saved = json.loads(out.read_text())
    assert saved["errors"] == {"generation": "RuntimeError: boom in generation"} == R["errors"]
    assert saved["loader"]["workers"]["0"]["samples_per_s"] > 0 and "generation" not in saved


def test_main_tiny_end_to_end(tmp_path):
    out = tmp_path / "r.json"
    R = bench.main(["--shape", "tiny", "--device", "cpu", "--samples", "48", "--frames", "6,40", "--steps", "2",
                    "--ref_steps", "2", "--warmup", "1", "--batch_sizes", "4", "--gen_clips", "24", "--gen_batches", "2",
                    "--gen_batch_size", "4", "--gen_serial", "2", "--num_beams", "2", "--max_new_tokens", "4",
                    "--loader_clips", "24", "--loader_batches", "3", "--workers", "0,2", "--out", str(out),
                    "--tmp_dir", str(tmp_path)])
    saved = json.loads(out.read_text())
    assert saved["summary"] == json.loads(json.dumps(R["summary"]))
    for sec in ("stage1", "qlora"):
        cfgs = saved[sec]["configs"]
        # (a), (b), (d), (f) packed at (d)'s budget ((g), compiled layers, is off on a CPU by default: minutes of
        # compilation; tests/test_packing.py pins the compiled layers); then the ablations (they go first past
        # --time_limit_s): (c) ungrouped, and (f) with transformers' own RMSNorm forward
        assert [c["role"] for c in cfgs] == ["baseline", "ours", "ours", "ours", "ablation", "ablation"]
        assert [c["packed"] for c in cfgs] == [False] * 3 + [True, False, True]
        assert cfgs[-1]["name"].endswith("stock RMSNorm") and cfgs[-1]["max_tokens"] == cfgs[3]["max_tokens"]
        assert all(c["status"] == "ok" for c in cfgs)
        assert all(c["samples"] > 0 and c["real_tokens_per_s"] > 0 and 0 < c["mfu"] for c in cfgs)
    chk = saved["stage1"]["packing_check"]
    assert chk["kernel"] == "SDPA per sample" and chk["loss_rel_diff"] < 1e-5 and chk["grad_rel_diff"] < 1e-4
    g = saved["generation"]
    assert g["clips"] == 24 and g["batched"]["n_batches"] == 6 and g["batched"]["batches"] == 2
    for k in ("batched", "plain_hf", "serial"):
        assert g[k]["status"] == "ok" and g[k]["clips_per_s"] > 0
    assert g["plain_hf"]["same_output_as_batched"] == 1.0
    assert saved["quantization"]["method"] == "hf"
    assert set(saved["loader"]["workers"]) == {"0", "2"}
    assert all(r["samples_per_s"] > 0 for r in saved["loader"]["workers"].values())
    rows = saved["summary"]
    assert {r["section"] for r in rows} == {"stage1", "qlora", "generation", "loader"}
    assert all(r["ratio"] == 1.0 for r in rows if r["config"].startswith(("(a)", "clip-by-clip")))
    assert all(r["ratio"] is not None and r["ratio"] > 0 for r in rows)
    assert "ratio" in bench.format_table(rows)
