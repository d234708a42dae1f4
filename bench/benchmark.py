"""Throughput benchmark: reference-style vs our training steps, batched vs clip-by-clip generation, and
the CPU data loader, on a random-init Llama-3-8B-shaped LLM. One run; prints a table of ratios and writes
bench/results-<device>-<date>.json (and a copy into $OUT when that is a directory).

    python bench/benchmark.py --copy_to "$OUT"      # 8B shape on cuda, about 9 min on one H200
    python bench/benchmark.py --quick               # fewer steps / batches / clips, about 3-4 min
    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python bench/benchmark.py --shape tiny --quick    # CPU smoke run

What is timed (every ratio is against a baseline measured in the same run):

  stage1 / qlora   plain PyTorch steps of the real SignLLM built by model.assemble (forward -> loss_sum / n
                   backward -> clip_grad_norm 1.0 -> fused AdamW step), NOT through DeepSpeed. Parameters are
                   cast to bf16 as DeepSpeed's bf16 mode does; AdamW runs on them without an fp32 master copy
                   (stage-1 / LoRA optimizer state is < 0.2 B parameters, negligible next to the 8B passes).
                   (a) reference style: batch 1, gradient checkpointing, no grouping;
                   (b) ours: data.plan_epoch length-grouped batches, the largest batch that fits without
                       checkpointing, and the largest that fits with it ("fits" = one full step on the
                       longest batch of the epoch plan runs without OOM);
                   (c) ablation: the faster (b)'s batch and checkpointing without length grouping;
                   (d) ours with a token budget (training's --max_tokens_per_batch N: data.plan_epoch(max_tokens=N)
                       with the prompt template counted, as training does): batches cut by a padded-token budget
                       instead of a fixed size, no checkpointing, N = padded tokens of the longest batch that
                       fitted without checkpointing;
                   (c) also: the first (f) with transformers' own RMSNorm forward (fused_ops.unfuse);
                   (f) ours packed (training's default): the token budget's batches as one row each, samples
                       end to end without padding, attention within each sample (attention.py: the varlen
                       flash kernel), the budget counting real tokens; first at (d)'s budget, then at 1.5x if
                       that peaked under 70 % of the device's memory. Before timing, the packed and padded
                       losses of one batch are compared (packing_check in the JSON);
                   (g) ours packed with compiled decoder layers (training's --compile_layers: regional
                       torch.compile, inductor) at the fastest (f)'s budget; the warmup steps pay the compilation;
                   (h) FP8 (--fp8; auto: where the GPU has FP8 matmuls): the frozen LLM's linear layers in e4m3
                       (training's --fp8, signllava/fp8.py), packed and compiled as (g), at (g)'s budget, with
                       vs_base = its samples/s over (g)'s in this run; stage 1 after fp8_check (one batch's loss
                       and gradients before and after the conversion). Stage 2 beside QLoRA: LoRA on an FP8 base
                       (finetune.py --bits 16 --fp8, a fresh bf16 LLM converted), against QLoRA's (g), plus its
                       own <= --fp8_mem_gb rows under the activation memory budget as (e) below. Role "fp8";
                   * = ours: the fastest configuration that ran among (b), (d), (f), (g) (and (e)).
                   QLoRA also reports "ours <= 24 GiB" (--qlora_mem_gb): the fastest of those whose peak memory
                   stays within 24 GiB (a 24 GB card). (e) are the configurations timed for it (cuda only):
                   compiled layers under an activation memory budget (--memory_budget, training's
                   --activation_memory_budget) with LoRA dropout 0, no checkpointing: at the packed budget
                   predicted to fill 90 % of the target from (g)'s memory a token times the memory budget,
                   re-aimed once from its own peak if that missed; if none fits, up to two eager checkpointed ones: a token budget (packed unless --no_packing) sized
                   by a linear fit of peak memory to batch tokens, then the largest grouped fixed batch
                   estimated to fit.
                   Every row's wall_s (probe, warmup, compilation, timed steps) is in the JSON, and the
                   compiled rows' dynamo graph count and graph breaks. A row that runs out of memory or that
                   torch.compile fails on is recorded as such (status OOM / error, the cause) and the run goes on.
                   QLoRA: nf4 + double quantisation (bitsandbytes, the same modules and Params4bit that
                   from_pretrained(BitsAndBytesConfig) makes, quantised in memory), LoRA r64 a16 dropout 0.05
                   on all linear layers (finetune.py's defaults).
                   samples/s is "population-equivalent": real tokens/s / mean real tokens per sample of the
                   whole synthetic population, so configurations that drew longer or shorter samples compare
                   fairly; raw samples/s is in the JSON. MFU = 4 * matmul_params * real_tokens_per_s / peak,
                   matmul_params = the decoder's linear weights (6.98 B for 8B; lm_head, projectors and
                   attention scores not counted), peak = best measured bf16 8192^2 torch.mm in this run.
  generation       (baseline) generate.Translator.generate_ids one clip at a time with eager decode steps;
                   (ablations) plain HF generate() on a left-padded batch's inputs_embeds, which repeats every
                   prompt num_beams times and prefills each copy, and generate_ids batched with eager decode
                   steps; (ours) Translator.generate_ids on the same batches, which prefills each prompt once
                   into a KV cache shared by the beams and, on a GPU, replays each decode step from a CUDA
                   graph (decode_graph.py). Batches are
                   length-sorted, --gen_batch_size, like generate_split. A systematic sample of the batches of a --gen_clips
                   population is timed (the longest batch always runs first, as the OOM probe); clips/s and
                   the projected time for all --gen_clips clips are reported.
  loader           SignDataset + Collator + DataLoader (training's make_loader, pin_memory on cuda) over
                   sharded float16 h5 files in the real layout written to a temp dir, for each worker count;
                   samples/s and the ratio to the GPU's stage-1 "ours" samples/s (> 1: the loader keeps up).
                   The files were just written, so reads come from the page cache (an optimistic disk).

Samples (fixed seed): T frames per clip, log-uniform in --frames (default 50-600); mae 768, dino 1152, pose 208
at T frames, sign2vec 768 at T//2; an answer of 20-80 random token ids + <|eot_id|>; the real prompt
(prompts.PromptBuilder, the Llama-3 chat template, TRANSLATE) with the tiny BPE tokenizer of tiny_llm.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))      # the repository root: data, model, training, generate, signllava

from signllava.atomic import write_atomic  # noqa: E402
from bench.synthetic import (DIMS, FRAME_DIV, LORA, SHAPES, WORDS, Spec, Synth, assemble_with, base_llm, build_llm, cast_params_, collate, free_memory, frame_counts, llama_config, log, make_optimizer, make_specs, make_tokenizer, patched_load_llm, quantize_4bit_, set_gradient_checkpointing, set_gradient_checkpointing_llm, sign_config)  # noqa: E402

# ------------------------------------------------------------------------------------------ arithmetic
def matmul_params(shape: dict) -> int:
    """Weights of the decoder's linear layers (q, k, v, o, gate, up, down) x layers: what every token
    multiplies through. Embeddings (a lookup) and lm_head (only at answer positions) are left out."""
    h, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    nh, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = shape.get("head_dim") or h // nh
    attn = h * nh * hd + 2 * h * nkv * hd + nh * hd * h
    return L * (attn + 3 * h * i)


def mfu(n_matmul_params: int, tokens_per_s: float, peak_flops: float) -> float:
    """Model FLOPs utilisation of a frozen-base step: forward (2 P per token) + the backward pass to the
    inputs (2 P per token) = 4 P per real token; weight gradients of the base are not needed (frozen or LoRA).
    Checkpointing's recomputation is overhead, not counted."""
    return 4.0 * n_matmul_params * tokens_per_s / peak_flops


def systematic(n: int, k: int) -> list[int]:
    """k indices evenly spread over range(n), always including 0 (the longest when sorted)."""
    k = max(1, min(k, n))
    return sorted({min(n - 1, int(j * n / k)) for j in range(k)})


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def out_of_time(args, what: str, into: list | dict | None = None) -> bool:
    """True (and logged, and noted in `into`) once the run is past --time_limit_s: optional pieces are skipped
    so the whole run stays inside one 10-minute command."""
    t0 = getattr(args, "t0", None)
    if t0 is None or time.perf_counter() - t0 < args.time_limit_s:
        return False
    log(f"skipping {what}: past --time_limit_s {args.time_limit_s:.0f}")
    if isinstance(into, list):
        into.append({"name": what, "role": "skipped", "status": "skipped", "error": "past --time_limit_s"})
    elif isinstance(into, dict):
        into.setdefault("skipped", []).append(what)
    return True


def reset_peak_mem(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mem_gb(device: torch.device) -> float | None:
    """Peak allocated memory since reset_peak_mem, GiB; None where the device keeps no such count (cpu)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def resident_mem_gb(device: torch.device) -> float | None:
    """Memory held between steps (weights, gradients, optimizer state), GiB; None without a count (cpu)."""
    return torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else None


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e).lower())


def oom_message(e: BaseException) -> str:
    """An out-of-memory error as the one-line status a timed configuration records; anything else re-raised."""
    if not is_oom(e):
        raise e
    return f"OOM ({str(e).splitlines()[0][:160]})"


def failure_message(e: BaseException) -> tuple[str, str]:
    """(status, one line) of what a timed configuration may fail with and the run goes on: out of memory, or
    torch.compile failing on it (the cause: the exception the backend raised, whose message opens with what
    failed; dynamo's own message only names the backend); anything else re-raised."""
    from torch._dynamo.exc import TorchDynamoException
    if isinstance(e, TorchDynamoException):
        inner = getattr(e, "inner_exception", None) or e.__cause__ or e
        lines = [line.strip() for line in str(inner).splitlines() if line.strip()]
        return "error", f"{type(e).__name__} ({type(inner).__name__}): {' / '.join(lines[:3])[:400]}"
    return "OOM", oom_message(e)


def measure_peak_flops(device: torch.device, dtype: torch.dtype, n: int | None = None, trials: int = 5) -> dict:
    """Best-of-`trials` throughput of an n x n x n matmul (2 n^3 FLOP each)."""
    n = n or (8192 if device.type == "cuda" else 1024)
    reps = 20 if device.type == "cuda" else 3
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    for _ in range(3):
        torch.mm(a, b)
    best = math.inf
    for _ in range(trials):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - t) / reps)
    del a, b
    return {"n": n, "dtype": str(dtype), "best_s": best, "tflops": 2 * n ** 3 / best / 1e12}


