"""Files and folders that are complete or absent, and output paths checked before any work.

Every file this project writes for the user (checkpoint pointers, generate.py's JSON, metrics and report,
the run's args.yaml, summary and curves, the index cache, export's folder) goes through here: it is written
to a hidden temporary sibling `.<name>.<random>.tmp`, flushed and synced, then renamed over the target, so a
kill or a full disk at any moment leaves either the old file or the new one, never half of one. A failed
write removes its temporary and leaves the target as it was. Temporary names are unique (mkstemp/mkdtemp):
nothing of the user's, such as a file called `X.tmp`, is ever overwritten or removed in passing.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator

# A temporary sibling made here: `.` + the target's name + `.` + mkstemp's random part + `.tmp`.
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()       # what open() would give a new file (mkstemp's are 0600)


def is_temporary(name: str) -> bool:
    """A name this module gives its temporaries (what a kill mid-write can leave behind)."""
    return bool(_TEMPORARY.match(name))


def _target(path: Path) -> Path:
    """The file a write replaces: through a symbolic link to what it names, so the link itself stays."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _fsync_dir(d: Path):
    """Make a rename inside `d` durable (not every file system supports it on a directory)."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """A file object to write `path` through: the target is replaced only when the block ends without error."""
    path = _target(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": encoding})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_atomic(path: str | Path, data: str | bytes, encoding: str = "utf-8"):
    """`path` := data, complete or not at all."""
    with atomic_file(path, "wb" if isinstance(data, bytes) else "w", encoding) as f:
        f.write(data)


def fsync_tree(d: Path):
    for root, _, files in os.walk(d):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def temporary_dir(final: Path) -> Path:
    """A fresh, hidden, uniquely named sibling of `final` to build a whole folder in (see replace_dir)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


@contextlib.contextmanager
def building_dir(final: Path) -> Iterator[Path]:
    """A temporary sibling of `final` (temporary_dir) to build a whole folder in, removed if the block fails;
    the block ends with replace_dir(tmp, final, ...) to put it in place."""
    tmp = temporary_dir(final)
    try:
        yield tmp
    except BaseException:
        remove_tree(tmp)
        raise


def replace_dir(tmp: Path, final: Path, replace_existing: bool = False):
    """Put the finished folder `tmp` (from temporary_dir) in place of `final`: absent or an empty folder, or,
    with `replace_existing`, a folder the caller has decided may go (otherwise that is an OSError and nothing
    moves). Synced first. A folder in the way is renamed aside to a hidden sibling before `tmp` takes its
    name, and only then removed, so `final` never holds a mix of old and new; a kill between the two renames
    leaves both hidden siblings and no `final`, never half of either."""
    fsync_tree(tmp)
    aside = None
    if replace_existing and final.is_dir() and any(final.iterdir()):
        aside = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
        os.replace(final, aside)           # onto the empty folder mkdtemp made: rename(2) allows that
    os.replace(tmp, final)                 # onto an absent or empty `final` (a full one: ENOTEMPTY)
    _fsync_dir(final.parent)
    if aside is not None:
        # What the caller agreed to replace (a previous export, or --overwrite), now out of sight.
        shutil.rmtree(aside, ignore_errors=True)


def remove_tree(path: Path):
    """Remove a temporary folder of ours (a failed build), quietly."""
    shutil.rmtree(path, ignore_errors=True)


def output_problem(path: str | Path, flag: str) -> str | None:
    """Why `flag PATH` cannot take a file written here, found before any work is done: it is a folder, a
    parent on its way is a file, or the folder that would hold it cannot be written. None if it can."""
    p = Path(path)
    if p.is_dir():
        return f"{flag} {p}: is a directory (give a file name)"
    if p.exists() and not os.access(p, os.W_OK):
        return f"{flag} {p}: exists and is read-only"
    why = parent_problem(p)
    return f"{flag} {p}: {why}" if why else None


def outputs_problems(outputs: list[tuple[str, str]], inputs: list[tuple[str, str]] = ()) -> list[str]:
    """output_problem of every (flag, path) a command will write, checked before its work, plus two flags that
    name one file, and an output that names one of the command's inputs, given as (what it is, path): writing it
    would destroy what is read."""
    problems = [why for why in (output_problem(value, flag) for flag, value in outputs) if why]
    read = {os.path.realpath(value): what for what, value in inputs}
    first: dict[str, str] = {}
    for flag, value in outputs:
        where = os.path.realpath(value)
        if where in read:
            problems.append(f"{flag} {value}: is {read[where]}, which this would overwrite")
        same = first.setdefault(where, flag)
        if same != flag:
            problems.append(f"{same} and {flag} name the same file ({value})")
    return problems


def parent_problem(p: Path) -> str | None:
    """Why nothing can be created at `p` (a file or a folder): the nearest existing folder on its way is a
    file, a broken link, or not writable. Missing folders in between are fine (they are created)."""
    parent = Path(p).parent
    while not parent.exists():
        if parent.is_symlink():             # a dangling link on the way
            return f"{parent} is a broken symbolic link"
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write in {parent} (permission denied)"
    return None
