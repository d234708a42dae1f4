"""Checkpoint directories that are complete or invisible.

    O/checkpoint-<step>.tmp/   being written (ignored by everything)
    O/checkpoint-<step>/       complete: renamed from .tmp only after every file is written and synced, and
                               only counted as complete while its manifest.json (written last: every file
                               and its size) agrees with what is there
    O/latest                   the name of the newest complete checkpoint, replaced atomically
    O/best                     the name of the best one so far (training's --metric_for_best), likewise;
                               rotation never removes it

A kill at any moment leaves either the old `latest` pointing at an intact checkpoint, or the new one.
Deletion of old checkpoints renames first (`.deleting`) so a half-deleted one never looks complete.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

from signllava.atomic import fsync_tree, is_temporary, write_atomic
from signllava.errors import CheckpointError

log = logging.getLogger("signllava")

# The files of a checkpoint directory.
CONFIG_NAME = "config.json"                    # SignConfig: how to rebuild the model
PROJECTORS_NAME = "projectors.safetensors"     # projectors + marker rows
ADAPTER_DIR = "adapter"                        # stage 2: the LoRA adapter in PEFT's format
STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"                # written last: every other file of the checkpoint and its size
POINTERS = ("latest", "best")                  # files in O naming a checkpoint directory
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")
_MANIFEST_MAX_BYTES = 1 << 22                  # a real one lists a few dozen files
_POINTER_MAX_BYTES = 64                        # "checkpoint-<step>\n"


def is_complete(d: Path) -> bool:
    return bool(_CKPT_RE.match(d.name)) and d.is_dir() and manifest_problem(d) is None


def write_manifest(d: Path):
    """(rank 0, every rank's files written) d/manifest.json: each file under d and its size, the last file a
    save writes. A checkpoint whose files are missing or of other sizes (renamed into place before its save
    ended, truncated, edited) no longer counts as complete."""
    files = {}
    for root, _, names in os.walk(d):
        for name in names:
            path = Path(root) / name
            rel = path.relative_to(d).as_posix()
            if rel != MANIFEST_NAME:
                files[rel] = path.stat().st_size
    write_atomic(d / MANIFEST_NAME, json.dumps({"files": files}, indent=1, sort_keys=True) + "\n")


def manifest_problem(d: Path) -> str | None:
    """Why checkpoint directory d is not complete by its manifest, or None."""
    path = d / MANIFEST_NAME
    try:
        if path.stat().st_size > _MANIFEST_MAX_BYTES:
            return f"{MANIFEST_NAME} is implausibly large"
        files = json.loads(path.read_text(encoding="utf-8")).get("files")
    except FileNotFoundError:
        return f"no {MANIFEST_NAME} (its save did not finish)"
    except (OSError, ValueError, AttributeError):
        return f"unreadable {MANIFEST_NAME}"
    if not isinstance(files, dict) or not all(isinstance(v, int) for v in files.values()):
        return f"{MANIFEST_NAME} is not a list of files and sizes"
    for required in (STATE_NAME, CONFIG_NAME, PROJECTORS_NAME):
        if required not in files:
            return f"{MANIFEST_NAME} does not list {required}"
    for rel, size in files.items():
        p = d / rel
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            return f"{MANIFEST_NAME} names {rel!r:.80}, outside the checkpoint"
        try:
            actual = p.stat().st_size if p.is_file() else None
        except OSError:
            actual = None
        if actual is None:
            return f"{rel} is missing"
        if actual != size:
            return f"{rel} has {actual} bytes, its manifest says {size}"
    return None


def complete_checkpoints(out_dir: Path) -> list[Path]:
    if not Path(out_dir).is_dir():
        return []
    found = [d for d in Path(out_dir).iterdir() if is_complete(d)]
    return sorted(found, key=lambda d: int(_CKPT_RE.match(d.name).group(1)))


def pointed(pointer: Path) -> Path | None:
    """The checkpoint a pointer file (O/latest, O/best) names; None when there is no such file. Anything but
    the name of a complete `checkpoint-N` directly beside the pointer -- a path out of the run (`../other/
    checkpoint-7`), a missing or incomplete directory, garbage -- is a CheckpointError, never followed and
    never silently replaced by another checkpoint."""
    if not pointer.exists() and not pointer.is_symlink():
        return None
    try:
        with open(pointer, "rb") as f:
            raw = f.read(_POINTER_MAX_BYTES + 1)
        name = raw.decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{pointer}: unreadable ({getattr(e, 'strerror', None) or e})") from None
    if len(raw) > _POINTER_MAX_BYTES or not _CKPT_RE.match(name):
        raise CheckpointError(f"{pointer}: names {name[:80]!r}, not a checkpoint of this run (it must hold the name "
                              f"of a checkpoint-N folder beside it)")
    cand = pointer.parent / name
    if not is_complete(cand):
        why = "no such directory" if not cand.is_dir() else manifest_problem(cand)
        raise CheckpointError(f"{pointer}: names {name!r}, which is not a complete checkpoint ({why})")
    return cand


def latest_checkpoint(out_dir: Path) -> Path | None:
    """What `O/latest` names (which must be a complete checkpoint of this run); without `O/latest`, the newest
    complete checkpoint."""
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
        return pointed(p)
    if p.is_dir() and (p / CONFIG_NAME).is_file() and (p / PROJECTORS_NAME).is_file():
        if p.name.endswith((".tmp", ".deleting")):
            raise CheckpointError(f"{p}: incomplete checkpoint (its save was interrupted)")
        if (p / MANIFEST_NAME).exists():
            why = manifest_problem(p)
            if why:
                raise CheckpointError(f"{p}: incomplete or damaged checkpoint ({why})")
        elif _CKPT_RE.match(p.name):
            # Named by the user: taken as given (--resume and `latest` never take one without a manifest).
            log.warning("%s: no %s (written before checkpoints had one, or its save never finished); taken as given",
                        p, MANIFEST_NAME)
        return p
    if p.is_dir():
        found = latest_checkpoint(p)
        if found is None:
            raise CheckpointError(f"{p}: holds no complete checkpoint")
        return found
    raise CheckpointError(f"{p}: not a checkpoint directory")


def begin(out_dir: Path, step: int) -> Path:
    """(rank 0) A fresh temporary directory for checkpoint `step`."""
    tmp = Path(out_dir) / f"checkpoint-{step}.tmp"
    if tmp.exists():            # ours: only the run holding OUTPUT_DIR's lock writes checkpoint-N.tmp there
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit(tmp: Path, step: int, keep: int, best_step: int | None = None) -> Path:
    """(rank 0) Sync, rename into place, repoint `latest` (and `best` when this step is the best), drop old
    checkpoints beyond the newest `keep` -- never the best one. Pointers move before anything is removed, so a
    kill at any moment leaves both naming complete checkpoints."""
    fsync_tree(tmp)
    write_manifest(tmp)
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
    """A complete checkpoint of this run (rotation, a re-save, --overwrite_output_dir): renamed out of sight
    first, so a half-deleted one never looks complete."""
    gone = d.with_name(d.name + ".deleting")
    os.replace(d, gone)
    shutil.rmtree(gone, ignore_errors=True)


# What training writes beside the checkpoints: its records, the curves, TensorBoard's events.
RUN_RECORDS = ("metrics.jsonl", "train_summary.json", "curves.png", "runs", "wandb", "trackers.json")


def clear_run(out_dir: Path) -> list[str]:
    """(rank 0, --overwrite_output_dir) The previous run's pointers, complete checkpoints and records go, so that
    nothing of it (an O/best, metrics.jsonl lines, curves) passes for the new run's; anything else in the
    directory (data, notes, a runs/ or wandb/ folder our trackers did not make) stays. Pointers first: a kill
    midway never leaves one naming a removed checkpoint. Returns the names removed."""
    from signllava.trackers import TRACKER_FOLDERS, owned_folders
    out_dir = Path(out_dir)
    ours = owned_folders(out_dir)           # read before trackers.json itself goes
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
        if name in TRACKER_FOLDERS and name not in ours:
            continue                        # a runs/ or wandb/ our trackers did not make: the user's
        if path.exists():
            remove_leftover(path)
            gone.append(name)
    return gone


def write_state(d: Path, state: dict):
    # In place: d is a checkpoint-N.tmp being built.
    with open(d / STATE_NAME, "w") as f:
        json.dump(state, f, indent=1)


def read_state(d: Path) -> dict:
    return json.loads((d / STATE_NAME).read_text())


def leftovers(out_dir: Path) -> list[Path]:
    """What an interrupted save or deletion leaves behind: `checkpoint-N.tmp`, `*.deleting`, and the temporaries
    of atomic writes (`.latest.<random>.tmp`, ...; `latest.tmp` from before they had random names). Only ever
    called by the run that holds the folder's lock, so none of them can be another live process's."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(d for d in out_dir.iterdir()
                  if (d.name.startswith("checkpoint-") and d.name.endswith((".tmp", ".deleting")))
                  or d.name == "latest.tmp" or is_temporary(d.name))


def remove_leftover(path: Path):
    """One of `leftovers` (ours, under the run lock), or the .tmp of a save that just failed."""
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