def batch_stats(batch: dict) -> dict:
    from training import target_tokens
    B, L = batch["input_ids"].shape
    return {"samples": B, "real": int(batch["attention_mask"].sum()), "padded": B * L, "targets": target_tokens(batch)}


# ------------------------------------------------------------------------------------------ training steps
class Trainer:
    """One plain-PyTorch optimizer step = training.py's micro-step with G = W = 1: forward ->
    loss_sum / n_target (n counted on the host from the labels, as training does) -> backward ->
    clip_grad_norm_(1.0) -> AdamW step -> zero_grad. Returns loss_sum.item() (the step's one host sync)."""

    def __init__(self, model, lr: float, device: torch.device, max_grad_norm: float = 1.0):
        self.model, self.device, self.max_grad_norm = model, device, max_grad_norm
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(model, lr, device)

    def step(self, batch: dict) -> float:
        from training import target_tokens, to_device
        loss_sum, _ = self.model(**to_device(batch, self.device))
        (loss_sum / max(target_tokens(batch), 1)).backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss_sum.item()

    def reset(self):
        self.opt.zero_grad(set_to_none=True)


def timed_steps(step, batches: list[dict], warmup: int, device: torch.device, budget_s: float = math.inf,
                min_steps: int = 3) -> dict:
    """Warmup steps, then the rest timed; past budget_s (and at least min_steps) the rest is dropped --
    the batches are in random order, so the timed prefix is still a fair sample. warmup_s: the warmup's wall
    time (where a compiled row pays its compilation)."""
    t_warm = time.perf_counter()
    for b in batches[:warmup]:
        step(b)
    sync(device)
    warmup_s = time.perf_counter() - t_warm
    timed = []
    losses = []
    sync(device)
    t0 = time.perf_counter()
    for b in batches[warmup:]:
        if len(timed) >= min_steps and time.perf_counter() - t0 > budget_s:
            break
        losses.append(step(b))
        timed.append(b)
    sync(device)
    dt = time.perf_counter() - t0
    tot = {k: sum(batch_stats(b)[k] for b in timed) for k in ("samples", "real", "padded", "targets")}
    return {"steps": len(timed), "time_s": dt, **tot, "loss_per_token": sum(losses) / max(tot["targets"], 1),
            "warmup_steps": min(warmup, len(batches)), "warmup_s": warmup_s,
            **({"stopped_by_budget": True} if len(timed) < len(batches) - warmup else {})}


def run_config(trainer: Trainer, name: str, *, role: str, batch_size: int, gc_on: bool, grouped: bool,
               batches: list[dict], probe: dict | None, warmup: int, device: torch.device, ctx: dict,
               step=None, budget_s: float = math.inf, packed: bool = False) -> dict:
    """Time one configuration; an OOM (in the probe or the timed steps) is recorded, never raised.
    `packed`: the model packs each batch into one row (SignLLM.packing); the batch tokens are then its real ones."""
    step = step or trainer.step
    t_start = time.perf_counter()
    res = {"name": name, "role": role, "batch_size": batch_size, "gradient_checkpointing": gc_on,
           "grouped": grouped, "packed": packed, "status": "ok"}
    set_gradient_checkpointing(trainer.model, gc_on)
    trainer.model.packing = packed
    trainer.model.train()
    free_memory()
    reset_peak_mem(device)
    cost = "real" if packed else "padded"
    res["max_batch_tokens"] = max(batch_stats(b)[cost] for b in batches + ([probe] if probe is not None else []))
    failed = None
    try:
        t_probe = time.perf_counter()
        if probe is not None:
            p = batch_stats(probe)
            res["probe_tokens"] = p[cost]
            step(probe)
            sync(device)
        res["probe_s"] = time.perf_counter() - t_probe
        res.update(timed_steps(step, batches, warmup, device, budget_s))
    except Exception as e:         # noqa: BLE001 -- OOM and compile failures are data; the rest re-raised
        status, failed = failure_message(e)
    if failed:
        res["status"] = status
        res["error"] = failed
        trainer.reset()
        free_memory()
    else:
        dt = res["time_s"]
        res["samples_per_s"] = res["samples"] / dt
        res["real_tokens_per_s"] = res["real"] / dt
        res["pop_samples_per_s"] = res["real_tokens_per_s"] / ctx["mean_real_tokens"]
        if packed:
            res["padded"] = res["real"]                  # a packed row computes real tokens only
        res["pad_fraction"] = 1 - res["real"] / res["padded"]
        res["mfu"] = mfu(ctx["matmul_params"], res["real_tokens_per_s"], ctx["peak_flops"])
        # The untimed steps' wall time over what as many timed steps take: a compiled row's compilation (a
        # little high: the probe is the epoch's longest batch)
        untimed = res["warmup_steps"] + (probe is not None)
        res["untimed_over_steady_s"] = res["probe_s"] + res["warmup_s"] - untimed * dt / max(res["steps"], 1)
    mem = peak_mem_gb(device)
    if mem is not None:
        res["peak_mem_gb"] = mem
    if not failed and resident_mem_gb(device) is not None:
        res["resident_mem_gb"] = resident_mem_gb(device)
    set_gradient_checkpointing(trainer.model, False)
    trainer.model.packing = False
    res["wall_s"] = time.perf_counter() - t_start       # probe, warmup (compilation) and timed steps
    log(f"  {name}: " + (f"{res['pop_samples_per_s']:.2f} samples/s, {res['real_tokens_per_s']:.0f} tok/s, "
                         f"MFU {100 * res['mfu']:.1f}%, pad {100 * res['pad_fraction']:.0f}%"
                         if res["status"] == "ok" else res["error"])
        + (f", peak {res['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in res else ""))
    return res


def plan_batches(lengths: np.ndarray, batch_size: int, seed: int, grouped: bool,
                 max_tokens: int | None = None, overhead: int = 0, packed: bool = False) -> list[list[int]]:
    """Epoch 0 of training's plan (data.plan_epoch): fixed batches, or cut by a token budget (padded or packed)."""
    from data import plan_epoch
    return plan_epoch(lengths, batch_size, seed, 0, grouped, max_tokens=max_tokens, overhead=overhead, packed=packed)


def longest(plan: list[list[int]], seq_lens: np.ndarray, packed: bool = False) -> list[int]:
    """The batch of the plan with the most tokens computed (padded B x max L, or packed sum L): the memory
    high-water mark of an epoch."""
    return max(plan, key=lambda b: int(seq_lens[b].sum()) if packed else len(b) * int(seq_lens[b].max()))


def packing_check(model, synth: Synth, specs: list[Spec], device: torch.device, n: int = 6,
                  compile_backend: str = "none") -> dict:
    """The packed path's loss and trainable-parameter gradients against the padded path's on one batch of n
    samples, on this device and dtype (on the GPU: the varlen flash kernel against SDPA over padded rows).
    The noise floor: the same padded batch, padded on the left instead of the right (same maths, other
    kernels' rounding) -- in bf16 through 32 random layers the gradients differ visibly even there."""
    from signllava import kernels
    from signllava.kernels import varlen_available
    from training import to_device
    out = {}
    runs = [("right", "right", False), ("left", "left", False), ("packed", "right", True)]
    compiled = compile_backend != "none"
    for name, side, packed in runs + ([("compiled", "right", True)] if compiled else []):
        if name == "compiled":
            kernels.compile_decoder_layers(base_llm(model), compile_backend)
        batch = to_device({k: v for k, v in collate(synth, specs, list(range(n)), side).items() if k != "meta"}, device)
        model.packing = packed
        model.zero_grad(set_to_none=True)
        loss_sum, cnt = model(**batch)
        (loss_sum / cnt).backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])
        out[name] = (loss_sum.item() / cnt.item(), grads)
    if compiled:
        kernels.uncompile_decoder_layers(base_llm(model))
        torch._dynamo.reset()
    model.packing = False
    model.zero_grad(set_to_none=True)
    lu, gu = out["right"]

    def rel(name):
        l, g = out[name]
        return abs(l - lu) / abs(lu), float((g - gu).norm() / gu.norm().clamp_min(1e-30))
    res = {"samples": n, "loss_padded": lu, "loss_packed": out["packed"][0],
           "kernel": "varlen flash" if varlen_available(device) else "SDPA per sample"}
    res["loss_rel_diff"], res["grad_rel_diff"] = rel("packed")
    res["noise_loss_rel_diff"], res["noise_grad_rel_diff"] = rel("left")
    if compiled:      # --compile_layers' packed path against the eager packed path
        res["compiled_loss_rel_diff"], res["compiled_grad_rel_diff"] = rel("compiled")
        log(f"compiled layers vs padded: loss rel diff {res['compiled_loss_rel_diff']:.1e}, gradient rel diff "
            f"{res['compiled_grad_rel_diff']:.1e}")
    log(f"packing check ({res['kernel']}): loss rel diff {res['loss_rel_diff']:.1e}, gradient rel diff "
        f"{res['grad_rel_diff']:.1e}; padded left vs right (noise floor): {res['noise_loss_rel_diff']:.1e}, "
        f"{res['noise_grad_rel_diff']:.1e}")
    return res


