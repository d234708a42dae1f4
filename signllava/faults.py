"""Faults in the middle of a run, told in one line: which batch (its clips and tokens) or which file, and
the flag that fixes it. training.py decides what happens (skip a step, stop the run); this says it."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch

from signllava.errors import RunError

SHOWN_CLIPS = 12          # a message names at most this many clips, then how many more


def clip_list(clips: list[str]) -> str:
    more = f" and {len(clips) - SHOWN_CLIPS} more" if len(clips) > SHOWN_CLIPS else ""
    return ", ".join(clips[:SHOWN_CLIPS]) + more


def batch_clips(batch: dict) -> list[str]:
    return [m["clip"] for m in batch["meta"]]


def oom_fixes(args, n_clips: int, tokens: int, training: bool) -> str:
    """The flags that make a batch like this one fit."""
    if not training:
        return f"a smaller --eval_batch_size (now {args.eval_batch_size})"
    if args.max_tokens_per_batch:
        fixes = [f"a smaller --max_tokens_per_batch (now {args.max_tokens_per_batch})"]
    else:
        fixes = [f"--max_tokens_per_batch {max(1, tokens // 2)} (batches cut by tokens, not --batch_size "
                 f"{args.batch_size})"]
    if not args.gradient_checkpointing:
        fixes.append("--gradient_checkpointing")
    if n_clips == 1:
        fixes.append("--max_frames (this clip alone is too long)")
    return " or ".join(fixes)


@contextlib.contextmanager
def out_of_memory_named(batch: dict, args, where: str, training: bool = True):
    """A CUDA out-of-memory error inside becomes one line naming the batch and the flags that fit it."""
    try:
        yield
    except torch.OutOfMemoryError:
        clips = batch_clips(batch)
        tokens = int(batch["attention_mask"].sum())
        raise RunError(f"{where}: out of GPU memory on a batch of {len(clips)} clips, {tokens} tokens "
                       f"({clip_list(clips)}); make it fit with {oom_fixes(args, len(clips), tokens, training)}") from None


WRITER_ERRORS = ("PytorchStreamWriter", "file write failed", "inline_container", "iostream error")


def write_failure(e: BaseException, directory: Path) -> str | None:
    """Why a checkpoint write into `directory` failed, if `e` (or an error it arose from) is the file system
    refusing it: an OSError (permissions, read-only, full), torch.save's stream-writer errors (a full disk
    gives `basic_ios::clear: iostream error`, then `unexpected pos`), safetensors' I/O error. None otherwise."""
    chain = []
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    os_error = next((x for x in chain if isinstance(x, OSError)), None)
    writer = [x for x in chain if (isinstance(x, RuntimeError) and any(m in str(x) for m in WRITER_ERRORS))
              or (type(x).__name__ == "SafetensorError" and ("Io" in str(x) or "I/O error" in str(x)))]
    if os_error is None and not writer:
        return None
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    if free is not None and free < 2**20:
        return f"no space left on the device of {directory}: {free} bytes free"
    if os_error is not None:
        return f"{os_error.strerror or os_error}{f': {os_error.filename}' if os_error.filename else ''}"
    return str(writer[-1]).strip().splitlines()[0]
