"""Where the time of one generation batch (or one packed stage-1 step) goes: torch.profiler's top ops by GPU
and by CPU time, on bench/benchmark.py's random Llama-3-8B-shaped model. A diagnostic for choosing the next fast path,
not a benchmark (bench/benchmark.py is).

    python bench/profile_step.py gen --batch_size 16      # one Translator.generate_ids batch, 5 beams
    python bench/profile_step.py train --tokens 9000      # one packed stage-1 step
    python bench/profile_step.py layer --tokens 9000      # one frozen decoder layer fwd+bwd: stock vs fused_ops
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import benchmark as bench  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["gen", "train", "layer"])
    p.add_argument("--shape", default="8b")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, default=30)
    p.add_argument("--tokens", type=int, default=9000, help="train: packed token budget of the step")
    p.add_argument("--rows", type=int, default=25)
    a = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.what == "layer":
        return layer(a, device, dtype)
    tok = bench.make_tokenizer(0)
    synth = bench.Synth(tok, bench.SHAPES[a.shape]["vocab_size"], 0)
    specs = bench.make_specs(400, 1, (50, 600), (20, 80))
    order = sorted(range(len(specs)), key=lambda i: synth.prompt_len(specs[i]))
    mid = order[len(order) // 2 - a.batch_size // 2:][:a.batch_size]          # a batch of median-length clips
    model = bench.assemble_with(bench.build_llm(a.shape, device, dtype), bench.sign_config(1, 16), tok, device, dtype)
    if a.what == "gen":
        from generate import Translator
        model.eval()
        tr = Translator(model, tok, model.cfg, device)
        items = [synth.item(i, specs[i], generation=True) for i in mid]

        def run():
            tr.generate_ids(items, num_beams=a.num_beams, max_new_tokens=a.max_new_tokens)
    else:
        bench.cast_params_(model, dtype)
        trainer = bench.Trainer(model, 1e-3, device)
        model.packing = True
        batch, tot = [], 0
        for i in order[::-1]:
            if tot + synth.seq_len(specs[i]) > a.tokens:
                break
            batch.append(i)
            tot += synth.seq_len(specs[i])
        b = bench.collate(synth, specs, batch, pin=device.type == "cuda")

        def run():
            trainer.step(b)
    run()                                            # warmup
    bench.sync(device)
    t = time.perf_counter()
    run()
    bench.sync(device)
    print(f"{a.what}: one run {time.perf_counter() - t:.3f} s")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        run()
        bench.sync(device)
    for key in (["cuda_time_total"] if device.type == "cuda" else []) + ["cpu_time_total"]:
        print(prof.key_averages().table(sort_by=key, row_limit=a.rows, max_name_column_width=60))


def layer(a, device, dtype, reps: int = 10):
    """One frozen Llama decoder layer, packed row of a.tokens positions, forward + backward to its input:
    time and activation memory, stock transformers vs fused_ops."""
    import copy

    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from bench.synthetic import packed_layer_inputs
    from signllava import kernels
    cfg = bench.llama_config(a.shape)
    kernels.register()
    cfg._attn_implementation = kernels.ATTENTION
    base = LlamaDecoderLayer(cfg, 0).to(device, dtype).requires_grad_(False)
    x0, pos, pe, kw = packed_layer_inputs(cfg, a.tokens, device, dtype)
    out = {}
    for name, fused in (("stock", False), ("fused norms", True), ("fused norms + compile", "compile"),
                        ("compile, stock norms", "compile-stock")):
        lay = copy.deepcopy(base)
        if fused in (True, "compile"):
            kernels.fuse_rms_norm(lay)
        if fused in ("compile", "compile-stock"):
            # regional compile: the one layer's forward (dynamic: packed rows change length every step)
            t0 = time.perf_counter()
            lay.compile(dynamic=True)

        def step():
            x = x0.detach().requires_grad_(True)
            y = lay(x, attention_mask=None, position_ids=pos, position_embeddings=pe, **kw)
            y = y[0] if isinstance(y, tuple) else y
            y.float().square().mean().backward()
            return x.grad
        g = step()
        if fused in ("compile", "compile-stock"):
            step()
            bench.sync(device)
            print(f"  compile + 2 steps: {time.perf_counter() - t0:.1f} s", flush=True)
        bench.sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            m0 = torch.cuda.memory_allocated(device)
        t = time.perf_counter()
        for _ in range(reps):
            g = step()
        bench.sync(device)
        dt = (time.perf_counter() - t) / reps
        mem = (torch.cuda.max_memory_allocated(device) - m0) / 2**20 if device.type == "cuda" else float("nan")
        out[name] = g
        ref = out["stock"]
        err = float((g.float() - ref.float()).norm() / ref.float().norm())
        print(f"layer {name:24s} {dt * 1e3:8.2f} ms  peak +{mem:8.0f} MiB  grad rel diff vs stock {err:.2e}")


if __name__ == "__main__":
    main()