class PackedRows:
    """Times token-budget rows of one section into `results`: the plan, probe and batches of training's
    --max_tokens_per_batch N (padded or packed), shared by bench_training and bench_fp8."""

    def __init__(self, section: str, trainer: "Trainer", synth: Synth, specs: list[Spec], args, device: torch.device,
                 ctx: dict, results: list[dict], step=None):
        from training import prompt_tokens
        self.section, self.trainer, self.synth, self.specs, self.args = section, trainer, synth, specs, args
        self.device, self.ctx, self.results, self.step = device, ctx, results, step
        self.lengths = np.asarray([Synth.approx_length(s) for s in specs])
        self.seq_lens = np.asarray([synth.seq_len(s) for s in specs])
        self.overhead = prompt_tokens(synth.builder, len(synth.modalities))
        self.pin = device.type == "cuda"

    def batches(self, plan: list[list[int]]) -> list[dict]:
        return [collate(self.synth, self.specs, b, pin=self.pin) for b in plan]

    def token_budget(self, budget: int, gc_on: bool, label: str, packed: bool = False, role: str = "ours",
                     note: str = "") -> dict:
        args = self.args
        plan = plan_batches(self.lengths, 0, args.seed, True, budget, self.overhead, packed)
        probe = collate(self.synth, self.specs, longest(plan, self.seq_lens, packed), pin=self.pin)
        sizes_ = [len(b) for b in plan]
        tag = "GC" if gc_on else "noGC"
        kind = "packed token budget" if packed else "token budget"
        log(f"{self.section}: {label} {kind} {budget} (batches of {min(sizes_)}-{max(sizes_)}), {tag}{note}")
        r = run_config(self.trainer, f"{label} {role}: {kind} {budget} {tag}{note}", role=role, batch_size=0,
                       gc_on=gc_on, grouped=True, batches=self.batches(plan[:args.warmup + args.steps]), probe=probe,
                       warmup=args.warmup, device=self.device, ctx=self.ctx, step=self.step, packed=packed,
                       budget_s=args.config_budget_s)
        r["max_tokens"], r["batch_size_range"] = budget, [min(sizes_), max(sizes_)]
        self.results.append(r)
        return r


def bench_training(section: str, model, synth: Synth, specs: list[Spec], args, device: torch.device, ctx: dict,
                   lr: float, step_override=None, mem_target_gb: float | None = None) -> list[dict]:
    """(a) reference style, (b) ours (length-grouped, largest batch that fits, without then with
    checkpointing), (c) ours without grouping, (d) ours with a token budget instead of a fixed batch
    (data.plan_epoch(max_tokens=) as --max_tokens_per_batch, no checkpointing, the budget = padded tokens of the
    largest batch that fitted without checkpointing)."""
    trainer = Trainer(model, lr, device)
    step = step_override(trainer) if step_override else None
    lengths = np.asarray([Synth.approx_length(s) for s in specs])
    seq_lens = np.asarray([synth.seq_len(s) for s in specs])
    pin = device.type == "cuda"
    mk = lambda plan: [collate(synth, specs, b, pin=pin) for b in plan]       # noqa: E731
    run = lambda *a, **k: run_config(*a, budget_s=args.config_budget_s, **k)  # noqa: E731
    results = []

    log(f"{section}: (a) reference style, batch 1 + gradient checkpointing, {args.ref_steps} steps")
    plan = plan_batches(lengths, 1, args.seed, False)[:args.warmup + args.ref_steps]
    results.append(run(trainer, "(a) ref: bs1 GC", role="baseline", batch_size=1, gc_on=True, grouped=False,
                              batches=mk(plan), probe=None, warmup=args.warmup, device=device, ctx=ctx, step=step))

    best = None                         # fastest fixed-batch (b): what (c) ablates and (d)'s budget comes from
    sizes = sorted(set(args.batch_sizes), reverse=True)
    for gc_on in (False, True):
        if gc_on and best is not None and best["batch_size"] == sizes[0]:
            break                       # the largest batch already fits without checkpointing
        for bs in sizes:
            plan = plan_batches(lengths, bs, args.seed, True)
            probe = collate(synth, specs, longest(plan, seq_lens), pin=pin)
            log(f"{section}: (b) ours, grouped bs{bs} {'GC' if gc_on else 'no GC'}, {args.steps} steps")
            r = run(trainer, f"(b) ours: grouped bs{bs} {'GC' if gc_on else 'noGC'}", role="ours",
                           batch_size=bs, gc_on=gc_on, grouped=True, batches=mk(plan[:args.warmup + args.steps]),
                           probe=probe, warmup=args.warmup, device=device, ctx=ctx, step=step)
            del probe
            results.append(r)
            if r["status"] == "ok":
                if best is None or r["pop_samples_per_s"] > best["pop_samples_per_s"]:
                    best = r
                break
    token_budget = PackedRows(section, trainer, synth, specs, args, device, ctx, results, step).token_budget

    no_gc = [r for r in results if r["role"] == "ours" and not r["gradient_checkpointing"] and r["status"] == "ok"]
    if args.token_budget and no_gc and not out_of_time(args, f"{section} (d) token budget", results):
        token_budget(no_gc[0]["probe_tokens"], False, "(d)")
    if args.packing and no_gc and not out_of_time(args, f"{section} (f) packed", results):
        budget = no_gc[0]["probe_tokens"]
        r = token_budget(budget, False, "(f)", packed=True)
        total_gb = torch.cuda.get_device_properties(device).total_memory / 2**30 if device.type == "cuda" else None
        if (r["status"] == "ok" and total_gb and r.get("peak_mem_gb", total_gb) < 0.7 * total_gb
                and not out_of_time(args, f"{section} (f) packed, larger budget", results)):
            token_budget(int(1.5 * budget), False, "(f)", packed=True)

    fast_f = max((r for r in results if r["name"].startswith("(f)") and r["status"] == "ok"),
                 key=lambda r: r["pop_samples_per_s"], default=None)
    backend = resolved_compile_backend(args, device)
    compiled_row = None                 # (g): what sizes the memory target's compiled rows
    if fast_f and backend != "none" and not out_of_time(args, f"{section} (g) packed, compiled layers", results):
        with compiled_layers(section, model, backend, results):
            compiled_row = token_budget(fast_f["max_tokens"], False, "(g)", packed=True, note=", compiled layers")
    # The memory target's likeliest best, so not subject to --time_limit_s (it compiled in ~30 s on the H200)
    if fast_f and backend != "none" and mem_target_gb and args.memory_budget < 1:
        with lora_dropout_off(model), compiled_layers(section, model, backend, results, args.memory_budget):
            note = f", compiled layers, activation memory budget {args.memory_budget:g}, LoRA dropout 0"
            fit_memory_budgeted(results, mem_target_gb, int(seq_lens.max()),
                                lambda b: token_budget(b, False, "(e)", packed=True, note=note), compiled_row,
                                args.memory_budget)

    def fixed_gc(bs: int) -> dict:
        plan = plan_batches(lengths, bs, args.seed, True)
        probe = collate(synth, specs, longest(plan, seq_lens), pin=pin)
        log(f"{section}: (e) grouped bs{bs} GC (for the memory target)")
        r = run(trainer, f"(e) ours: grouped bs{bs} GC", role="ours", batch_size=bs, gc_on=True, grouped=True,
                       batches=mk(plan[:args.warmup + args.steps]), probe=probe, warmup=args.warmup, device=device,
                       ctx=ctx, step=step)
        results.append(r)
        return r

    def grouped_tokens(bs: int) -> int:
        plan = plan_batches(lengths, bs, args.seed, True)
        return len(longest(plan, seq_lens)) * int(seq_lens[longest(plan, seq_lens)].max())

    if mem_target_gb:
        fit_memory(section, results, mem_target_gb, args, sizes,
                   lambda b: token_budget(b, True, "(e)", packed=args.packing), fixed_gc, grouped_tokens)
    # Ablations last: past --time_limit_s they are what is dropped, not the targets above.
    if best is not None and args.ablation and not out_of_time(args, f"{section} (c) ablation", results):
        bs, gc_on = best["batch_size"], best["gradient_checkpointing"]
        plan = plan_batches(lengths, bs, args.seed, False)
        probe = collate(synth, specs, longest(plan, seq_lens), pin=pin)
        log(f"{section}: (c) ours without grouping, bs{bs} {'GC' if gc_on else 'no GC'}")
        results.append(run(trainer, f"(c) ungrouped bs{bs} {'GC' if gc_on else 'noGC'}", role="ablation",
                                  batch_size=bs, gc_on=gc_on, grouped=False,
                                  batches=mk(plan[:args.warmup + args.steps]), probe=probe, warmup=args.warmup,
                                  device=device, ctx=ctx, step=step))
    # Ablation of fused_ops at the first (f) budget: the stock norm needs more memory, so not the larger one.
    first_f = next((r for r in results if r["name"].startswith("(f)")), None)
    if (first_f and first_f["status"] == "ok" and args.ablation
            and not out_of_time(args, f"{section} (c) packed, stock norm", results)):
        from signllava import kernels
        kernels.unfuse_rms_norm(model)       # transformers' own RMSNorm forward
        try:
            token_budget(first_f["max_tokens"], False, "(c)", packed=True, role="ablation", note=", stock RMSNorm")
        finally:
            kernels.fuse_rms_norm(base_llm(model))

    mark_best(results, mem_target_gb)
    del trainer
    free_memory()
    return results


