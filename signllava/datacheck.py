"""The data checker: `python data.py --data_dir D [--split S ...] [--modalities a,b] [--annotation_file A]
[--features m=PATH]`.

Reads every annotation, metadata file and h5 clip of a dataset in the layout of layout.py (or at the paths
data_paths.py names) and prints
a summary (clips per split; per modality the dim and frames min / median / max; clips left out
because a modality lacks them). Every fault is printed as one line

    FAULT: <file>[, video '<v>'][, clip '<c>']: <what is wrong>

and the checker keeps going, so one run lists them all; the exit status is 1 if there was any.
Warnings (`WARNING: ...`) do not change the exit status: a clip that one modality lacks (training
leaves it out), problems in h5 clips that no annotation uses (training never reads them), a modality
that only some splits have.

It streams: per modality it first reads the h5 headers of every clip (shape and dtype only; the dim
of a modality is the most common one in the split, ties to the first seen), then reads the arrays
one at a time, in chunks of frames, to look for NaN / Inf. Summary and faults go to stdout, the
progress bars to stderr.
"""
from __future__ import annotations

import statistics
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from signllava.frames import PLAUSIBLE_FRAMES
from signllava.data_paths import DataPaths
from signllava.layout import (SPLITS, DataError, find_metadata, load_annotation, modality_rank, natural_key, parse_metadata,
                    read_json, shard_path, where)

CHUNK_BYTES = 64 << 20        # finite check reads at most this much of one array at a time
MAX_LISTED = 20               # per-clip warnings printed per split and modality before "... and N more"


def _one_line(msg) -> str:
    return " ".join(str(msg).split())


def _n(k: int, word: str) -> str:
    return f"{k} {word}{'' if k == 1 else 's'}"


def _names(items, n=3) -> str:
    items = list(items)
    shown = ", ".join(repr(x) for x in items[:n])
    return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


class Report:
    def __init__(self):
        self.faults = 0
        self.warnings = 0

    def _out(self, line: str):
        tqdm.write(line, file=sys.stdout)   # clears and redraws any progress bar around the line
        sys.stdout.flush()

    def fault(self, msg):
        self.faults += 1
        self._out(f"FAULT: {_one_line(msg)}")

    def warn(self, msg):
        self.warnings += 1
        self._out(f"WARNING: {_one_line(msg)}")

    def info(self, msg=""):
        self._out(msg)


@dataclass
class ModalitySummary:
    name: str
    metadata: Path
    dim: int | None = None
    frames: list[int] = field(default_factory=list)  # frame counts of good clips the annotation uses
    arrays: int = 0                                  # h5 datasets read
    present: set = field(default_factory=set)        # (video, clip) the shards hold
    broken_videos: set = field(default_factory=set)  # videos whose shard is missing/corrupt or lacks them


@dataclass
class SplitSummary:
    name: str
    videos: int = 0
    clips: int = 0
    usable: int | None = 0                           # None: unknown, a modality's metadata is unusable
    annotation_ok: bool = False
    resorted: int = 0
    found: list[str] = field(default_factory=list)   # modality folders with a metadata file for this split
    modalities: list[ModalitySummary] = field(default_factory=list)


def _read_json(path: Path, rep: Report):
    try:
        return read_json(path)
    except DataError as e:
        rep.fault(e)
    except OSError as e:                       # permission denied, a directory, I/O error
        rep.fault(f"{path}: unreadable ({e.strerror or e})")
    return None


# ----------------------------------------------------------------------------------------- modality
def _read_metadata(meta: Path, rep: Report) -> tuple[dict[str, str], set[str]] | None:
    """(video -> shard, videos with a malformed entry), or None if the file is unusable."""
    raw = _read_json(meta, rep)
    return None if raw is None else parse_metadata(raw, meta, on_fault=rep.fault)


