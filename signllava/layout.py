"""The on-disk layout of a Sign LLaVA dataset, read unchanged.

    D/annotation.<split>.json          {video: {"clip_order": [...], clip: {"translation", "paraphrases", "keywords"}}}
    D/<modality>/<name>.<split>.json   {video: shard}              (usually metadata_<modality>.<split>.json)
    D/<modality>/<shard file>          h5[video][clip] = float16 [T, D]

The shard file name follows the original's rule: the metadata file name with `metadata_` removed and
`.json` replaced by `.<shard>.h5`. Unlike the original we apply it to the file name only, so folder names
that happen to contain `metadata_` or `.json` are left alone, and `data_dir` is joined exactly once.

Everything that can go wrong with user files raises `DataError`, whose message is one line naming the
file and, where there is one, the video and clip. The CLIs print it without a traceback.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from signllava.errors import DataError, brief
from signllava.frames import cap_frames
from signllava.shard_index import ClipIndex, cache_path, cached_index

# The original's splice order; modalities we do not know follow alphabetically.
KNOWN_MODALITY_ORDER = ("mae", "sign2vec", "dino", "pose")
SPLITS = ("train", "dev", "test")


def where(path, video=None, clip=None) -> str:
    parts = [str(path)]
    if video is not None:
        parts.append(f"video {video!r}")
    if clip is not None:
        parts.append(f"clip {clip!r}")
    return ", ".join(parts)


def read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: malformed JSON ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None


def is_text(s: str) -> bool:
    """Whether `s` can be written as UTF-8 (JSON's \\ud800 escapes give strings with lone surrogates, which no
    tokenizer, h5 name or output file takes)."""
    try:
        s.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def natural_key(name: str):
    """'x_10' sorts after 'x_2': split into text and integer runs."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ----------------------------------------------------------------------------------------- annotations
@dataclass(slots=True)        # no per-instance __dict__: a few hundred thousand of these are held
class ClipText:
    translation: str
    paraphrases: list[str]
    keywords: list[str]
    hypothesis: str | None = None


@dataclass
class Annotation:
    path: Path
    videos: dict[str, list[str]]                       # video -> clip names in time order
    clips: dict[tuple[str, str], ClipText]
    resorted_videos: int = 0                           # videos whose clip_order we natural-sorted
    faults: list[str] = field(default_factory=list)    # filled only when read with collect_faults


def _all_text(value) -> bool:
    """A string, or list of them, writable as UTF-8 (anything else is checked, or dropped, by the caller)."""
    items = value if isinstance(value, list) else [value]
    return all(is_text(x) for x in items if isinstance(x, str))


def as_list(value) -> list | None:
    """An annotation's paraphrases / keywords as a list: a lone string is one item (iterated, it would become
    single letters), null or NaN none; anything else that is not a list is None (a fault)."""
    if value is None or (isinstance(value, float) and value != value):     # null, or pandas' NaN for "none"
        return []
    if isinstance(value, str):
        return [value]
    return value if isinstance(value, list) else None


def clean_paraphrases(items) -> list[str]:
    """Real paraphrase lists hold '<none>', '' and NaN placeholders; they are not sentences."""
    out = []
    for p in as_list(items) or []:
        if isinstance(p, str) and p.strip() and p.strip() != "<none>":
            out.append(p.strip())
    return out