# ------------------------------------------------------------------------------------------ FP8
def fp8_wanted(args, device: torch.device) -> bool:
    """--fp8 auto: the FP8 rows where the device has FP8 matmuls; on: there, or emulated (the CPU); off: never."""
    from signllava.fp8 import fp8_matmul_available
    return args.fp8 == "on" or (args.fp8 == "auto" and fp8_matmul_available(device))


def fp8_check(model, synth: Synth, specs: list[Spec], device: torch.device, n: int = 6) -> dict:
    """One packed batch's loss and trainable gradients with the frozen linears in bf16, then again after
    fp8.convert_frozen_linears (in place: the model stays FP8, its bf16 weights freed): what --fp8 changes.
    packing_check's padded left vs right is bf16's own noise floor on the same kind of batch."""
    from signllava.fp8 import convert_frozen_linears
    from training import to_device
    batch = to_device({k: v for k, v in collate(synth, specs, list(range(n))).items() if k != "meta"}, device)
    model.packing = True
    out, layers = [], 0
    for convert in (False, True):
        if convert:
            layers = convert_frozen_linears(model.llm, device)
        model.zero_grad(set_to_none=True)
        loss_sum, cnt = model(**batch)
        (loss_sum / cnt).backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad and p.grad is not None])
        out.append((loss_sum.item() / cnt.item(), grads))
    model.packing = False
    model.zero_grad(set_to_none=True)
    (l16, g16), (l8, g8) = out
    res = {"samples": n, "layers": layers, "loss_bf16": l16, "loss_fp8": l8, "loss_rel_diff": abs(l8 - l16) / abs(l16),
           "grad_rel_diff": float((g8 - g16).norm() / g16.norm().clamp_min(1e-30))}
    log(f"FP8 check ({layers} linear layers): loss {l16:.5f} -> {l8:.5f} (rel diff {res['loss_rel_diff']:.1e}), "
        f"gradient rel diff {res['grad_rel_diff']:.1e}")
    return res


def bench_fp8(section: str, model, synth: Synth, specs: list[Spec], args, device: torch.device, ctx: dict, lr: float,
              base: dict | None, results: list[dict], mem_target_gb: float | None = None, on_row=None,
              step_override=None) -> list[dict]:
    """(h): `model` with its frozen linears already in FP8, packed, compiled as (g) is, at the token budget of
    `base`, the bf16 row it is compared with (stage 1's (g); for LoRA on an FP8 base, QLoRA's (g)): vs_base =
    its samples/s over base's, measured in this run. Then, for mem_target_gb, compiled rows under the
    activation memory budget with LoRA dropout 0, sized from (h) as QLoRA's (e) are from its (g)
    (fit_memory_budgeted). Role "fp8": the bf16 picks ("ours", the loader's comparison) stay as they were. Rows go into `results` one by one
    (`on_row` after each, e.g. saving the JSON); `step_override` as bench_training's."""
    if base is None or base.get("status") != "ok" or not base.get("max_tokens"):
        results.append({"name": f"(h) {section} FP8", "role": "fp8", "status": "skipped",
                        "error": "no bf16 token-budget row to compare with"})
        return results
    start = len(results)                   # results may hold the section's bf16 rows: marks go to ours only
    trainer = Trainer(model, lr, device)
    rows = PackedRows(section, trainer, synth, specs, args, device, ctx, results,
                      step_override(trainer) if step_override else None)
    backend = resolved_compile_backend(args, device)
    compiled = backend != "none"

    def timed(budget: int, note: str) -> dict:
        r = rows.token_budget(budget, False, "(h)", packed=True, role="fp8", note=note)
        if r["status"] == "ok":
            r["base"], r["vs_base"] = base["name"], r["pop_samples_per_s"] / base["pop_samples_per_s"]
            log(f"  FP8 / {base['name']}: {r['vs_base']:.2f}x")
        if on_row:
            on_row()
        return r

    with compiled_layers(section, model, backend, results, role="fp8") if compiled else contextlib.nullcontext():
        timed(base["max_tokens"], ", compiled layers, FP8" if compiled else ", FP8")
    if compiled and results[start]["status"] == "error":   # the compiler failed on the FP8 layers: eager FP8 times
        timed(base["max_tokens"], ", FP8, eager layers")
    if mem_target_gb and compiled and args.memory_budget < 1:
        note = f", compiled layers, FP8, activation memory budget {args.memory_budget:g}, LoRA dropout 0"
        with lora_dropout_off(model), compiled_layers(section, model, backend, results, args.memory_budget, "fp8"):
            fit_memory_budgeted(results, mem_target_gb, int(rows.seq_lens.max()), lambda b: timed(b, note),
                                results[start], args.memory_budget)
    mark_best(results[start:], mem_target_gb, role="fp8")
    del trainer, rows
    free_memory()
    return results


def bf16_base_row(configs: list[dict]) -> dict | None:
    """The bf16 row FP8 is compared with: the compiled packed (g), else the fastest packed (f)."""
    ok = [c for c in configs if c["status"] == "ok" and c.get("packed") and c["role"] == "ours"]
    g = [c for c in ok if c["name"].startswith("(g)")]
    return max(g or [c for c in ok if c["name"].startswith("(f)")], key=lambda c: c["pop_samples_per_s"], default=None)


def resolved_compile_backend(args, device: torch.device) -> str:
    """--compile_backend, or its default for the device."""
    return args.compile_backend or ("inductor" if device.type == "cuda" else "none")


@contextlib.contextmanager
def compiled_layers(section: str, model, backend: str, results: list[dict], activation_memory_budget: float = 1.0,
                    role: str = "ours"):
    """The rows timed inside run with training's --compile_layers (kernels.compile_decoder_layers) and
    --activation_memory_budget; the first steps of each new graph pay its compilation (warmup). A compile
    failure is recorded as a row, not raised; the layers are eager again afterwards. The compiled rows note
    dynamo's graph count and graph breaks."""
    from signllava import kernels
    from torch._dynamo.utils import counters
    llm = base_llm(model)
    kernels.compile_decoder_layers(llm, backend, activation_memory_budget)
    counters.clear()
    before = compile_seconds()
    first = len(results)
    try:
        yield
    except Exception as e:         # noqa: BLE001 -- what failed to compile is a result of the run
        results.append({"name": f"(g) {section} compiled layers", "role": role, "status": "error",
                        "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}" if str(e) else type(e).__name__})
        log(f"  compiled layers failed: {results[-1]['error']}")
    finally:
        dynamo = {"unique_graphs": int(counters["stats"]["unique_graphs"]),
                  "graph_breaks": int(sum(counters["graph_break"].values())),
                  "compile_s": {k: round(v - before.get(k, 0.0), 2) for k, v in compile_seconds().items()
                                if v - before.get(k, 0.0) >= 0.5}}
        for r in results[first:]:
            r["dynamo"] = dynamo           # cumulative over the compiled rows, in their order
        kernels.uncompile_decoder_layers(llm)
        torch._dynamo.reset()


def compile_seconds() -> dict[str, float]:
    """The compiler's own timers so far, seconds by phase (dynamo's compilation_time_metrics: the whole dynamo
    compile, bytecode tracing, AOT autograd, inductor's forward and backward graphs, a restarted trace)."""
    from torch._dynamo.utils import compilation_time_metrics
    return {k: float(sum(v)) for k, v in compilation_time_metrics.items()}


def fits(r: dict, limit_gb: float) -> bool:
    return r["status"] == "ok" and r.get("peak_mem_gb") is not None and r["peak_mem_gb"] <= limit_gb


def mark_best(results: list[dict], mem_target_gb: float | None = None, role: str = "ours"):
    """best: the fastest candidate of `role` that ran ("ours": (b), (d), (e), (f), (g)); best_mem: the fastest
    whose peak memory is within mem_target_gb."""
    ok = [r for r in results if r["role"] == role and r["status"] == "ok"]
    if ok:
        max(ok, key=lambda r: r["pop_samples_per_s"])["best"] = True
    fit = [r for r in ok if mem_target_gb and fits(r, mem_target_gb)]
    if fit:
        max(fit, key=lambda r: r["pop_samples_per_s"])["best_mem"] = True


def linear_mem(results: list[dict]) -> tuple[float, float] | None:
    """(intercept GiB, GiB per padded token) of peak memory with checkpointing, eager layers, through the
    fewest and most tokens in a batch: the memory held between steps (no tokens; the least any timed row
    measured) where the device counts it, else the batch-1 reference, and the largest checkpointed run;
    None if < 2 points."""
    pts = {(r["max_batch_tokens"], r["peak_mem_gb"]) for r in results
           if r["status"] == "ok" and r["gradient_checkpointing"] and "dynamo" not in r
           and r.get("peak_mem_gb") is not None and r.get("max_batch_tokens")}
    held = held_mem_gb(results)
    if held is not None:
        pts.add((0, held))
    pts = sorted(pts)
    if len(pts) < 2 or pts[-1][0] <= pts[0][0] or pts[-1][1] <= pts[0][1]:
        return None
    (t0, m0), (t1, m1) = pts[0], pts[-1]
    slope = (m1 - m0) / (t1 - t0)
    return m0 - slope * t0, slope


def held_mem_gb(results: list[dict]) -> float | None:
    """The least memory held between steps (weights, gradients, optimizer state) that a timed row measured."""
    held = [r["resident_mem_gb"] for r in results if r.get("resident_mem_gb") is not None]
    return min(held) if held else None


def tokens_within(intercept_gb: float, gb_per_token: float, limit_gb: float) -> int:
    """Batch tokens at which a linear peak-memory model reaches limit_gb."""
    return int((limit_gb - intercept_gb) / gb_per_token)


