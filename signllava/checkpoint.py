"""Checkpoint directories that are complete or invisible.

    O/checkpoint-<step>.tmp/   being written (ignored by everything)
    O/checkpoint-<step>/       complete: renamed from .tmp only after every file is written and synced
    O/latest                   the name of the newest complete checkpoint, replaced atomically
    O/best                     the name of the best one so far (training's --metric_for_best), likewise;
                               rotation never removes it

A kill at any moment leaves either the old `latest` pointing at an intact checkpoint, or the new one.
Deletion of old checkpoints renames first (`.deleting`) so a half-deleted one never looks complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

from signllava.errors import CheckpointError

# The files of a checkpoint directory.
CONFIG_NAME = "config.json"                    # SignConfig: how to rebuild the model
PROJECTORS_NAME = "projectors.safetensors"     # projectors + marker rows
ADAPTER_DIR = "adapter"                        # stage 2: the LoRA adapter in PEFT's format
STATE_NAME = "trainer_state.json"
POINTERS = ("latest", "best")                  # files in O naming a checkpoint directory
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def is_complete(d: Path) -> bool:
    return bool(_CKPT_RE.match(d.name)) and d.is_dir() and all((d / f).is_file() for f in (STATE_NAME, CONFIG_NAME, PROJECTORS_NAME))


def complete_checkpoints(out_dir: Path) -> list[Path]:
    if not Path(out_dir).is_dir():
        return []
    found = [d for d in Path(out_dir).iterdir() if is_complete(d)]
    return sorted(found, key=lambda d: int(_CKPT_RE.match(d.name).group(1)))


def pointed(pointer: Path) -> Path | None:
    """The complete checkpoint a pointer file (O/latest, O/best) names, else None."""
    if not pointer.is_file():
        return None
    cand = pointer.parent / pointer.read_text().strip()
    return cand if is_complete(cand) else None


def latest_checkpoint(out_dir: Path) -> Path | None:
    """What `O/latest` names if that is complete; else the newest complete checkpoint."""
    out_dir = Path(out_dir)
    found = pointed(out_dir / "latest")
    if found is not None:
        return found
    done = complete_checkpoints(out_dir)
    return done[-1] if done else None


def best_checkpoint(out_dir: Path) -> Path | None:
    return pointed(Path(out_dir) / "best")


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir as given, the checkpoint a pointer file (O/latest, O/best) names, or the latest
    complete checkpoint of an output dir."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or output directory")
    if p.is_file() and p.name in POINTERS:
        found = pointed(p)
        if found is None:
            raise CheckpointError(f"{p}: names {p.read_text().strip()!r}, which is not a complete checkpoint")
        return found
    if p.is_dir() and (p / CONFIG_NAME).is_file() and (p / PROJECTORS_NAME).is_file():
        if p.name.endswith((".tmp", ".deleting")):
            raise CheckpointError(f"{p}: incomplete checkpoint (its save was interrupted)")
        return p
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"{p}: holds no complete checkpoint")
        return found
    raise CheckpointError(f"{p}: not a checkpoint directory")


def _fsync_tree(d: Path):
    for root, _, files in os.walk(d):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def begin(out_dir: Path, step: int) -> Path:
    """(rank 0) A fresh temporary directory for checkpoint `step`."""
    tmp = Path(out_dir) / f"checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int, keep: int, best_step: int | None = None) -> Path:
    """(rank 0) Sync, rename into place, repoint `latest` (and `best` when this step is the best), drop old
    checkpoints beyond the newest `keep` -- never the best one. Pointers move before anything is removed, so a
    kill at any moment leaves both naming complete checkpoints."""
    _fsync_tree(tmp)
    final = tmp.with_name(f"checkpoint-{step}")
    if final.exists():                       # re-saving a step after a resume: replace it
        _remove(final)
    os.replace(tmp, final)
    write_atomic(final.parent / "latest", final.name + "\n")
    if best_step == step:
        point_best(final.parent, step)
    if keep > 0:
        for old in complete_checkpoints(final.parent)[:-keep]:
            if old != final and old.name != f"checkpoint-{best_step}":
                _remove(old)
    return final


def point_best(out_dir: Path, step: int):
    """(rank 0) `O/best` := checkpoint-<step>, atomically."""
    write_atomic(Path(out_dir) / "best", f"checkpoint-{step}\n")


def _remove(d: Path):
    gone = d.with_name(d.name + ".deleting")
    os.replace(d, gone)
    shutil.rmtree(gone, ignore_errors=True)


# What training writes beside the checkpoints: its records, the curves, TensorBoard's events.
RUN_RECORDS = ("metrics.jsonl", "train_summary.json", "curves.png", "runs", "wandb", "trackers.json")


def clear_run(out_dir: Path) -> list[str]:
    """(rank 0, --overwrite_output_dir) The previous run's pointers, complete checkpoints and records go, so that
    nothing of it (an O/best, metrics.jsonl lines, curves) passes for the new run's; anything else in the
    directory (data, notes) stays. Pointers first: a kill midway never leaves one naming a removed checkpoint.
    Returns the names removed."""
    out_dir = Path(out_dir)
    gone = []
    for name in POINTERS:
        if (out_dir / name).is_file():
            (out_dir / name).unlink()
            gone.append(name)
    for d in complete_checkpoints(out_dir):
        _remove(d)
        gone.append(d.name)
    for name in RUN_RECORDS:
        path = out_dir / name
        if path.exists():
            remove_leftover(path)
            gone.append(name)
    return gone


def write_state(d: Path, state: dict):
    with open(d / STATE_NAME, "w") as f:
        json.dump(state, f, indent=1)


def read_state(d: Path) -> dict:
    return json.loads((d / STATE_NAME).read_text())


def leftovers(out_dir: Path) -> list[Path]:
    """What an interrupted save or deletion leaves behind: `checkpoint-N.tmp`, `*.deleting`, `latest.tmp`."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(d for d in out_dir.iterdir()
                  if (d.name.startswith("checkpoint-") and d.name.endswith((".tmp", ".deleting"))) or d.name == "latest.tmp")


def remove_leftover(path: Path):
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def fault_requested(name: str, step: int) -> bool:
    """Testing aid: SIGNLLAVA_FAULT is a comma-separated list of <point>:<step>. Unset in normal use.
    Points: mid_save, after_save (SIGKILL at that point of that step's save), save_error (the save fails
    as on a full disk), oom (the step's first batch runs out of memory), nan_loss (its loss is NaN)."""
    return f"{name}:{step}" in os.environ.get("SIGNLLAVA_FAULT", "").split(",")


def fault_point(name: str, step: int):
    """SIGKILL this process here if SIGNLLAVA_FAULT asks for it (crash-safety tests)."""
    if fault_requested(name, step):
        os.kill(os.getpid(), signal.SIGKILL)