def _count_nonfinite(ds: h5py.Dataset) -> tuple[int, int]:
    """(number of non-finite values, first frame holding one), reading CHUNK_BYTES at a time."""
    t, d = ds.shape
    step = max(1, CHUNK_BYTES // max(1, d * ds.dtype.itemsize))
    bad, first = 0, -1
    for i in range(0, t, step):
        fin = np.isfinite(ds[i:i + step])
        if not fin.all():
            rows = np.nonzero(~fin.all(axis=1))[0]
            if first < 0:
                first = i + int(rows[0])
            bad += fin.size - int(np.count_nonzero(fin))
    return bad, first


def check_modality(split: str, name: str, meta: Path, annotated: set | None, rep: Report) -> ModalitySummary | None:
    """Check one modality of one split; `annotated` is the set of (video, clip) the annotation uses
    (None when the annotation could not be read: then every clip counts as used)."""
    md = _read_metadata(meta, rep)
    if md is None:
        return None
    video_shard, bad_videos = md
    ms = ModalitySummary(name, meta, broken_videos=set(bad_videos))
    by_shard: dict[str, list[str]] = {}
    for video, shard in video_shard.items():
        by_shard.setdefault(shard, []).append(video)
    handles = _open_shards(meta, by_shard, ms, rep)
    try:
        headers = _read_headers(meta, by_shard, handles, ms, rep)
        dims = Counter(shape[1] for _, _, _, shape, _ in headers if len(shape) == 2)
        ms.dim = dims.most_common(1)[0][0] if dims else None
        _check_arrays(split, name, meta, headers, handles, annotated, ms, rep)
    finally:
        for h in handles.values():
            try:
                h.close()
            except Exception:  # noqa: BLE001
                pass
    return ms


def _open_shards(meta: Path, by_shard: dict[str, list[str]], ms: ModalitySummary, rep: Report) -> dict[str, h5py.File]:
    """Every shard the metadata names that opens; the videos of the others are broken."""
    handles: dict[str, h5py.File] = {}
    for shard in sorted(by_shard, key=natural_key):
        path, videos = shard_path(meta, shard), by_shard[shard]
        try:
            if not path.is_file():
                rep.fault(f"{path}: shard file missing (named by {meta.name} for video {_names(videos)})")
                ms.broken_videos.update(videos)
                continue
            handles[shard] = h5py.File(path, "r")
        except Exception as e:  # noqa: BLE001 - h5py reports corruption as OSError, RuntimeError, ...
            rep.fault(f"{path}: unreadable or corrupt h5 file ({e})")
            ms.broken_videos.update(videos)
    return handles


def _locate_videos(meta: Path, by_shard: dict[str, list[str]], handles: dict[str, h5py.File], ms: ModalitySummary,
                   rep: Report) -> dict[str, list[str]]:
    """video -> the shards that really hold it, to say so when the metadata names the wrong shard. A shard whose
    keys cannot be listed is closed and dropped from `handles`."""
    located: dict[str, list[str]] = {}
    for shard, h in list(handles.items()):
        try:
            for k in h.keys():
                located.setdefault(k, []).append(shard)
        except Exception as e:  # noqa: BLE001
            rep.fault(f"{shard_path(meta, shard)}: unreadable or corrupt h5 file ({e})")
            ms.broken_videos.update(by_shard[shard])
            handles.pop(shard).close()
    return located


def _read_headers(meta: Path, by_shard: dict[str, list[str]], handles: dict[str, h5py.File], ms: ModalitySummary,
                  rep: Report) -> list[tuple]:
    """Pass 1, headers only: (shard, video, clip, shape, dtype) per array; no open h5 objects kept."""
    located = _locate_videos(meta, by_shard, handles, ms, rep)
    headers = []
    for shard in sorted(by_shard, key=natural_key):
        h = handles.get(shard)
        if h is None:
            continue
        path = shard_path(meta, shard)
        for video in by_shard[shard]:
            try:
                g = h.get(video)
                if not isinstance(g, h5py.Group):
                    elsewhere = [s for s in located.get(video, []) if s != shard]
                    hint = f"; it is in {', '.join(shard_path(meta, s).name for s in elsewhere)}" if elsewhere else ""
                    rep.fault(f"{where(path, video)}: video placed in this shard by {meta.name} but not in it{hint}")
                    ms.broken_videos.add(video)
                    continue
                for clip, obj in g.items():
                    if isinstance(obj, h5py.Dataset):
                        headers.append((shard, video, clip, tuple(obj.shape or ()), obj.dtype))
                        ms.present.add((video, clip))
            except Exception as e:  # noqa: BLE001
                rep.fault(f"{where(path, video)}: unreadable ({e})")
                ms.broken_videos.add(video)
    return headers


def _array_problem(h: h5py.File, video: str, clip: str, shape: tuple, dtype, name: str, split: str,
                   ms: ModalitySummary) -> str | None:
    """What is wrong with one array (its header first, then its values), or None."""
    try:
        if len(shape) != 2:
            return f"array of rank {len(shape)} (shape {tuple(shape)}), expected [T, D]"
        if shape[0] == 0:
            return "clip has zero frames"
        if shape[0] > PLAUSIBLE_FRAMES:       # its values are not read: that alone would cost gigabytes
            return (f"{shape[0]:,} frames, beyond any plausible clip (over {PLAUSIBLE_FRAMES:,}); training and "
                    f"generation refuse it unless --max_frames (stride or truncate) caps what they read")
        if shape[1] != ms.dim:
            return f"feature dim {shape[1]}, expected {ms.dim} like the rest of {name} in {split}"
        if not np.issubdtype(dtype, np.floating):
            return f"dtype {dtype}, expected floating point"
        ms.arrays += 1
        bad, first = _count_nonfinite(h[video][clip])
        return f"{_n(bad, 'non-finite value')} (NaN/Inf), first at frame {first}" if bad else None
    except Exception as e:  # noqa: BLE001
        return f"unreadable ({e})"


def _check_arrays(split: str, name: str, meta: Path, headers: list[tuple], handles: dict[str, h5py.File],
                  annotated: set | None, ms: ModalitySummary, rep: Report):
    """Pass 2, the arrays one at a time: faults for clips training reads, warnings for the others."""
    unused_problems = []
    bar = tqdm(total=len(headers), desc=f"{split}/{name}", unit="clip", file=sys.stderr,
               leave=False, dynamic_ncols=True, mininterval=0.5)
    try:
        for shard, video, clip, shape, dtype in headers:
            bar.update()
            path = shard_path(meta, shard)
            used = annotated is None or (video, clip) in annotated
            problem = _array_problem(handles[shard], video, clip, shape, dtype, name, split, ms)
            if problem is None:
                if used:
                    ms.frames.append(int(shape[0]))
            elif used:
                rep.fault(f"{where(path, video, clip)}: {problem}")
            else:
                unused_problems.append(f"{where(path, video, clip)}: {problem} (clip not annotated; training never reads it)")
    finally:
        bar.close()
    for msg in unused_problems[:MAX_LISTED]:
        rep.warn(msg)
    if len(unused_problems) > MAX_LISTED:
        rep.warn(f"{meta.parent}: ... and {len(unused_problems) - MAX_LISTED} more problems in clips not annotated in {split}")


# ----------------------------------------------------------------------------------------- split
def _modality_metadata(paths: DataPaths, split: str, requested: list[str] | None, rep: Report) -> dict[str, Path]:
    """Modality -> metadata file of the split: those --features names, and the folders of the data dir (all of
    them, or the --modalities asked for), each folder's fault reported."""
    explicit = paths.explicit_metadata(split)
    found = {m: p for m, p in explicit.items() if requested is None or m in requested}
    if requested is None:
        folders = [p for p in sorted(paths.data_dir.iterdir()) if p.is_dir() and p.name not in paths.features]
    else:
        folders = [paths.data_dir / m for m in requested if m not in explicit]
    for sub in folders:
        if requested is not None and not sub.is_dir():
            rep.fault(f"{sub}: modality folder not found (asked for with --modalities)")
            continue
        try:
            meta = find_metadata(sub, split)
        except DataError as e:
            rep.fault(e)
            continue
        if meta is not None:
            found[sub.name] = meta
        elif requested is not None:
            rep.fault(f"{sub}: no metadata file *.{split}.json for split {split!r} (asked for with --modalities)")
    return dict(sorted(found.items(), key=lambda kv: modality_rank(kv[0])))


def check_split(paths: DataPaths, split: str, requested: list[str] | None, rep: Report) -> SplitSummary:
    data_dir = paths.data_dir
    ss = SplitSummary(split)
    faults_before = rep.faults
    ann_path = paths.annotation(split)
    ann = None
    try:
        ann = load_annotation(ann_path, collect_faults=True)
    except DataError as e:
        rep.fault(e)
    except OSError as e:
        rep.fault(f"{ann_path}: unreadable ({e.strerror or e})")
    annotated = None
    items: list[tuple[str, str]] = []
    if ann is not None:
        ss.annotation_ok = True
        for f in ann.faults:
            rep.fault(f)
        for video, order in ann.videos.items():
            for clip, n in Counter(order).items():
                if n > 1:
                    rep.warn(f"{where(ann_path, video, clip)}: listed {n} times in clip_order (training reads it {n} times)")
        items = [(v, c) for v, order in ann.videos.items() for c in dict.fromkeys(order)]
        annotated = set(items)
        ss.videos, ss.clips, ss.resorted = len(ann.videos), len(items), ann.resorted_videos

    mods = _modality_metadata(paths, split, requested, rep)
    ss.found = list(mods)
    if not mods and requested is None:
        rep.fault(f"{data_dir}: no modality folder has a metadata file *.{split}.json for split {split!r}")
    for m, meta in mods.items():
        ms = check_modality(split, m, meta, annotated, rep)
        if ms is not None:
            ss.modalities.append(ms)

    # Clips that a modality lacks are left out of training: a warning, not a fault. Clips of videos
    # whose shard is missing or broken were already reported as a fault.
    usable = set(items)
    for ms in ss.modalities:
        absent = [(v, c) for v, c in items if (v, c) not in ms.present]
        usable.difference_update(absent)
        quiet = [vc for vc in absent if vc[0] not in ms.broken_videos]
        if quiet:
            eg = ", ".join(f"video {v!r} clip {c!r}" for v, c in quiet[:3])
            more = f", ... ({len(quiet)} in all)" if len(quiet) > 3 else ""
            rep.warn(f"{ms.metadata.parent}: {split}: {len(quiet)} of {len(items)} annotated clips have no {ms.name} "
                     f"features and are left out of training ({eg}{more})")
    ss.usable = len(usable) if len(mods) == len(ss.modalities) else None
    if items and ss.usable == 0 and ss.modalities and rep.faults == faults_before:
        # Only clips missing from some modality, but all of them: training refuses the split.
        rep.fault(f"{data_dir}: split {split!r} has no clip with features in all of "
                  f"{', '.join(ms.name for ms in ss.modalities)}")
    if ann is None:      # count what the shards hold instead
        ss.clips = len(set().union(*(ms.present for ms in ss.modalities)))
    return ss


# ----------------------------------------------------------------------------------------- entry point
def _frames(frames: list[int]) -> str:
    if not frames:
        return "-"
    return f"{min(frames)} / {statistics.median(frames):g} / {max(frames)}"


def check_dataset(data: DataPaths | Path, splits: list[str] | None, modalities: list[str] | None) -> int:
    """Check a dataset (its folder in today's layout, or a DataPaths naming its files), print faults and a
    summary; return the exit status (1 if any fault)."""
    paths = DataPaths.of(data)
    data_dir = paths.data_dir
    rep = Report()
    if not data_dir.is_dir():
        rep.fault(f"{data_dir}: data directory not found")
        rep.info("FAILED: 1 fault")
        return 1
    if splits:
        splits = list(dict.fromkeys(splits))
    else:
        splits = [s for s in SPLITS if paths.has_split(s)]
        if not splits:
            rep.fault(f"{data_dir}: no annotation file ({', '.join(str(paths.annotation(s)) for s in SPLITS)})")
            rep.info("FAILED: 1 fault")
            return 1
    if modalities is not None:
        modalities = [m.strip() for m in modalities if m.strip()] or None

    summaries = [check_split(paths, s, modalities, rep) for s in splits]

    # A dim must agree across splits: the model is built from one and evaluated on the others.
    first_dim: dict[str, tuple[str, int]] = {}
    for ss in summaries:
        for ms in ss.modalities:
            if ms.dim is None:
                continue
            if ms.name not in first_dim:
                first_dim[ms.name] = (ss.name, ms.dim)
            elif first_dim[ms.name][1] != ms.dim:
                s0, d0 = first_dim[ms.name]
                rep.fault(f"{ms.metadata}: {ms.name} features have dim {ms.dim} in {ss.name} but {d0} in {s0}")
    if modalities is None and len(summaries) > 1:
        have = {ss.name: set(ss.found) for ss in summaries}
        for m in sorted(set().union(*have.values()), key=modality_rank):
            lacking = [s for s, ms in have.items() if m not in ms]
            if lacking:
                rep.warn(f"{data_dir / m}: modality {m} has no metadata file for split {', '.join(lacking)}; "
                         f"choose the modalities with --modalities so that every split has them")

    # Summary.
    rep.info()
    rep.info(f"Summary of {data_dir}")
    total_clips = total_arrays = 0
    for ss in summaries:
        usable = (f"{ss.usable} with features in all of {len(ss.modalities)} modalit{'y' if len(ss.modalities) == 1 else 'ies'}"
                  if ss.usable is not None else "how many have all features is unknown (a metadata file is unusable)")
        if ss.annotation_ok:
            rep.info(f"{ss.name}: {_n(ss.clips, 'clip')} in {_n(ss.videos, 'video')}; {usable}")
            if ss.resorted:
                rep.info(f"  (clip_order of {ss.resorted} videos is in plain text order, x_10 before x_2; "
                         f"training sorts it naturally)")
        else:
            rep.info(f"{ss.name}: annotation unreadable; the shards hold {_n(ss.clips, 'clip')}")
        if ss.modalities:
            w = max(8, *(len(ms.name) for ms in ss.modalities))
            rep.info(f"  {'modality':<{w}}  {'dim':>5}  {'frames min / median / max':<26}  arrays")
            for ms in ss.modalities:
                dim = "-" if ms.dim is None else str(ms.dim)
                rep.info(f"  {ms.name:<{w}}  {dim:>5}  {_frames(ms.frames):<26}  {ms.arrays}")
                total_arrays += ms.arrays
        total_clips += ss.clips
    what = f"{len(summaries)} split{'s' if len(summaries) != 1 else ''}, {total_clips} clips checked ({total_arrays} arrays)"
    warn = f", {rep.warnings} warning{'s' if rep.warnings != 1 else ''}" if rep.warnings else ""
    if rep.faults:
        rep.info(f"FAILED: {rep.faults} fault{'s' if rep.faults != 1 else ''}{warn}; {what}")
        return 1
    rep.info(f"OK: {what}{warn}")
    return 0
