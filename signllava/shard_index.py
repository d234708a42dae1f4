"""One modality's clip index as compact arrays, and its cache beside the data.

At YouTube-ASL size (about 600 k clips, four modalities) walking every h5 group at start-up costs minutes
per rank, and a dict of (video, clip) tuples per modality costs gigabytes. A `ClipIndex` is two arrays
instead: the sorted keys `video NUL clip` as UTF-8 bytes and the clips' frame counts, so looking up
every annotated clip is one vectorised binary search, and "clip not in this modality" is frame count -1.

The cache is an .npz (loaded with allow_pickle=False: nothing in it can run code) written atomically
next to the metadata file. It is keyed on what cannot be kept by accident: the metadata file's content
(sha256), and for every shard it names its name, size, modification time, inode and status-change time --
the kernel sets the last on every write, rename and `touch -d`, and no tool sets it back, so a shard
rewritten to the same size with its modification time restored, or replaced by a copy, changes the key.
The arrays carry a digest over themselves and the key, so a cache edited to claim other frame counts is
rebuilt too. A cache whose key or digest differs, that cannot be read, or whose arrays are not what this
module writes, is rebuilt, never trusted; and what the loader reads is checked against the cached frame
count again (layout.FeatureStore.read). A folder we cannot write to simply goes without a cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from signllava.atomic import atomic_file

log = logging.getLogger("signllava")

FORMAT = 2          # bump when the arrays' meaning changes: older caches are then rebuilt
ABSENT = -1         # frame count of a clip the modality does not hold


def clip_key(video: str, clip: str) -> bytes:
    return f"{video}\0{clip}".encode("utf-8", "surrogateescape")


def clip_keys(pairs: Iterable[tuple[str, str]]) -> np.ndarray:
    """The keys of (video, clip) pairs as one fixed-width bytes array (a NUL never ends one: it ends in the clip name)."""
    return np.array([clip_key(v, c) for v, c in pairs], dtype=np.bytes_)


@dataclass(frozen=True)
class ClipIndex:
    keys: np.ndarray        # bytes, sorted, unique: b"video\0clip"
    frames: np.ndarray      # int32, frames[i] = first dim of the array under keys[i] (0 for a scalar)

    @classmethod
    def from_pairs(cls, keys: list[bytes], frames: list[int]) -> ClipIndex:
        k = np.array(keys, dtype=np.bytes_)
        f = np.asarray(frames, dtype=np.int32)
        order = np.argsort(k, kind="stable")
        return cls(k[order], f[order])

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Frame counts of `keys` (from clip_keys), ABSENT where this modality lacks the clip."""
        out = np.full(len(keys), ABSENT, dtype=np.int32)
        if len(self.keys) == 0 or len(keys) == 0:
            return out
        pos = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        hit = self.keys[pos] == keys
        out[hit] = self.frames[pos[hit]]
        return out


def fingerprint(metadata: Path, shards: list[Path]) -> str:
    """What a cache built from these files is valid for: the metadata file's content, and each shard's name,
    size, modification time, inode and status-change time (ns)."""
    rows = [[metadata.name, hashlib.sha256(metadata.read_bytes()).hexdigest()]]
    for p in shards:
        st = p.stat()
        rows.append([p.name, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns])
    return json.dumps(rows)


def digest(key: str, keys: np.ndarray, frames: np.ndarray) -> str:
    """A cache's arrays and key as one hash: an edit to any of them that does not redo it is seen."""
    h = hashlib.sha256(key.encode())
    for a in (keys, frames):
        h.update(str(a.dtype).encode() + str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def cache_path(metadata: Path) -> Path:
    stem = metadata.name[:-len(".json")] if metadata.name.endswith(".json") else metadata.name
    return metadata.with_name(f".{stem}.index.npz")


def load_cached(path: Path, key: str) -> ClipIndex | None:
    """The cached index if it exists, is intact and was built from files with fingerprint `key`."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["format"]) != FORMAT or str(z["fingerprint"]) != key:
                log.info("%s: stale (the data changed since it was written); rebuilding", path)
                return None
            keys, frames, sealed = z["keys"], z["frames"], str(z["digest"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile) as e:    # TypeError: a field of another shape
        log.warning("%s: unreadable index cache (%s); rebuilding", path, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    ok = (keys.ndim == 1 and keys.dtype.kind == "S" and frames.shape == keys.shape and frames.dtype == np.int32
          and bool((frames >= 0).all()) and bool((keys[1:] > keys[:-1]).all()))
    if not ok:
        log.warning("%s: index cache is not in the expected form; rebuilding", path)
        return None
    if sealed != digest(key, keys, frames):
        log.warning("%s: index cache does not match its digest (edited?); rebuilding", path)
        return None
    return ClipIndex(keys, frames)


def save_cache(path: Path, key: str, index: ClipIndex) -> bool:
    """Write atomically (signllava/atomic.py); False if the folder is not writable."""
    try:
        with atomic_file(path, "wb") as f:
            np.savez(f, format=np.int64(FORMAT), fingerprint=np.str_(key), keys=index.keys, frames=index.frames,
                     digest=np.str_(digest(key, index.keys, index.frames)))
        return True
    except OSError as e:
        log.info("%s: index cache not written (%s); the next start indexes the shards again", path, e.strerror or e)
        return False


def cached_index(metadata: Path, files: list[Path], build: Callable[[], ClipIndex]) -> ClipIndex:
    """The index of `files` from the cache next to `metadata`, or built (and cached) when there is none valid.
    The fingerprint is taken before building, so files changed while we read them make the cache stale."""
    path = cache_path(metadata)
    key = fingerprint(metadata, files)
    index = load_cached(path, key)
    if index is None:
        index = build()
        save_cache(path, key, index)
    return index