def load_annotation(path: Path, collect_faults: bool = False) -> Annotation:
    """Read and validate one annotation file. With collect_faults, bad clips are listed in
    `.faults` and skipped instead of raising on the first one (used by the data checker)."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path}: malformed annotation (top level must be an object video -> clips)")
    ann = Annotation(path=path, videos={}, clips={})

    def fault(msg):
        if not collect_faults:
            raise DataError(msg)
        ann.faults.append(msg)

    for video, vd in raw.items():
        if not is_text(video):
            fault(f"{where(path, video)}: video name is not valid Unicode (a lone surrogate)")
            continue
        if not isinstance(vd, dict) or not isinstance(vd.get("clip_order"), list):
            fault(f"{where(path, video)}: malformed annotation (needs a 'clip_order' list)")
            continue
        order = [str(c) for c in vd["clip_order"]]
        ok_order = []
        for clip in order:
            cd = vd.get(clip)
            if not is_text(clip):
                fault(f"{where(path, video, clip)}: clip name is not valid Unicode (a lone surrogate)")
                continue
            if not isinstance(cd, dict):
                fault(f"{where(path, video, clip)}: named in clip_order but has no annotation")
                continue
            tr = cd.get("translation")
            if not isinstance(tr, str) or not tr.strip():
                fault(f"{where(path, video, clip)}: empty or missing translation")
                continue
            bad_text = [k for k in ("translation", "paraphrases", "keywords", "hypothesis") if not _all_text(cd.get(k))]
            if bad_text:
                fault(f"{where(path, video, clip)}: {', '.join(bad_text)} not valid Unicode (a lone surrogate)")
                continue
            not_lists = [k for k in ("paraphrases", "keywords") if as_list(cd.get(k)) is None]
            if not_lists:
                fault(f"{where(path, video, clip)}: {' and '.join(not_lists)} must be a list of strings, got "
                      f"{brief(cd.get(not_lists[0]), 40)}")
                continue
            kws = as_list(cd.get("keywords"))
            hyp = cd.get("hypothesis")
            ann.clips[(video, clip)] = ClipText(
                translation=tr.strip(),
                paraphrases=clean_paraphrases(cd.get("paraphrases")),
                keywords=list(dict.fromkeys(k.strip() for k in kws if isinstance(k, str) and k.strip())),
                hypothesis=hyp if isinstance(hyp, str) else None)
            ok_order.append(clip)
        # clip_order is the only source of time order. How2Sign's lists are in plain text order
        # (_10 before _2), which scrambles context; if names end in numbers and the list is exactly
        # the lexicographic order of names that sort differently by number, sort naturally.
        if ok_order == sorted(ok_order) and all(re.search(r"\d", c) for c in ok_order):
            nat = sorted(ok_order, key=natural_key)
            if nat != ok_order:
                ok_order = nat
                ann.resorted_videos += 1
        ann.videos[video] = ok_order
    return ann


# ----------------------------------------------------------------------------------------- features
def find_metadata(mod_dir: Path, split: str) -> Path | None:
    """The metadata file of one split in a modality folder: `*.<split>.json`, preferring metadata_*."""
    cands = sorted(mod_dir.glob(f"*.{split}.json"))
    if not cands:
        return None
    pref = [c for c in cands if c.name.startswith("metadata_")]
    if len(pref) == 1:
        return pref[0]
    if len(cands) == 1:
        return cands[0]
    raise DataError(f"{mod_dir}: several metadata files for split {split!r}: {', '.join(c.name for c in cands)}")


def shard_path(metadata: Path, shard) -> Path:
    name = metadata.name.replace("metadata_", "")
    assert name.endswith(".json")
    return metadata.with_name(f"{name[:-len('.json')]}.{shard}.h5")


def discover_modalities(data_dir: Path, split: str, skip: set[str] = frozenset()) -> dict[str, Path]:
    """Every sub-folder with a metadata file for `split` is a modality, named after the folder (folders named in
    `skip`, whose metadata is given explicitly, are not looked into)."""
    found = {}
    for sub in sorted(p for p in data_dir.iterdir() if p.is_dir() and p.name not in skip):
        meta = find_metadata(sub, split)
        if meta is not None:
            found[sub.name] = meta
    return dict(sorted(found.items(), key=lambda kv: modality_rank(kv[0])))


def modality_rank(m: str):
    return (KNOWN_MODALITY_ORDER.index(m), "") if m in KNOWN_MODALITY_ORDER else (len(KNOWN_MODALITY_ORDER), m)


def parse_metadata(raw, path: Path, on_fault=None) -> tuple[dict[str, str], set[str]] | None:
    """A metadata file's content -> (video -> shard as text, videos with a malformed entry).
    Raises DataError at the first fault, or, given `on_fault`, reports every fault through it and
    returns None when the file as a whole is unusable."""
    def fault(msg):
        if on_fault is None:
            raise DataError(msg)
        on_fault(msg)
    if not isinstance(raw, dict):
        fault(f"{path}: malformed metadata (must be an object video -> shard)")
        return None
    out, bad = {}, set()
    for video, shard in raw.items():
        if not is_text(video):
            fault(f"{where(path, video)}: video name is not valid Unicode (a lone surrogate)")
            bad.add(video)
            continue
        if not isinstance(shard, (int, str)) or isinstance(shard, bool):
            fault(f"{where(path, video)}: malformed metadata (shard must be an int or string, got {brief(shard, 40)})")
            bad.add(video)
            continue
        # The shard goes into a file name beside the metadata file: a separator would leave the folder.
        if isinstance(shard, str) and (not shard or not is_text(shard) or any(ch in shard for ch in "/\\\0")):
            fault(f"{where(path, video)}: malformed metadata (shard {brief(shard, 40)} is not a plain name: it must "
                  f"not be empty or hold a path separator)")
            bad.add(video)
            continue
        out[video] = str(shard)
    return out, bad


def open_shard(path: Path, metadata: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise DataError(f"{path}: shard file missing (named by {metadata})") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable or corrupt h5 file ({e})") from None


def walk_video(h: h5py.File, path: Path, video: str, metadata: Path, keys: list, frames: list):
    """Append key and frame count of every array directly under h[video]. Uses h5py's low-level calls:
    the high-level objects cost three times the time and leave megabytes of garbage per thousand clips."""
    name = video.encode("utf-8", "surrogateescape")
    try:
        gid = h5py.h5o.open(h.id, name)
    except (KeyError, ValueError, OSError, RuntimeError):       # no such link, a dangling one, an empty name
        gid = None
    if not isinstance(gid, h5py.h5g.GroupID):
        raise DataError(f"{where(path, video)}: video placed in this shard by {metadata.name} but not in it")
    try:
        prefix = name + b"\0"
        for clip in gid:
            obj = h5py.h5o.open(gid, clip)
            if isinstance(obj, h5py.h5d.DatasetID):
                shape = obj.shape
                if shape and shape[0] > MAX_INDEXED_FRAMES:
                    raise DataError(f"{where(path, video, clip.decode('utf-8', 'replace'))}: {shape[0]:,} frames, more "
                                    f"than any clip can have (the index holds up to {MAX_INDEXED_FRAMES:,})")
                keys.append(prefix + clip)
                frames.append(shape[0] if shape else 0)
    except (KeyError, ValueError, OSError, RuntimeError) as e:
        raise DataError(f"{where(path, video)}: unreadable ({e})") from None


MAX_INDEXED_FRAMES = int(np.iinfo(np.int32).max)       # the index's frame counts are int32


def walk_shard(job: tuple[Path, list[str], Path]) -> tuple[list[bytes], list[int]]:
    """Keys and frame counts of the given videos of one shard (opened, walked, closed)."""
    path, videos, metadata = job
    keys: list[bytes] = []
    frames: list[int] = []
    with open_shard(path, metadata) as h:
        for video in videos:
            walk_video(h, path, video, metadata, keys, frames)
    return keys, frames


# A first start on a large split walks its shards in worker processes (h5py holds the GIL, so threads would
# not help): at YouTube-ASL size one process takes minutes. Small splits (tests, dev sets) stay in-process,
# where a process pool's start would cost more than the walk.
PARALLEL_WALK_MIN_VIDEOS = 2000
PARALLEL_WALK_MAX_WORKERS = 16


def map_shards(fn, jobs: list, videos: int) -> list:
    """fn over the shard jobs, in order: in a pool of processes ('forkserver': nothing of a training process's
    threads or CUDA state is forked) when there are several shards, several cores and at least
    PARALLEL_WALK_MIN_VIDEOS videos; in this process otherwise. A DataError in a worker is raised here."""
    workers = min(len(jobs), len(os.sched_getaffinity(0)), PARALLEL_WALK_MAX_WORKERS)
    if workers < 2 or videos < PARALLEL_WALK_MIN_VIDEOS:
        return [fn(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        return list(pool.map(fn, jobs))


class FeatureStore:
    """Per-modality sharded h5 features of one split.

    h5 handles are opened lazily on first read in the process that reads, and stay open. Handles never cross a
    fork: indexing leaves nothing open, make_loader (data.py) closes the parent's handles before DataLoader
    workers start, and a process that finds handles opened by another process (its parent) drops them
    without touching them and opens its own."""

    def __init__(self, modality: str, metadata: Path):
        self.modality = modality
        self.metadata = metadata
        self.video_shard, _ = parse_metadata(read_json(metadata), metadata)
        self._shard_files = sorted({shard_path(metadata, s) for s in set(self.video_shard.values())})
        self._handles: dict[str, h5py.File] = {}
        self._owner = os.getpid()          # the process that opened self._handles

    def shard_file(self, video: str) -> Path:
        return shard_path(self.metadata, self.video_shard[video])

    def shard_files(self) -> list[Path]:
        return list(self._shard_files)

    def check_files_present(self):
        for p in self.shard_files():
            if not p.is_file():
                raise DataError(f"{p}: shard file missing (named by {self.metadata})")

    def open_handles(self) -> int:
        return len(self._handles) if self._owner == os.getpid() else 0

    def _open(self, path: Path) -> h5py.File:
        if self._owner != os.getpid():    # inherited through a fork: not ours to use or close
            self._handles, self._owner = {}, os.getpid()
        h = self._handles.get(str(path))
        if h is None:
            h = open_shard(path, self.metadata)
            self._handles[str(path)] = h
        return h

    def index(self) -> ClipIndex:
        """Frame count of every clip the shards hold, from the cache beside the metadata file when it is
        current, else read from the h5 headers (each shard opened, walked and closed in turn)."""
        return cached_index(self.metadata, self.shard_files(), self._walk)

    def _walk(self) -> ClipIndex:
        by_shard: dict[str, list[str]] = {}
        for video, shard in self.video_shard.items():
            by_shard.setdefault(shard, []).append(video)
        jobs = [(shard_path(self.metadata, shard), videos, self.metadata) for shard, videos in by_shard.items()]
        keys, frames = [], []
        for k, f in map_shards(walk_shard, jobs, videos=len(self.video_shard)):
            keys += k
            frames += f
        return ClipIndex.from_pairs(keys, frames)

    def dim(self, video: str, clip: str) -> int:
        ds = self._dataset(video, clip)
        if ds.ndim != 2:
            raise DataError(f"{where(self.shard_file(video), video, clip)}: array of rank {ds.ndim}, expected [T, D]")
        return int(ds.shape[1])

    def _dataset(self, video: str, clip: str) -> h5py.Dataset:
        if video not in self.video_shard:
            raise DataError(f"{where(self.metadata, video)}: video not in this metadata file")
        path = self.shard_file(video)
        try:
            return self._open(path)[video][clip]
        except KeyError:
            raise DataError(f"{where(path, video, clip)}: clip not in shard") from None

    def read(self, video: str, clip: str, expected_dim: int | None = None, max_frames: int = 0,
             frame_cap: str = "stride", indexed_frames: int | None = None) -> np.ndarray:
        """One clip's [T, D] array, checked: rank 2, at least one frame, the modality's dim, floating point,
        finite. With `max_frames` only the frames that cap keeps are read from the shard (frames.cap_frames),
        never the whole clip; the header is checked before anything is read. `indexed_frames`: what the index
        says the clip holds; a shard that disagrees changed after it was indexed, and the batch plans built from
        the index no longer hold: an error, and the cache that said so is removed."""
        path = self.shard_file(video)
        ds = self._dataset(video, clip)
        try:
            if indexed_frames is not None and ds.shape and ds.shape[0] != indexed_frames:
                cache = cache_path(self.metadata)
                cache.unlink(missing_ok=True)          # ours, and wrong: the next start indexes the shards again
                raise DataError(f"{where(path, video, clip)}: {ds.shape[0]} frames in the shard, {indexed_frames} in "
                                f"the index: the shard changed after it was indexed (index cache {cache.name} removed; "
                                f"start again)")
            check_header(tuple(ds.shape), ds.dtype, path, video, clip, expected_dim)
            arr = cap_frames(ds, max_frames, frame_cap)
        except OSError as e:
            raise DataError(f"{where(path, video, clip)}: unreadable ({e})") from None
        return check_finite(arr, path, video, clip)

    def close(self):
        if self._owner == os.getpid():
            for h in self._handles.values():
                h.close()
        self._handles = {}

    def __getstate__(self):
        # Never ship open handles to another process; the receiver reopens lazily.
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


def check_header(shape: tuple, dtype, path, video, clip, expected_dim: int | None):
    """What an array's shape and dtype say is wrong with it, as a DataError (nothing of its values read)."""
    loc = where(path, video, clip)
    if len(shape) != 2:
        raise DataError(f"{loc}: array of rank {len(shape)} (shape {shape}), expected [T, D]")
    if shape[0] == 0:
        raise DataError(f"{loc}: clip has zero frames")
    if expected_dim is not None and shape[1] != expected_dim:
        raise DataError(f"{loc}: feature dim {shape[1]}, expected {expected_dim} like the rest of this modality")
    if not np.issubdtype(dtype, np.floating):
        raise DataError(f"{loc}: dtype {dtype}, expected floating point")


def check_finite(arr: np.ndarray, path, video, clip) -> np.ndarray:
    if not np.isfinite(arr).all():
        bad = int((~np.isfinite(arr)).sum())
        raise DataError(f"{where(path, video, clip)}: {bad} non-finite values (NaN/Inf)")
    return arr

