"""O/curves.png: train and dev loss, learning rate, and dev BLEU / chrF against steps, from O/metrics.jsonl.

    python -m signllava.curves OUTPUT_DIR [--out PNG]     # any run directory, also while it is still training

Training draws it at the end of a run. A resumed run appends the steps after its checkpoint again to
metrics.jsonl; the last record of a step wins, as it is the one the surviving run made. The best checkpoint
(O/best) is marked on the score panel.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from signllava.atomic import atomic_file
from signllava.errors import DataError, run_command

SERIES = {"loss": "train loss", "dev_loss": "dev loss", "lr": "learning rate", "dev_bleu": "dev BLEU",
          "dev_chrf": "dev chrF"}


def read_series(metrics: Path) -> dict[str, dict[int, float]]:
    """metric -> {step: value}, the last record of a step winning."""
    series: dict[str, dict[int, float]] = {k: {} for k in SERIES}
    lines = metrics.read_text().splitlines()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            if n == len(lines):
                continue                # the last line, being written right now
            raise DataError(f"{metrics}: line {n} is not a metrics record") from None
        for k in SERIES:
            if isinstance(row.get(k), (int, float)):
                series[k][step] = float(row[k])
    return series


def best_step(out: Path) -> int | None:
    pointer = out / "best"
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    return int(name.rsplit("-", 1)[1]) if name.rsplit("-", 1)[-1].isdigit() else None


def draw_curves(out: Path, png: Path | None = None) -> Path:
    """Draw OUTPUT_DIR's curves (matplotlib's Agg backend: no display needed); -> the PNG's path."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = Path(out)
    metrics = out / "metrics.jsonl"
    if not metrics.is_file():
        raise DataError(f"{out}: no metrics.jsonl (not a training output directory, or nothing logged yet)")
    s = read_series(metrics)
    scores = [k for k in ("dev_bleu", "dev_chrf") if s[k]]
    fig, axes = plt.subplots(1, 3 if scores else 2, figsize=(12 if scores else 8, 3.2), dpi=100)
    for k in ("loss", "dev_loss"):
        if s[k]:
            steps = sorted(s[k])
            axes[0].plot(steps, [s[k][t] for t in steps], marker="o" if k == "dev_loss" else None, ms=3,
                         label=SERIES[k])
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[0].legend()
    if s["lr"]:
        steps = sorted(s["lr"])
        axes[1].plot(steps, [s["lr"][t] for t in steps])
    axes[1].set(xlabel="step", title="learning rate")
    axes[1].ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if scores:
        for k in scores:
            steps = sorted(s[k])
            axes[2].plot(steps, [s[k][t] for t in steps], marker="o", ms=3, label=SERIES[k])
        b = best_step(out)
        if b is not None:
            axes[2].axvline(b, color="grey", ls="--", lw=1, label=f"best (step {b})")
        axes[2].set(xlabel="step", title="dev translation")
        axes[2].legend()
    fig.suptitle(out.resolve().name, fontsize=9)
    fig.tight_layout()
    png = Path(png) if png else out / "curves.png"
    with atomic_file(png, "wb") as f:         # a reader never sees half a picture
        fig.savefig(f, format="png")
    plt.close(fig)
    return png


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("output_dir", help="a training run's OUTPUT_DIR (holding metrics.jsonl)")
    p.add_argument("--out", help="PNG to write (default: OUTPUT_DIR/curves.png)")
    args = p.parse_args(argv)
    return run_command(lambda: print(draw_curves(Path(args.output_dir), args.out)) or 0)


if __name__ == "__main__":
    sys.exit(main())
