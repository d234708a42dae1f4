"""The user's mistakes, as opposed to our bugs, and faults that stop a run: each is one line naming the file
(video, clip), batch or flag, printed as `error: ...` with exit status 2 instead of a traceback."""
from __future__ import annotations

import logging
import reprlib
import sys
from typing import Callable


class DataError(Exception):
    """A fault in the user's data. str(err) is a single line naming file / video / clip."""


class CheckpointError(Exception):
    """A checkpoint or projector file that does not fit the model; one line, naming the file."""


class RunError(Exception):
    """A run that cannot go on (out of memory, non-finite losses, a failed save): one line saying what
    happened, which batch or file, and what to change; the last complete checkpoint is left as it was."""


def run_command(main: Callable[[], int]) -> int:
    """Run a command's body with the house's logging; a user error becomes one line and exit status 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return main()
    except (DataError, CheckpointError, RunError) as e:
        print(f"error: {message(e)}", file=sys.stderr)
        return 2


def message(e: Exception) -> str:
    """The error's own line. A DataLoader worker's error reaches the main process re-raised by torch as the same
    type with the worker's whole traceback for its message ("Caught DataError in DataLoader worker process 0.
    Original Traceback ..."), whose last line is the original `module.Type: message`."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(f"{type(e).__module__}.{type(e).__name__}: ") else last


def range_problems(args, at_least_one=(), non_negative=()) -> list[str]:
    """Flags out of range, each as `--name must be ...` (a flag left at None is not checked)."""
    problems = [f"--{n} must be >= 1" for n in at_least_one if getattr(args, n) is not None and getattr(args, n) < 1]
    return problems + [f"--{n} must be >= 0" for n in non_negative if (getattr(args, n) or 0) < 0]


def brief(value, limit: int = 80) -> str:
    """repr(value) for a message: at most `limit` characters, built from a few items of a container however large
    it is (a YAML value of nested aliases expands to millions; a full repr of it took gigabytes)."""
    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 4, 4, 4, 4
    r.maxstring = r.maxother = r.maxlong = limit
    text = r.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."
