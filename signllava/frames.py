"""--max_frames: which frames a cap keeps, taken from an in-memory array or straight from an h5 dataset.

A clip's array in a shard can be of any length (a 316 KB gzip shard can hold a (2,000,000, 768) clip of
zeros), so the loader never reads a clip whole to cap it afterwards: `cap_frames` slices the h5 dataset
itself and reads only the rows the cap keeps (truncate: the first ones; stride: evenly spaced ones), or, for
pool, every row in blocks of at most READ_BYTES, summed window by window. An in-memory array goes through
the same code (numpy arrays slice like h5 datasets), so both give the same frames.
"""
from __future__ import annotations

import numpy as np

READ_BYTES = 64 << 20            # pool reads a clip in blocks of at most this many bytes
# No sentence-level sign-language clip comes near this (about 55 minutes at 30 fps): a longer one is broken
# data, and reading it uncapped would cost gigabytes. The checker flags such clips; the loader refuses them
# unless --max_frames caps what is read.
PLAUSIBLE_FRAMES = 100_000


def stride_index(t: int, n: int) -> np.ndarray:
    """n evenly spaced frame indices of t > n frames: increasing and distinct (their spacing is over 1)."""
    return np.linspace(0, t - 1, n).round().astype(np.int64)


def cap_frames(arr, max_frames: int, mode: str) -> np.ndarray:
    """At most max_frames frames of `arr` (a [T, D] numpy array or h5py dataset): the first ones (truncate),
    evenly spaced ones (stride), or the means of max_frames consecutive windows of near-equal size (pool:
    every frame counts, none is dropped). From a dataset only what the cap needs is read."""
    t = arr.shape[0]
    if max_frames <= 0 or t <= max_frames:
        return arr[()]
    if mode == "truncate":
        return arr[:max_frames]
    if mode == "pool":
        return _pool(arr, max_frames)
    return arr[stride_index(t, max_frames)]


def _pool(arr, n: int) -> np.ndarray:
    """Window means over t > n frames, read a block at a time. In each block, np.add.reduceat sums the parts
    of the windows it holds; a window that crosses a block's end is finished in the next block."""
    t, rest = arr.shape[0], tuple(arr.shape[1:])
    starts = np.linspace(0, t, n + 1).astype(np.int64)        # window j: frames [starts[j], starts[j + 1])
    block = max(1, READ_BYTES // max(1, int(np.prod(rest)) * arr.dtype.itemsize))
    sums = np.zeros((n, *rest), np.float32)
    a, k = 0, 0                                 # the block's first frame, the window holding it
    while a < t:
        b = min(t, a + block)
        j = int(np.searchsorted(starts, b, side="left"))      # windows k..j-1 begin before b
        cuts = np.maximum(starts[k:j], a) - a
        sums[k:j] += np.add.reduceat(np.asarray(arr[a:b], dtype=np.float32), cuts, axis=0)
        k = j if starts[j] == b else j - 1
        a = b
    return (sums / np.diff(starts).reshape(-1, *[1] * len(rest))).astype(arr.dtype)