@contextlib.contextmanager
def lora_dropout_off(model):
    """LoRA's dropout at p=0 for the rows inside (an activation memory budget below 1 needs it: kernels)."""
    from signllava.kernels import active_dropouts
    dropouts = [(m, m.p) for m in active_dropouts(model)]
    for m, _ in dropouts:
        m.p = 0.0
    try:
        yield
    finally:
        for m, p in dropouts:
            m.p = p


def fit_memory_budgeted(results: list[dict], limit_gb: float, longest_tokens: int, run_budget,
                        basis: dict | None = None, memory_budget: float = 1.0, margin: float = 0.9,
                        band: float = 0.8):
    """(e) under an activation memory budget, no checkpointing, compiled anew, sized directly: the memory a
    token costs in `basis` (the section's compiled row without a budget: (g), or FP8's (h); its peak over the
    memory held between steps, per token of its largest batch) times memory_budget predicts the packed budget
    that fills margin x limit_gb (on the H200: QLoRA 1.6 MB a token at 0.25 against 6.8 unbudgeted, LoRA on FP8
    1.65 against 6.85). If that row's own peak lands outside [band, 1] x limit_gb, its per-token cost re-aims
    one more row (the compiled graph is dynamic: no recompilation). Without a usable basis the first row is
    the longest sample's packed budget, the smallest there is, and its cost aims the second. Never below the
    longest sample, which must fit in a batch."""
    held = held_mem_gb(results)
    if held is None:
        return

    def per_token(r: dict) -> float | None:
        ok = r is not None and r["status"] == "ok" and r.get("peak_mem_gb") and r.get("max_batch_tokens")
        return (r["peak_mem_gb"] - held) / r["max_batch_tokens"] if ok and r["peak_mem_gb"] > held else None

    def aimed(cost: float) -> int:
        return max(longest_tokens, tokens_within(held, cost, margin * limit_gb))

    cost = per_token(basis)
    budget = aimed(cost * memory_budget) if cost else longest_tokens
    first = run_budget(budget)
    cost = per_token(first)
    if cost is None or band * limit_gb <= first["peak_mem_gb"] <= limit_gb:
        return
    again = aimed(cost)
    if abs(again - budget) > 0.05 * budget:
        run_budget(again)


def fit_memory(section: str, results: list[dict], limit_gb: float, args, sizes: list[int], run_budget_gc,
               run_fixed_gc, grouped_tokens, margin: float = 0.9, max_tries: int = 2):
    """Unless an "ours" candidate already peaked within limit_gb: up to max_tries more configurations with
    checkpointing, until one fits -- a token budget sized by a linear fit of checkpointed peak memory to padded
    tokens (aimed at margin x limit), then the largest grouped fixed batch whose estimate fits (or the smallest)."""
    ours = [r for r in results if r["role"] == "ours"]
    if any(fits(r, limit_gb) for r in ours):
        return
    if not any(r.get("peak_mem_gb") is not None for r in results):
        log(f"{section}: no peak-memory count on this device; no <= {limit_gb:g} GiB configuration sought")
        return
    tried = {r["batch_size"] for r in ours if r.get("gradient_checkpointing")}
    for k in range(max_tries):
        # The first try is the target's own row, whatever the time; a second one only within --time_limit_s.
        if k and out_of_time(args, f"{section} (e) <= {limit_gb:g} GiB", results):
            return
        fit = linear_mem(results)
        r = None
        if k == 0 and fit is not None and args.token_budget:
            budget = tokens_within(*fit, margin * limit_gb)
            if budget > 0:
                r = run_budget_gc(budget)
        if r is None:
            left = [bs for bs in sizes if bs not in tried]
            if not left:
                return
            ok = [bs for bs in left if fit is None or fit[0] + fit[1] * grouped_tokens(bs) <= margin * limit_gb]
            bs = ok[0] if ok else left[-1]
            tried.add(bs)
            r = run_fixed_gc(bs)
        if fits(r, limit_gb):
            return


