"""--profile_steps A:B: where the optimizer steps' time goes, recorded by torch.profiler on rank 0.

Steps A+1 to B (as counted in metrics.jsonl) are recorded into OUTPUT_DIR/profile/:
  trace.json   the timeline, for https://ui.perfetto.dev or chrome://tracing
  ops.txt      operators by self time on the device (CPU runs: on the host), then by self host time
  summary.json wall seconds a step, device busy seconds a step and their ratio: a device idle for much of
               the wall time waits on the host (Python, data loading, synchronisations), not on kernels
Pick a window without evaluation or saving (those run after a step, between steps A and B they would be
recorded too). Training goes on unchanged; only rank 0 records, the other ranks run as usual.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch

from signllava.atomic import write_atomic

log = logging.getLogger("signllava")


def parse_window(spec: str) -> tuple[int, int]:
    """'A:B' -> (A, B) with 0 <= A < B; ValueError naming the flag otherwise."""
    try:
        first, last = (int(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--profile_steps {spec!r}: give A:B, the steps after which recording starts and stops") from None
    if not 0 <= first < last:
        raise ValueError(f"--profile_steps {spec}: needs 0 <= A < B")
    return first, last


def covered(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


class StepProfiler:
    """Call after_step(step) after every optimizer step; recording runs from step `first` to step `last`."""

    def __init__(self, spec: str | None, out: Path, rank: int, device: torch.device):
        self.window = parse_window(spec) if spec and rank == 0 else None
        self.out, self.device = out / "profile", device
        self.prof, self.t0 = None, 0.0

    def after_step(self, step: int):
        if self.window is None:
            return
        first, last = self.window
        if step == first:
            self._sync()
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()
            self.t0 = time.perf_counter()
        elif step == last and self.prof is not None:
            self._sync()
            wall = time.perf_counter() - self.t0
            self.prof.stop()
            self._write(last - first, wall)
            self.prof = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _write(self, steps: int, wall_s: float):
        self.out.mkdir(parents=True, exist_ok=True)
        self.prof.export_chrome_trace(str(self.out / "trace.json"))
        ops = self.prof.key_averages()
        on_device = self.device.type == "cuda"
        # Busy = the union of the kernels' and copies' intervals (operators' device times would count the kernels
        # they launch a second time).
        kernels = [(e.time_range.start, e.time_range.end) for e in self.prof.events()
                   if e.device_type != torch.autograd.DeviceType.CPU]
        device_s = covered(kernels) / 1e6 if on_device else None
        host_s = sum(e.self_cpu_time_total for e in ops) / 1e6
        tables = [("self device time", "self_device_time_total")] if on_device else []
        tables.append(("self host time", "self_cpu_time_total"))
        text = "\n\n".join(f"# operators by {title}, {steps} steps\n" + ops.table(sort_by=key, row_limit=40)
                           for title, key in tables)
        write_atomic(self.out / "ops.txt", text + "\n")
        summary = {"steps": steps, "wall_s_per_step": wall_s / steps, "host_op_s_per_step": host_s / steps}
        if device_s is not None:
            summary.update(device_busy_s_per_step=device_s / steps, device_busy_fraction=device_s / wall_s)
        write_atomic(self.out / "summary.json", json.dumps(summary, indent=1) + "\n")
        log.info("profile of %d steps in %s: %.3f s a step%s", steps, self.out, wall_s / steps,
                 f", device busy {100 * device_s / wall_s:.0f} %" if device_s is not None else "")
