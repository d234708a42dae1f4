"""--report_to tensorboard,wandb,trackio (any combination; none): where training's scalars go besides
OUTPUT_DIR/metrics.jsonl, which is always written.

Each row of `training.record` reaches every chosen tracker under the same names: `train/<key>` and
`dev/<key>` (TensorBoard's tags as before), at the row's step.

  tensorboard  OUTPUT_DIR/runs/ (event files)
  wandb        Weights & Biases: online with WANDB_API_KEY; WANDB_MODE=offline keeps the run in
               OUTPUT_DIR/wandb/offline-run-*/ for a later `wandb sync`. Its run id is kept in
               OUTPUT_DIR/trackers.json, so --resume continues the same run.
  trackio      Trackio's local store (a SQLite file per project under TRACKIO_DIR, default
               ~/.cache/huggingface/trackio); `trackio show` draws it.

The project is --tracker_project (default signllava), the run name --run_name (default the output
directory's name); the run's flags go in as its config.
"""
from __future__ import annotations

import json
from pathlib import Path

from signllava.errors import RunError

TRACKERS = ("tensorboard", "wandb", "trackio")
STATE_FILE = "trackers.json"


# OUTPUT_DIR's folder of each tracker that writes one
TRACKER_FOLDERS = {"runs": "tensorboard", "wandb": "wandb"}


def owned_folders(out: Path) -> set[str]:
    """The TRACKER_FOLDERS of `out` that a run of ours made (trackers.json says so)."""
    try:
        state = json.loads((Path(out) / STATE_FILE).read_text())
        return {d for d in state.get("folders", []) if d in TRACKER_FOLDERS}
    except (OSError, ValueError, AttributeError, TypeError):
        return set()


def parse_report_to(value: str | None) -> list[str]:
    """'tensorboard,wandb' -> its names, in TRACKERS' order; 'none' or '' -> []. Unknown names: ValueError."""
    names = [n.strip().lower() for n in (value or "").split(",") if n.strip()]
    if names == ["none"]:
        return []
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"--report_to {value}: unknown {', '.join(unknown)} (choose from {', '.join(TRACKERS)} "
                         "or none)")
    return [n for n in TRACKERS if n in names]


def tag(key: str) -> str:
    return ("dev/" if key.startswith("dev") else "train/") + key


class Trackers:
    """The chosen trackers of one run (rank 0 only): `log(row)` sends a metrics row to each, `close()` ends them."""

    def __init__(self, names: list[str], out: Path, run_name: str, project: str, config: dict, resume: bool):
        self.names, self.out = names, out
        self.writer = self.wandb_run = self.trackio = None
        state_path = out / STATE_FILE
        state = json.loads(state_path.read_text()) if resume and state_path.is_file() else {}
        # The folders these trackers make in OUTPUT_DIR, listed only when they make them: --overwrite_output_dir
        # clears those and never a runs/ or wandb/ that was the user's before (checkpoint.clear_run).
        made = {d for d, tracker in TRACKER_FOLDERS.items() if tracker in names and not (out / d).exists()}
        ours = made | owned_folders(out)
        if ours:
            state["folders"] = sorted(ours)
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(out / "runs"))
        if "wandb" in names:
            self.wandb_run = start_wandb(out, run_name, project, config, state.get("wandb_id"))
            state["wandb_id"] = self.wandb_run.id
        if "trackio" in names:
            self.trackio = start_trackio(run_name, project, config, resume)
        if state:
            state_path.write_text(json.dumps(state))

    def log(self, row: dict):
        step = row["step"]
        scalars = {tag(k): v for k, v in row.items() if k != "step"}
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)
        if self.trackio is not None:
            self.trackio.log(scalars, step=step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.trackio is not None:
            self.trackio.finish()


def start_wandb(out: Path, run_name: str, project: str, config: dict, run_id: str | None):
    import wandb
    try:
        return wandb.init(project=project, name=run_name, dir=str(out), config=config, id=run_id,
                          resume="allow" if run_id else None)
    except Exception as e:          # no API key and not offline, an unreachable server, a bad setting
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunError(f"--report_to wandb: wandb.init failed ({first}); log in (WANDB_API_KEY) or set "
                       "WANDB_MODE=offline to keep the run in OUTPUT_DIR/wandb for a later `wandb sync`") from None


def start_trackio(run_name: str, project: str, config: dict, resume: bool):
    import trackio
    # CPU sampling would add a thread of its own to every run; GPU sampling stays trackio's choice.
    return trackio.init(project=project, name=run_name, config=config, resume="allow" if resume else "never",
                        auto_log_cpu=False)
