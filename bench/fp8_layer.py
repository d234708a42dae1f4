"""FP8 against bf16 on one frozen 8B decoder layer and on the bare matmuls, on the GPU: the diagnostic behind
--fp8's rows in bench/benchmark.py (which times whole steps).

    python bench/fp8_layer.py --tokens 27084 --out fp8_layer.json

1. Matmul ceilings: an 8192^3 bf16 torch.mm against torch._scaled_mm on e4m3 operands with row-wise scales
   (the kernel --fp8 calls), random data, best of 5 x 10.
2. One Llama-3-8B decoder layer, frozen, a packed row of --tokens positions (ten samples), forward + backward
   to its input, compiled (regional, dynamic, as --compile_layers): bf16; ours (signllava/fp8.py: weights
   quantised once, no weight gradient); and torchao's row-wise Float8Linear (which keeps the bf16 weight and
   re-casts it each step), where torchao imports. Each: compile time, ms a step (median of --reps), peak
   memory over the inputs, output and input-gradient relative difference to bf16.
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.synthetic import llama_config, log, packed_layer_inputs  # noqa: E402
from signllava import fp8, kernels  # noqa: E402


def event_ms(fn, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def matmul_ceilings(n: int = 8192) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
    qa, sa = fp8.quantize_rows(a)
    qb, sb = fp8.quantize_rows(b)              # b's rows are the output columns: b.t() is column-major
    runs = {"bf16 mm": lambda: torch.mm(a, b.t()),
            "e4m3 _scaled_mm row-wise": lambda: fp8.scaled_matmul(qa, sa, qb.t(), sb.view(1, -1), torch.bfloat16,
                                                                  emulate=False, fast_accum=True)}
    out = {}
    for name, fn in runs.items():
        fn()
        best = min(min(event_ms(fn, 10)) for _ in range(5))
        out[name] = {"ms": best, "tflops": 2 * n ** 3 / best / 1e9}
        log(f"{name}: {out[name]['tflops']:.0f} TFLOP/s")
    ref = (a.float() @ b.float().t())
    y = runs["e4m3 _scaled_mm row-wise"]().float()
    out["e4m3_rel_diff_to_fp32"] = float((y - ref).norm() / ref.norm())
    return out


def kernel_vs_emulation(tokens: int = 8192) -> dict:
    """One 4096 -> 14336 FP8 linear, forward and input gradient: torch._scaled_mm against the fp32 emulation of the
    same e4m3 operands (what the CPU tests pin), and both against the bf16 linear."""
    g = torch.Generator(device="cuda").manual_seed(1)
    lin = torch.nn.Linear(4096, 14336, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    x0 = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16, generator=g)
    dy = torch.randn(tokens, 14336, device="cuda", dtype=torch.bfloat16, generator=g)

    def run(layer):
        x = x0.detach().requires_grad_(True)
        y = layer(x)
        y.backward(dy)
        return y.float(), x.grad.float()
    rel = lambda a, b: float((a - b).norm() / b.norm())      # noqa: E731
    (yk, gk), (ye, ge), (yb, gb) = (run(fp8.FrozenFP8Linear(lin, emulate=False)),
                                    run(fp8.FrozenFP8Linear(lin, emulate=True)), run(lin))
    out = {"out_kernel_vs_emulated": rel(yk, ye), "grad_kernel_vs_emulated": rel(gk, ge),
           "out_fp8_vs_bf16": rel(yk, yb), "grad_fp8_vs_bf16": rel(gk, gb)}
    log("linear: " + ", ".join(f"{k} {v:.2e}" for k, v in out.items()))
    return out


def layer_variants(tokens: int, reps: int) -> dict:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = llama_config("8b")
    kernels.register()
    cfg._attn_implementation = kernels.ATTENTION
    torch.manual_seed(0)
    base = LlamaDecoderLayer(cfg, 0).to(device, dtype).requires_grad_(False)
    kernels.fuse_rms_norm(base)
    x0, pos, pe, kw = packed_layer_inputs(cfg, tokens, device, dtype)
    dy = torch.randn_like(x0)

    def ours(layer):
        for parent, name, lin in fp8.frozen_linears_in(layer):
            setattr(parent, name, fp8.FrozenFP8Linear(lin, emulate=False))

    def torchao_rowwise(layer):
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
        convert_to_float8_training(layer, config=Float8LinearConfig.from_recipe_name("rowwise"))

    out, ref = {}, None
    for name, convert in (("bf16", None), ("fp8 ours", ours), ("fp8 torchao rowwise", torchao_rowwise)):
        try:
            layer = copy.deepcopy(base)
            if convert:
                convert(layer)
            layer.compile(dynamic=True)

            def step():
                x = x0.detach().requires_grad_(True)
                y = layer(x, attention_mask=None, position_ids=pos, position_embeddings=pe, **kw)
                y = y[0] if isinstance(y, tuple) else y
                y.backward(dy)
                return y.detach(), x.grad
            t = time.perf_counter()
            step()
            step()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t
            torch.cuda.reset_peak_memory_stats()
            m0 = torch.cuda.memory_allocated()
            ms = statistics.median(event_ms(step, reps))
            peak = (torch.cuda.max_memory_allocated() - m0) / 2**20
            y, g = step()
            r = {"ms": ms, "compile_s": compile_s, "peak_mib_over_inputs": peak,
                 "weights_mib": sum(t.numel() * t.element_size() for t in list(layer.parameters()) + list(layer.buffers())
                                    if t.dim() == 2) / 2**20}
            if ref is None:
                ref = (y.float(), g.float())
            else:
                r["out_rel_diff"] = float((y.float() - ref[0]).norm() / ref[0].norm())
                r["grad_rel_diff"] = float((g.float() - ref[1]).norm() / ref[1].norm())
                r["speedup_vs_bf16"] = out["bf16"]["ms"] / ms
            out[name] = r
            log(f"layer {name:22s} {ms:7.2f} ms  compile {compile_s:5.1f} s  peak +{peak:6.0f} MiB  " +
                "  ".join(f"{k} {v:.3g}" for k, v in r.items() if k in ("out_rel_diff", "grad_rel_diff", "speedup_vs_bf16")))
        except Exception as e:         # noqa: BLE001 -- a variant that fails (torchao missing) is a result
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
            log(f"layer {name}: {out[name]['error']}")
        finally:
            torch._dynamo.reset()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=27084, help="packed positions of the layer's row")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", help="JSON path")
    a = p.parse_args(argv)
    if not torch.cuda.is_available() or not fp8.fp8_matmul_available(torch.device("cuda")):
        sys.exit("error: bench/fp8_layer.py needs a GPU with FP8 tensor cores (compute capability 8.9+)")
    R = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": a.tokens,
         "linear": kernel_vs_emulation(), "matmul": matmul_ceilings()}
    R["layer"] = layer_variants(a.tokens, a.reps)
    if a.out:
        Path(a.out).write_text(json.dumps(R, indent=1) + "\n")
    return R


if __name__ == "__main__":
    main()