# ------------------------------------------------------------------------------------------ generation
def end_timing(res: dict, failed: str | None, device: torch.device):
    """Close a timed generation row: mark an OOM, record peak memory, free the cache."""
    if failed:
        res["status"], res["error"] = "OOM", failed
    if device.type == "cuda":
        res["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
    free_memory()


@torch.inference_mode()
def generate_ids_plain_hf(tr, items: list[dict], num_beams: int = 5, max_new_tokens: int = 64) -> list[list[int]]:
    """The previous generation path (the ablation): plain HF generate() on the left-padded batch's embeddings,
    which repeats every prompt num_beams times and prefills each copy (test_generate.hf_generate_ids)."""
    if not items:
        return []
    emb, mask = tr.embed_batch(items)
    eot = tr.ids["eot"]
    out = tr.model.llm.generate(inputs_embeds=emb, attention_mask=mask, num_beams=num_beams, do_sample=False,
                                max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=tr.ids["pad"],
                                use_cache=True)
    return [row[:row.index(eot)] if eot in row else row for row in out.tolist()]


def bench_generation(tr, synth: Synth, specs: list[Spec], args, device: torch.device) -> dict:
    """Translator.generate_ids over length-sorted batches (generate_split's order) vs one clip at a time,
    timed on a systematic sample of the batches; projected to all len(specs) clips."""
    n = len(specs)
    order = sorted(range(n), key=lambda i: -synth.prompt_len(specs[i]))
    kw = dict(num_beams=args.num_beams, max_new_tokens=args.max_new_tokens)
    out = {"clips": n, "batch_size": args.gen_batch_size, "num_beams": args.num_beams,
           "max_new_tokens": args.max_new_tokens,
           "mean_prompt_tokens": float(np.mean([synth.prompt_len(s) for s in specs])),
           "max_prompt_tokens": max(synth.prompt_len(s) for s in specs)}

    def plan(bs):
        batches = [order[k:k + bs] for k in range(0, n, bs)]
        picked = systematic(len(batches), args.gen_batches)
        return batches, random.Random(args.seed).sample(picked, len(picked))   # a budget-cut prefix stays random

    def items_of(batch):
        return [synth.item(i, specs[i], generation=True) for i in batch]

    def run_batched(name, fn, budget):
        """The longest batch once as OOM probe and warmup (untimed), then a systematic sample of the batches
        in random order until the budget is spent; mean time per timed batch x number of batches projects the
        total. On OOM: recorded, then the same at half the batch size (down to 4)."""
        bs, ooms = args.gen_batch_size, []
        while True:
            res, outputs = _run_batched_at(name, fn, budget, bs)
            if res["status"] != "OOM" or bs <= 4:
                break
            ooms.append({"batch_size": bs, "error": res["error"]})
            bs //= 2
            log(f"  {name}: retrying at batch size {bs}")
        if ooms:
            res["oom_at"] = ooms
        return res, outputs

    def _run_batched_at(name, fn, budget, bs):
        batches, timed_order = plan(bs)
        res = {"name": name + (f" bs{bs}" if bs != args.gen_batch_size else ""), "status": "ok", "batch_size": bs,
               "n_batches": len(batches), "sampled_batches": len(timed_order), "batches": 0, "clips": 0,
               "time_s": 0.0, "new_tokens": 0}
        outputs = {}
        failed = None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            t = time.perf_counter()
            fn(items_of(batches[0]), **kw)
            sync(device)
            res["probe_longest_batch_s"] = time.perf_counter() - t
            t_start = time.perf_counter()
            for bi in timed_order:
                if res["batches"] and time.perf_counter() - t_start > budget:
                    res["stopped_by_budget"] = True
                    break
                items = items_of(batches[bi])
                sync(device)
                t = time.perf_counter()
                ids = fn(items, **kw)
                sync(device)
                res["time_s"] += time.perf_counter() - t
                res["batches"] += 1
                res["clips"] += len(items)
                res["new_tokens"] += sum(len(r) for r in ids)
                outputs.update({i: r for i, r in zip(batches[bi], ids)})
        except Exception as e:      # noqa: BLE001
            failed = oom_message(e)
        end_timing(res, failed, device)
        if res["status"] == "ok" and res["batches"]:
            mean_batch = res["time_s"] / res["batches"]
            res["projected_total_s"] = mean_batch * len(batches)
            res["clips_per_s"] = n / res["projected_total_s"]
            log(f"  {res['name']}: {res['clips_per_s']:.2f} clips/s ({res['batches']} of {len(batches)} batches "
                f"timed), projected {res['projected_total_s'] / 60:.1f} min for {n} clips"
                + (f", peak {res['peak_mem_gb']:.1f} GB" if "peak_mem_gb" in res else ""))
        else:
            log(f"  {res['name']}: {res.get('error', 'nothing timed')}")
        res["_timed"] = [batches[bi] for bi in timed_order]
        return res, outputs

    fast = tr.decode_steps
    log(f"generation: batched Translator.generate_ids ({fast} decode steps), bs{args.gen_batch_size}, {args.num_beams} "
        f"beams, {args.max_new_tokens} new tokens, {args.gen_batches} batches of {-(-n // args.gen_batch_size)} timed")
    batched, batched_out = run_batched(f"ours: batched generate_ids, {fast} steps", tr.generate_ids, args.gen_budget_s)
    timed_batches = batched.pop("_timed")
    out["batched"] = batched
    if fast != "eager" and args.gen_eager and not out_of_time(args, "generation eager-steps ablation", out):
        # The same batches with the growing cache stepped from Python (the path before decode_graph.py).
        log("generation: batched, eager decode steps (the growing prompt-shared cache, no CUDA graph)")
        tr.decode_steps = "eager"
        try:
            eager, eager_out = run_batched("batched generate_ids, eager steps", tr.generate_ids, args.gen_budget_s)
        finally:
            tr.decode_steps = fast
        eager.pop("_timed", None)
        common = [i for i in eager_out if i in batched_out]
        # Informative: random weights make near-flat distributions where rounding can flip a beam.
        eager["same_output_as_batched"] = (sum(eager_out[i] == batched_out[i] for i in common) / len(common)
                                           if common else None)
        out["batched_eager"] = eager

    # Clip by clip: clips spread over the timed batches (so over the length range), one generate call each.
    timed_batches = [b for b in timed_batches if any(i in batched_out for i in b)] or timed_batches
    per = max(1, math.ceil(args.gen_serial / len(timed_batches)))
    serial_ids = []
    for b in timed_batches:
        serial_ids += [b[p] for p in systematic(len(b), per)]
    serial_ids = serial_ids[:args.gen_serial]
    log(f"generation: clip by clip, {len(serial_ids)} clips, eager decode steps (the baseline)")
    res = {"name": "clip-by-clip generate_ids, eager steps", "status": "ok", "clips": 0, "time_s": 0.0}
    tr.decode_steps = "eager"
    same = []
    failed = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        tr.generate_ids([synth.item(serial_ids[0], specs[serial_ids[0]], True)], **kw)     # warmup
        t_start = time.perf_counter()
        for i in serial_ids:
            if res["clips"] and time.perf_counter() - t_start > args.gen_budget_s:
                res["stopped_by_budget"] = True
                break
            item = synth.item(i, specs[i], generation=True)
            sync(device)
            t = time.perf_counter()
            ids = tr.generate_ids([item], **kw)[0]
            sync(device)
            res["time_s"] += time.perf_counter() - t
            res["clips"] += 1
            if i in batched_out:
                same.append(ids == batched_out[i])
    except Exception as e:          # noqa: BLE001
        failed = oom_message(e)
    finally:
        tr.decode_steps = fast
    end_timing(res, failed, device)
    if res["status"] == "ok" and res["clips"]:
        res["projected_total_s"] = res["time_s"] / res["clips"] * n
        res["clips_per_s"] = res["clips"] / res["time_s"]
        # Random weights give near-flat distributions, so beams can flip on bf16 rounding differences
        # between batch shapes: informative only, not a correctness check (test_generate.py does that).
        res["same_output_as_batched"] = sum(same) / len(same) if same else None
        log(f"  clip by clip: {res['clips_per_s']:.2f} clips/s, projected {res['projected_total_s'] / 60:.1f} min for {n} clips")
    out["serial"] = res

    if args.plain_hf and not out_of_time(args, "generation plain-HF ablation", out):
        log("generation: batched, plain HF generate (prompt repeated per beam, the previous path)")
        try:
            plain, plain_out = run_batched("plain HF generate, prompt x beams",
                                           lambda items, **k: generate_ids_plain_hf(tr, items, **k), args.gen_budget_s)
        except Exception as e:      # noqa: BLE001 -- an ablation that breaks must not sink the run
            plain, plain_out = {"name": "plain HF generate, prompt x beams", "status": "error",
                                "error": f"{e.__class__.__name__}: {str(e).splitlines()[0][:200]}"}, {}
            log(f"  plain HF: FAILED {plain['error']}")
        plain.pop("_timed", None)
        common = [i for i in plain_out if i in batched_out]
        # Informative: random weights make near-flat distributions where rounding can flip a beam.
        plain["same_output_as_batched"] = (sum(plain_out[i] == batched_out[i] for i in common) / len(common)
                                           if common else None)
        out["plain_hf"] = plain

    return out


# ------------------------------------------------------------------------------------------ loader
def write_dataset(root: Path, synth: Synth, specs: list[Spec], split: str = "train", clips_per_video: int = 10,
                  shards: int = 4) -> Path:
    """The real layout (layout.py): annotation.<split>.json, <m>/metadata_<m>.<split>.json, <m>/<m>.<split>.<shard>.h5
    holding float16 [T, D] per h5[video][clip]."""
    import h5py
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(synth.seed)
    videos: dict[str, list[tuple[int, str]]] = {}
    for i in range(len(specs)):
        v = f"vid{i // clips_per_video:05d}"
        videos.setdefault(v, []).append((i, f"{v}_{i % clips_per_video}"))
    ann = {}
    for v, clips in videos.items():
        ann[v] = {"clip_order": [c for _, c in clips]}
        for i, c in clips:
            words = [rng.choice(WORDS) for _ in range(specs[i].answer)]
            ann[v][c] = {"translation": " ".join(words).capitalize() + ".", "paraphrases": [], "keywords": words[:2]}
    # In place: `root` is the benchmark's own temporary folder (mkdtemp), removed when the section ends.
    (root / f"annotation.{split}.json").write_text(json.dumps(ann))
    shard_of = {v: k % shards for k, v in enumerate(videos)}
    files = {}
    for m in synth.modalities:
        (root / m).mkdir(exist_ok=True)
        (root / m / f"metadata_{m}.{split}.json").write_text(json.dumps(shard_of))
        files[m] = [h5py.File(root / m / f"{m}.{split}.{s}.h5", "w") for s in range(shards)]
    try:
        for v, clips in videos.items():
            for i, c in clips:
                for m, arr in zip(synth.modalities, synth.features(i, specs[i])):
                    files[m][shard_of[v]].require_group(v).create_dataset(c, data=arr)
    finally:
        for fs in files.values():
            for f in fs:
                f.close()
    return root


def bench_loader(synth: Synth, specs: list[Spec], args, device: torch.device, batch_size: int) -> dict:
    from data import Collator, DataOptions, SignDataset, make_loader, plan_epoch
    tmp = Path(tempfile.mkdtemp(prefix="bench_loader_", dir=args.tmp_dir))
    out = {"clips": len(specs), "batch_size": batch_size, "workers": {}, "cpu_count": os.cpu_count()}
    try:
        t = time.perf_counter()
        write_dataset(tmp / "data", synth, specs)
        out["write_s"] = time.perf_counter() - t
        out["bytes"] = sum(p.stat().st_size for p in (tmp / "data").rglob("*.h5"))
        log(f"loader: wrote {len(specs)} clips, {out['bytes'] / 2**30:.2f} GiB of h5 in {out['write_s']:.1f} s")
        ds = SignDataset(tmp / "data", "train", synth.builder, DataOptions(seed=args.seed), train=True)
        lengths = np.asarray([ds.length(i) for i in range(len(ds))])
        plan = plan_epoch(lengths, batch_size, args.seed, 0, True)[:args.loader_batches]
        mine = [[(i, 0) for i in b] for b in plan]
        for w in args.workers:
            # Exactly training.py's loader: make_loader(train_ds, ..., pin_memory=cuda).
            loader = make_loader(ds, mine, Collator(synth.ids["pad"]), w, device.type == "cuda")
            try:
                t0 = time.perf_counter()
                it = iter(loader)
                first = next(it)
                t1 = time.perf_counter()
                n_first, n = len(first["meta"]), 0
                for b in it:
                    n += len(b["meta"])
                t2 = time.perf_counter()
                del it
            except Exception as e:  # noqa: BLE001 -- a loader that fails is a result too
                out["workers"][str(w)] = {"error": f"{e.__class__.__name__}: {str(e).splitlines()[0][:200]}"}
                log(f"  {w} workers: FAILED {out['workers'][str(w)]['error']}")
                continue
            finally:
                del loader
            r = {"first_batch_s": t1 - t0, "samples": n_first + n,
                 "samples_per_s": n / (t2 - t1) if n else None,           # steady state, after the first batch
                 "samples_per_s_with_startup": (n_first + n) / (t2 - t0)}
            out["workers"][str(w)] = r
            log(f"  {w} workers: {r['samples_per_s']:.1f} samples/s steady ({r['samples_per_s_with_startup']:.1f} "
                f"with startup {r['first_batch_s']:.2f} s)")
        ds.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------------ report
def summary_rows(R: dict) -> list[dict]:
    rows = []
    for sec in ("stage1", "qlora", "lora_fp8"):
        cfgs = R.get(sec, {}).get("configs", [])
        # LoRA on an FP8 base is stage 2 beside QLoRA: its ratio is to QLoRA's batch-1 reference
        refs = R.get("qlora" if sec == "lora_fp8" else sec, {}).get("configs", [])
        base = next((c for c in refs if c["role"] == "baseline" and c["status"] == "ok"), None)
        for c in cfgs:
            ok = c["status"] == "ok"
            rows.append({"section": sec, "config": c["name"] + (" *" if c.get("best") else ""),
                         "metric": "samples/s", "value": c.get("pop_samples_per_s"),
                         "tokens_per_s": c.get("real_tokens_per_s"), "mfu": c.get("mfu"), "mem_gb": c.get("peak_mem_gb"),
                         "status": c["status"], "vs_base": c.get("vs_base"),
                         "ratio": c["pop_samples_per_s"] / base["pop_samples_per_s"] if ok and base else None})
        lim = R.get(sec, {}).get("mem_target_gb")
        if lim:
            c = next((c for c in cfgs if c.get("best_mem")), None)
            rows.append({"section": sec, "config": f"ours <= {lim:g} GiB: " + (c["name"] if c else "none fitted"),
                         "metric": "samples/s", "value": c and c["pop_samples_per_s"],
                         "tokens_per_s": c and c.get("real_tokens_per_s"), "mfu": c and c.get("mfu"),
                         "mem_gb": c and c.get("peak_mem_gb"), "status": "ok" if c else "none",
                         "ratio": c["pop_samples_per_s"] / base["pop_samples_per_s"] if c and base else None})
    g = R.get("generation")
    if g:
        base = g.get("serial", {})
        bv = base.get("clips_per_s")
        for key in ("serial", "plain_hf", "batched_eager", "batched"):
            c = g.get(key)
            if not c:
                continue
            v = c.get("clips_per_s")
            label = c["name"] + (f" [{g['clips']}: {c['projected_total_s'] / 60:.1f} min]" if v else "")
            rows.append({"section": "generation", "config": label, "metric": "clips/s", "value": v,
                         "projected_min": c.get("projected_total_s", 0) / 60 if v else None, "status": c["status"],
                         "ratio": v / bv if v and bv else None, "mem_gb": c.get("peak_mem_gb")})
    ld = R.get("loader")
    if ld:
        best1 = next((c for c in R.get("stage1", {}).get("configs", []) if c.get("best")), None)
        gpu = best1["pop_samples_per_s"] if best1 else None
        for w, r in ld["workers"].items():
            v = r.get("samples_per_s")
            rows.append({"section": "loader", "config": f"{w} workers (vs GPU stage-1 ours)", "metric": "samples/s",
                         "value": v, "status": "error" if "error" in r else "ok",
                         "ratio": v / gpu if v and gpu else None})
    return rows


def format_table(rows: list[dict]) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)
    head = (f"{'section':<11}{'configuration':<52}{'metric':>10}{'value':>10}{'tok/s':>10}{'MFU':>7}{'mem GB':>8}"
            f"{'ratio':>8}{'vs bf16':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        val = r["status"] if r["status"] != "ok" else f(r["value"], ".2f")
        lines.append(f"{r['section']:<11}{r['config'][:51]:<52}{r['metric']:>10}{val:>10}"
                     f"{f(r.get('tokens_per_s'), '.0f'):>10}{f(r['mfu'] * 100 if r.get('mfu') is not None else None, '.1f'):>7}"
                     f"{f(r.get('mem_gb'), '.1f'):>8}{f(r['ratio'], '.2f'):>8}{f(r.get('vs_base'), '.2f'):>8}")
    lines.append("ratio: to the section's baseline in this run -- (a) ref bs1 GC; clip-by-clip; for the loader, "
                 "to the GPU's stage-1 ours samples/s (>1 keeps up). * = ours: the fastest config that ran among (b) grouped "
                 "fixed batches, (d)/(e) token budgets (training's --max_tokens_per_batch <budget>) and (e) extra GC "
                 "configs; 'ours <= N GiB' = the fastest of those peaking within N GiB (cuda only). (h) = FP8 (--fp8); "
                 "vs bf16: its samples/s over its bf16 row's in this run (stage 1's (g); lora_fp8: QLoRA's (g)), and "
                 "lora_fp8's ratio is to QLoRA's (a).")
    return "\n".join(lines)


def device_slug(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu-{platform.machine()}"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def environment(device: torch.device) -> dict:
    import transformers
    env = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
           "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "python": platform.python_version(), "cpu_count": os.cpu_count(), "host": platform.node()}
    for mod in ("peft", "bitsandbytes", "h5py"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:       # noqa: BLE001
            env[mod] = f"unavailable ({e.__class__.__name__})"
    try:
        env["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                                    text=True, timeout=10).stdout.strip() or None
    except Exception:                # noqa: BLE001
        env["git"] = None
    return env


# ------------------------------------------------------------------------------------------ main
def mem_target(group, flag: str, what: str, default_gb: float = 24):
    """A section's memory-target flag: GiB (a 24 GB card by default), 0 for none; peaks are counted on cuda only."""
    group.add_argument(flag, type=float, default=default_gb, help=f"{what} (0: off; cuda only)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]      # noqa: E731
    p.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: model.compute_dtype (bf16 on cuda, fp32 on cpu)")
    p.add_argument("--quick", action="store_true", help="fewer steps, batches and clips (unset flags only)")
    p.add_argument("--only", default="stage1,gen,qlora,loader",
                   help="comma-separated sections to run: stage1, gen, qlora, loader")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("samples")
    g.add_argument("--samples", type=int, default=2000, help="training population (batches are planned over it)")
    g.add_argument("--frames", type=ints, default=[50, 600], help="min,max frames T per clip")
    g.add_argument("--frames_dist", choices=["loguniform", "uniform"], default="loguniform")
    g.add_argument("--answer", type=ints, default=[20, 80], help="min,max answer tokens")
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, help="timed steps of each batched config (default 10, quick 5)")
    g.add_argument("--ref_steps", type=int, help="timed steps of the batch-1 reference (default 16, quick 12)")
    g.add_argument("--warmup", type=int, help="untimed steps before timing (default 2, quick 1)")
    g.add_argument("--batch_sizes", type=ints, default=[16, 8, 4, 2], help="candidates for ours, largest first")
    g.add_argument("--no_ablation", dest="ablation", action="store_false", help="skip (c) ours without grouping")
    g.add_argument("--no_packing", dest="packing", action="store_false", help="skip (f) packed rows; (e) padded")
    g.add_argument("--compile_backend",
                   help="(g): the fastest (f) with training's --compile_layers BACKEND (default: inductor on a GPU, "
                        "none on a CPU, where compiling takes minutes; none: skip (g); aot_eager only traces)")
    g.add_argument("--no_token_budget", dest="token_budget", action="store_false",
                   help="skip (d), token-budget batches (--max_tokens_per_batch, data.plan_epoch(max_tokens=))")
    mem_target(g, "--qlora_mem_gb", "QLoRA: also report the fastest ours config peaking within this many GiB, timing "
               "(e) configs for it: compiled under --memory_budget, then up to two eager checkpointed ones if none "
               "fitted")
    g.add_argument("--memory_budget", type=float, default=0.25,
                   help="QLoRA's memory target: the activation memory budget of its compiled (e) rows without "
                        "checkpointing and with LoRA dropout 0 (training's --activation_memory_budget); 1: none")
    g.add_argument("--config_budget_s", type=float, default=10,
                   help="timed seconds per training configuration: steps past it are dropped (at least 3 run)")
    g = p.add_argument_group("generation")
    g.add_argument("--gen_clips", type=int, default=1741, help="clips to project to (How2Sign dev: 1741)")
    g.add_argument("--gen_batches", type=int, help="batches timed, systematic sample (default 8, quick 4)")
    g.add_argument("--gen_serial", type=int, help="clips timed one at a time (default 8, quick 6)")
    g.add_argument("--gen_batch_size", type=int, default=16)
    g.add_argument("--num_beams", type=int, default=5)
    g.add_argument("--max_new_tokens", type=int, default=30)
    g.add_argument("--gen_budget_s", type=float, help="seconds per generation variant before it stops timing more "
                                                      "(default 12, quick 10)")
    g.add_argument("--gen_model", choices=["bf16", "qlora"], default="bf16",
                   help="generate with the stage-1 bf16 LLM (before quantisation) or the 4-bit + LoRA one")
    g.add_argument("--no_gen_eager", dest="gen_eager", action="store_false",
                   help="skip the ablation: batched with eager decode steps (no static cache, no CUDA graph)")
    g.add_argument("--no_plain_hf", dest="plain_hf", action="store_false",
                   help="skip the ablation: batched plain HF generate (prompt repeated per beam)")
    g = p.add_argument_group("loader")
    g.add_argument("--loader_clips", type=int, help="clips written to h5 (default 800, quick 800)")
    g.add_argument("--loader_batches", type=int, help="batches read per worker count (default 40, quick 25)")
    g.add_argument("--loader_batch_size", type=int, help="default: stage-1 ours' batch size, else 8")
    g.add_argument("--workers", type=ints, default=[0, 2, 4, 8])
    g.add_argument("--tmp_dir", help="where the loader's h5 files go (default: the system temp dir)")
    g = p.add_argument_group("FP8 (--fp8: signllava/fp8.py)")
    g.add_argument("--fp8", choices=["auto", "on", "off"], default="auto",
                   help="(h) rows: stage 1 with the frozen LLM's linears in FP8, and LoRA on an FP8 base beside QLoRA, "
                        "each against its bf16 row of this run; auto: where the device has FP8 matmuls (compute "
                        "capability 8.9+), on: also emulated (CPU), off: none")
    mem_target(g, "--fp8_mem_gb", "LoRA on an FP8 base: also the fastest (h) peaking within this many GiB, timing "
               "compiled rows under --memory_budget for it")
    p.add_argument("--time_limit_s", type=float, default=450,
                   help="past this many seconds, optional pieces ((c), (d), (e), the plain-HF generation ablation) "
                        "are skipped")
    p.add_argument("--out", help="JSON path (default bench/results-<device>-<shape>-<date>.json)")
    p.add_argument("--copy_to", metavar="DIR", help="also copy the JSON into DIR after every section "
                                                    "(default: $OUT when that is a directory)")
    args = p.parse_args(argv)
    q = args.quick
    for name, full, quick in (("steps", 10, 5), ("ref_steps", 16, 12), ("warmup", 2, 1), ("gen_batches", 8, 4),
                              ("gen_serial", 8, 6), ("gen_budget_s", 12.0, 10.0), ("loader_clips", 800, 800),
                              ("loader_batches", 40, 25)):
        if getattr(args, name) is None:
            setattr(args, name, quick if q else full)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = set(args.only) - {"stage1", "gen", "qlora", "loader"}
    if bad:
        p.error(f"--only: unknown section(s) {', '.join(sorted(bad))}")
    if len(args.frames) != 2 or not 1 <= args.frames[0] <= args.frames[1]:
        p.error("--frames takes min,max with 1 <= min <= max")
    if len(args.answer) != 2 or not 1 <= args.answer[0] <= args.answer[1]:
        p.error("--answer takes min,max with 1 <= min <= max")
    if args.steps < 1 or args.ref_steps < 1 or args.warmup < 0 or not args.batch_sizes:
        p.error("--steps/--ref_steps >= 1, --warmup >= 0, --batch_sizes non-empty")
    return args


def main(argv=None) -> dict:
    import warnings
    args = parse_args(argv)
    args.t0 = time.perf_counter()
    # transformers 5 renamed gradient_checkpointing_* (model.assemble still uses the old names): noise here.
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*(gradient|activation)_checkpointing.*")
    warnings.filterwarnings("ignore", category=FutureWarning, message=r".*is_gradient_checkpointing.*")
    t_all = time.perf_counter()
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        if device.index is None:                 # set_device and friends want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    from model import compute_dtype
    dtype = {"auto": compute_dtype(device), "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out_path = Path(args.out) if args.out else HERE / "results" / f"results-{device_slug(device)}-{args.shape}-{stamp}.json"
    R: dict = {"args": {k: v for k, v in vars(args).items() if k != "t0"}, "env": environment(device), "shape": args.shape, "dtype": str(dtype),
               "notes": ["plain PyTorch steps (no DeepSpeed): bf16 params, fused AdamW without fp32 master copy",
                         "samples/s = real tokens/s / population mean real tokens per sample",
                         "MFU = 4 * matmul_params * real tokens/s / measured peak"]}

    def save():
        R["elapsed_s"] = time.perf_counter() - t_all
        R["summary"] = summary_rows(R)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(out_path, json.dumps(R, indent=1, default=str) + "\n")     # a kill keeps the last complete save
        od = args.copy_to or os.environ.get("OUT")
        if od and Path(od).is_dir() and Path(od).resolve() != out_path.parent.resolve():
            shutil.copy(out_path, Path(od) / out_path.name)

    log(f"{R['env']['device']} | torch {torch.__version__} | transformers {R['env']['transformers']} | "
        f"peft {R['env']['peft']} | bitsandbytes {R['env']['bitsandbytes']} | shape {args.shape} {dtype}")
    peak = measure_peak_flops(device, dtype)
    R["peak"] = peak
    log(f"peak matmul: {peak['tflops']:.1f} TFLOP/s ({peak['n']}^2 {peak['dtype']})")

    tok = make_tokenizer(args.seed)
    vocab = SHAPES[args.shape]["vocab_size"]
    synth = Synth(tok, vocab, args.seed)
    specs = make_specs(args.samples, args.seed, tuple(args.frames), tuple(args.answer), args.frames_dist)
    real = np.asarray([synth.seq_len(s) for s in specs])
    T = np.asarray([s.frames for s in specs])
    ctx = {"mean_real_tokens": float(real.mean()), "matmul_params": matmul_params(SHAPES[args.shape]),
           "peak_flops": peak["tflops"] * 1e12}
    R["population"] = {"samples": len(specs), "frames_dist": args.frames_dist, "frames_mean": float(T.mean()),
                       "frames_min": int(T.min()), "frames_max": int(T.max()), "mean_real_tokens": ctx["mean_real_tokens"],
                       "max_real_tokens": int(real.max()), "prompt_overhead_tokens": synth.overhead,
                       "matmul_params": ctx["matmul_params"]}
    log(f"population: {len(specs)} samples, T mean {T.mean():.0f} (range {T.min()}-{T.max()}), "
        f"{real.mean():.0f} real tokens/sample (max {real.max()}), matmul params {ctx['matmul_params'] / 1e9:.2f} B")
    save()

    gen_specs = make_specs(args.gen_clips, args.seed + 1, tuple(args.frames), (1, 1), args.frames_dist)
    state: dict = {"llm": None}

    def guarded(name, fn):
        """A section that raises (anything but the OOMs handled inside) is recorded and the run goes on."""
        failed = None
        try:
            fn()
        except Exception:            # noqa: BLE001
            failed = traceback.format_exc()
        if failed:
            print(failed, file=sys.stderr, flush=True)
            R.setdefault("errors", {})[name] = failed.strip().splitlines()[-1]
            log(f"section {name} FAILED ({R['errors'][name][:200]}); going on")
        free_memory()
        save()

    def build():
        t = time.perf_counter()
        state["llm"] = build_llm(args.shape, device, dtype, args.seed)
        log(f"built random {args.shape} LLM on {device} in {time.perf_counter() - t:.1f} s")

    def run_gen(model):
        from generate import Translator
        model.eval()
        tr = Translator(model, tok, model.cfg, device)
        R["generation"] = bench_generation(tr, synth, gen_specs, args, device)
        R["generation"]["model"] = args.gen_model

    def stage1():
        model = assemble_with(state["llm"], sign_config(1, 16), tok, device, dtype)
        cast_params_(model, dtype)
        R["stage1"] = ({"packing_check": packing_check(model, synth, specs, device,
                                                        compile_backend=resolved_compile_backend(args, device))}
                       if args.packing else {})
        R["stage1"]["configs"] = bench_training("stage1", model, synth, specs, args, device, ctx, lr=1e-3)
        if fp8_wanted(args, device):
            state["stage1_model"] = model

    def stage1_fp8():
        # The stage-1 model's LLM goes FP8 in place (its bf16 weights freed, as --fp8 frees them), so the
        # sections after this one get a fresh bf16 LLM: the same seed builds the same weights.
        model = state.pop("stage1_model")
        R["stage1"]["fp8_check"] = fp8_check(model, synth, specs, device)
        bench_fp8("stage1", model, synth, specs, args, device, ctx, 1e-3, bf16_base_row(R["stage1"]["configs"]),
                  R["stage1"]["configs"], on_row=save)

    def fresh_llm():
        state["llm"] = None
        free_memory()
        build()

    def lora_fp8():
        """LoRA (finetune.py's defaults) on the bf16 LLM with its frozen linears then in FP8 (finetune.py --bits 16
        --fp8), against QLoRA's compiled (g) of this run."""
        fresh_llm()
        model = assemble_with(state["llm"], sign_config(2, 16), tok, device, dtype, adapter="new", fp8=True)
        cast_params_(model, dtype)
        R["lora_fp8"] = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
                         "mem_target_gb": (args.fp8_mem_gb or None) if device.type == "cuda" else None,
                         "base": "QLoRA (g)", "configs": []}
        bench_fp8("lora_fp8", model, synth, specs, args, device, ctx, 2e-4,
                  bf16_base_row(R.get("qlora", {}).get("configs", [])), R["lora_fp8"]["configs"],
                  mem_target_gb=R["lora_fp8"]["mem_target_gb"], on_row=save)

    def gen_bf16():
        # Translator.load's model: assemble + projectors (left in fp32, as load_projector_state leaves them).
        run_gen(assemble_with(state["llm"], sign_config(1, 16), tok, device, dtype))

    def qlora():
        llm = state["llm"]
        set_gradient_checkpointing_llm(llm, False)
        t = time.perf_counter()
        n = quantize_4bit_(llm, device, dtype)
        R["quantization"] = {"layers": n, "method": llm._bench_quantizer, "time_s": time.perf_counter() - t}
        log(f"quantised {n} linear layers to nf4 (double quant, {llm._bench_quantizer} path) in "
            f"{R['quantization']['time_s']:.1f} s")
        model = assemble_with(llm, sign_config(2, 4), tok, device, dtype, adapter="new")
        cast_params_(model, dtype)
        if "qlora" in args.only:
            R["qlora"] = {"trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
            R["qlora"]["mem_target_gb"] = args.qlora_mem_gb if device.type == "cuda" else None
            R["qlora"]["configs"] = bench_training("qlora", model, synth, specs, args, device, ctx, lr=2e-4,
                                                   mem_target_gb=R["qlora"]["mem_target_gb"])
            save()
        if "gen" in args.only and args.gen_model == "qlora":
            run_gen(model)

    def loader():
        best1 = next((c for c in R.get("stage1", {}).get("configs", []) if c.get("best")), None)
        bs = args.loader_batch_size or ((best1["batch_size"] or max(1, round(best1["samples"] / best1["steps"])))
                                        if best1 else 8)     # a token-budget best: its mean batch
        lspecs = make_specs(args.loader_clips, args.seed + 2, tuple(args.frames), tuple(args.answer), args.frames_dist)
        R["loader"] = bench_loader(synth, lspecs, args, device, bs)

    if any(s in args.only for s in ("stage1", "gen", "qlora")):
        guarded("build", build)
    if state["llm"] is not None:
        if "stage1" in args.only:
            guarded("stage1", stage1)
        if "stage1_model" in state:
            guarded("stage1_fp8", stage1_fp8)
            state.pop("stage1_model", None)
            if any(s in args.only for s in ("gen", "qlora")):
                guarded("build", fresh_llm)
        if "gen" in args.only and args.gen_model == "bf16" and state["llm"] is not None:
            guarded("generation", gen_bf16)
        if state["llm"] is not None and ("qlora" in args.only or ("gen" in args.only and args.gen_model == "qlora")):
            guarded("qlora", qlora)
        if "qlora" in args.only and fp8_wanted(args, device):
            guarded("lora_fp8", lora_fp8)
    state.clear()
    free_memory()
    if "loader" in args.only:
        guarded("loader", loader)

    save()
    print()
    print(format_table(R["summary"]))
    if R.get("errors"):
        log(f"sections that failed: {', '.join(R['errors'])} (tracebacks above, last lines in the JSON's 'errors')")
    log(f"done in {(time.perf_counter() - t_all) / 60:.1f} min; results in {out_path}")
    R["out_path"] = str(out_path)
    return R


if __name__ == "__main__":
    main()
