"""One run per output folder: OUTPUT_DIR/run.lock, held by rank 0 for the whole life of the run.

Two processes writing one run would undo each other: a second start removes the first one's `checkpoint-N.tmp`
as "left by an interrupted save" while the first is still writing it. So a training run takes an exclusive
`flock` on OUTPUT_DIR/run.lock before it touches anything there, and keeps it until it exits. The file says
who holds it (pid, host, start time), for the one-line error a second start gets. The kernel drops the lock
when its process dies, however it dies, so a lock left by a killed run is recognised by simply being free:
the next run takes it over (and logs whose it was). No polling, no pid guessing.
"""
from __future__ import annotations

import fcntl
import logging
import os
import socket
import time
from pathlib import Path

from signllava.errors import RunError

log = logging.getLogger("signllava")
LOCK_NAME = "run.lock"
_HOLDER_BYTES = 300                 # the most of a lock file ever read (someone else may have written it)


class RunLock:
    """The held lock; released by `release()` or when the process ends."""

    def __init__(self, path: Path, fd: int):
        self.path, self._fd = path, fd

    def release(self):
        if self._fd is not None:
            os.close(self._fd)          # closing the descriptor drops the flock
            self._fd = None


def _holder(fd: int) -> str:
    text = os.pread(fd, _HOLDER_BYTES, 0).decode("utf-8", "replace")
    return " ".join(text.split())[:200]


def hold(out_dir: Path) -> RunLock:
    """Take OUTPUT_DIR's lock, or a RunError naming the live process that holds it."""
    path = Path(out_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunError(f"{path}: cannot create the run's lock file ({e.strerror or e})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if isinstance(e, BlockingIOError):
            raise RunError(f"{out_dir}: another run is using this output folder ({holder or 'its holder did not say who'}); "
                           f"wait for it to end, or give another --output_dir") from None
        raise RunError(f"{path}: cannot lock the output folder ({e.strerror or e}); a file system without locks "
                       f"cannot tell two runs apart") from None
    stale = _holder(fd)
    if stale:
        log.info("%s: taken over from %s, which is no longer running", path, stale)
    me = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode(), 0)
    return RunLock(path, fd)
