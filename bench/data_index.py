"""Start-up of the dataset index at scale: time and peak memory of building SignDataset's index, old vs new,
in one run, on synthetic splits in the real layout. CPU only.

    OMP_NUM_THREADS=1 python bench/data_index.py                         # 3 k, 30 k, 120 k clips x 4 modalities
    python bench/data_index.py --sizes 3000 30000 --modalities 2 --copy_to "$OUT"

For each size it writes a split in the real layout (layout.py: annotation.train.json, <m>/metadata_<m>.train.json,
<m>/<m>.train.<k>.h5 holding float16 [T, D] per h5[video][clip]; --modalities, --frames, --clips_per_video,
--shards), then measures each of these in a fresh process (so peak RSS is its own):

  old       the index code of main before the compact index (OldIndex below, kept only to measure against):
            every group walked with h5py's high-level objects, a dict of (video, clip) tuples per modality,
            shards left open;
  new cold serial   SignDataset(...) with no cache beside the data: h5 headers walked with h5py's low-level
            calls, shards closed after indexing, frame counts in one int32 array, the index cache written;
  new cold  the same with the shards walked by a pool of worker processes (layout.map_shards; CPU seconds
            are then the parent's only);
  new warm  SignDataset(...) again: the index read from the cache.

Each row reports wall seconds, CPU seconds of the process (the steadier figure on a shared machine), RSS after the imports (torch and all, the same for every mode), and peak RSS
(ru_maxrss); "index MB" is peak - after-imports. Old and new must give the same clips in the same order
with the same frame counts (a digest of both is compared). The script ends with a linear fit per clip of
the largest two sizes and its projection to --project clips (YouTube-ASL: about 600 k). Writes
bench/results/data_index-<date>.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from signllava.atomic import write_atomic  # noqa: E402

MODALITIES = ("mae", "sign2vec", "dino", "pose")
WORDS = "the a my cat dog man woman house school car book water reads walks sees likes big small old new".split()


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


# ------------------------------------------------------------------------------------------ the data
def split_plan(n: int, clips_per_video: int, shards: int) -> tuple[dict[str, list[str]], dict[str, int]]:
    """video -> clip names in time order, video -> shard."""
    videos: dict[str, list[str]] = {}
    for i in range(n):
        v = f"vid{i // clips_per_video:06d}"
        videos.setdefault(v, []).append(f"{v}_{i % clips_per_video}")
    return videos, {v: k % shards for k, v in enumerate(videos)}


def write_shard(job: tuple) -> None:
    """One h5 shard of one modality: its videos' clips, clip by clip, frame counts seeded by the shard."""
    import h5py
    import numpy as np
    path, videos, shard, frames = job
    rng = np.random.default_rng([len(videos), shard])
    with h5py.File(path, "w") as f:
        for v, clips in videos.items():
            g = f.create_group(v)
            for c in clips:
                g.create_dataset(c, data=np.zeros((int(rng.integers(frames[0], frames[1] + 1)), 8), np.float16))


def write_shards(root: Path, m: str, videos: dict[str, list[str]], shard_of: dict[str, int], shards: int,
                 frames: tuple[int, int]):
    """The shards of a large split in worker processes, one each, as the index walks them (layout.map_shards):
    writing is most of this benchmark's time."""
    from signllava.layout import map_shards
    jobs = [(root / m / f"{m}.train.{s}.h5", {v: c for v, c in videos.items() if shard_of[v] == s}, s, frames)
            for s in range(shards)]
    map_shards(write_shard, jobs, videos=len(videos))


def write_split(root: Path, n: int, modalities: list[str], clips_per_video: int, shards: int, frames: tuple[int, int]):
    """The first modality's shards are written clip by clip; the others are copies of them under their own
    names (the index reads only headers, and writing is the slow part of this benchmark)."""
    videos, shard_of = split_plan(n, clips_per_video, shards)
    rng = random.Random(0)
    ann = {}
    for v, clips in videos.items():
        ann[v] = {"clip_order": clips}
        for c in clips:
            words = [rng.choice(WORDS) for _ in range(rng.randint(5, 20))]
            ann[v][c] = {"translation": " ".join(words).capitalize() + ".", "paraphrases": ["<none>"], "keywords": words[:2]}
    root.mkdir(parents=True, exist_ok=True)      # a folder of this benchmark's own temporary (mkdtemp): written in place
    (root / "annotation.train.json").write_text(json.dumps(ann))
    for m in modalities:
        (root / m).mkdir(exist_ok=True)
        (root / m / f"metadata_{m}.train.json").write_text(json.dumps(shard_of))
    first = modalities[0]
    write_shards(root, first, videos, shard_of, shards, frames)
    for m in modalities[1:]:
        for s in range(shards):
            shutil.copyfile(root / first / f"{first}.train.{s}.h5", root / m / f"{m}.train.{s}.h5")


# ------------------------------------------------------------------------------------------ old index
class OldIndex:
    """SignDataset.__init__'s index as it was on main at 54b624b (annotation, per-modality dicts of
    (video, clip) -> frames from a high-level h5py walk, the join, context_texts, the first clip's dims),
    with its shards left open as they were. Kept only to measure against."""

    def __init__(self, data_dir: Path, split: str):
        import h5py
        from signllava.layout import discover_modalities, load_annotation, read_json, shard_path
        self.annotation = load_annotation(data_dir / f"annotation.{split}.json")
        self.context_texts = {k: c.translation for k, c in self.annotation.clips.items()}
        found = discover_modalities(data_dir, split)
        self.modalities = list(found)
        self.handles = {}
        self.frames = {}
        for m, meta in found.items():
            video_shard = {v: str(s) for v, s in read_json(meta).items()}
            out, by_shard = {}, {}
            for video, shard in video_shard.items():
                by_shard.setdefault(shard, []).append(video)
            for shard, vids in by_shard.items():
                path = shard_path(meta, shard)
                h = self.handles.setdefault(str(path), h5py.File(path, "r"))
                for video in vids:
                    for clip, ds in h.get(video).items():
                        if isinstance(ds, h5py.Dataset):
                            out[(video, clip)] = ds.shape[0] if ds.ndim >= 1 else 0
            self.frames[m] = out
        items = [(v, c, pos) for v, order in self.annotation.videos.items() for pos, c in enumerate(order)]
        self.items = [(v, c, pos) for v, c, pos in items if all((v, c) in self.frames[m] for m in self.modalities)]

    def rows(self):
        for v, c, pos in self.items:
            yield v, c, pos, [self.frames[m][(v, c)] for m in self.modalities]


def digest(rows) -> str:
    h = hashlib.sha256()
    for v, c, pos, frames in rows:
        h.update(f"{v}\0{c}\0{pos}\0{','.join(map(str, frames))}\n".encode())
    return h.hexdigest()


def measure(mode: str, data_dir: Path) -> dict:
    """One measurement in this (fresh) process: prints its JSON row."""
    from bench.synthetic import make_tokenizer
    from data import DataOptions, SignDataset
    from signllava.prompts import PromptBuilder, special_ids
    tok = make_tokenizer()                   # torch, the tokenizer and the rest come before the baseline: every rank has them
    ids = special_ids(tok)
    builder = PromptBuilder(tok, ids["markers"], ids["pad"])
    base = rss_mb()
    t, cpu = time.perf_counter(), time.process_time()
    if mode == "serial":                 # new cold, but every shard walked in this process
        from signllava import layout
        layout.PARALLEL_WALK_MIN_VIDEOS = 1 << 62
    if mode == "old":
        ix = OldIndex(data_dir, "train")
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        rows = ix.rows()
    else:
        ds = SignDataset(data_dir, "train", builder, DataOptions(), train=True)
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        rows = ((v, c, pos, ds.frames[i].tolist()) for i, (v, c, pos) in enumerate(ds.items))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "seconds": seconds, "cpu_s": cpu, "base_mb": base, "peak_mb": peak, "index_mb": peak - base,
            "digest": digest(rows)}


def run_measure(mode: str, data_dir: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, __file__, "--measure", mode, str(data_dir)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measure {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ the run
# old; new cold with the shards walked in this process, then in worker processes (layout.map_shards); new warm
LABELS = ("old", "new_cold_serial", "new_cold", "new_warm")


def fit(rows: list[dict], key: str, project: int) -> dict:
    """Linear through the two largest sizes: per clip and projected to `project` clips."""
    a, b = rows[-2], rows[-1]
    slope = (b[key] - a[key]) / (b["clips"] - a["clips"])
    return {"per_clip": slope, "projected": b[key] + slope * (project - b["clips"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[3000, 30000, 120000], help="clips per split")
    p.add_argument("--modalities", type=int, default=4, choices=range(1, 5), help="how many of mae, sign2vec, dino, pose")
    p.add_argument("--clips_per_video", type=int, default=10)
    p.add_argument("--shards", type=int, default=8, help="h5 files per modality")
    p.add_argument("--frames", type=int, nargs=2, default=[4, 12], help="frames per clip, uniform in [lo, hi]")
    p.add_argument("--project", type=int, default=600_000, help="clips to project to (YouTube-ASL: about 600 k)")
    p.add_argument("--modes", nargs="+", choices=LABELS, default=list(LABELS),
                   help="what to measure (old and new_cold_serial take minutes at several hundred thousand clips)")
    p.add_argument("--tmp_dir", default=None)
    p.add_argument("--copy_to", default=None, help="also write the JSON into this folder")
    p.add_argument("--measure", nargs=2, metavar=("MODE", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return 0
    if len(args.sizes) < 2 or sorted(args.sizes) != args.sizes:
        p.error("--sizes: at least two, ascending")
    mods = list(MODALITIES[:args.modalities])
    labels = [k for k in LABELS if k in args.modes]
    R = {"args": vars(args), "modalities": mods, "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg(),
         "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "sizes": []}
    out = ROOT / "bench" / "results" / f"data_index-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    tmp = Path(tempfile.mkdtemp(prefix="data_index_", dir=args.tmp_dir))
    try:
        for n in args.sizes:
            d = tmp / f"n{n}"
            t = time.perf_counter()
            write_split(d, n, mods, args.clips_per_video, args.shards, tuple(args.frames))
            row = {"clips": n, "write_s": time.perf_counter() - t}
            for mode, label in (("old", "old"), ("serial", "new_cold_serial"), ("new", "new_cold"), ("new", "new_warm")):
                if label not in labels:
                    continue
                row[label] = run_measure(mode, d)
                if label == "new_cold_serial":
                    for cache in d.glob("*/.*.index.npz"):       # the parallel first start must walk again
                        cache.unlink()
            if len({row[k]["digest"] for k in labels}) != 1:
                raise SystemExit(f"{n} clips: the indexes differ between {', '.join(labels)}")
            for k in labels:
                row[k].pop("digest")
            R["sizes"].append(row)
            print(f"{n:>8} clips x {len(mods)}: " + "  ".join(
                f"{k} {row[k]['seconds']:6.1f} s ({row[k]['cpu_s']:.1f} cpu) {row[k]['index_mb']:6.0f} MB" for k in labels)
                + f"  (base {row[labels[0]]['base_mb']:.0f} MB, written in {row['write_s']:.0f} s)", flush=True)
            shutil.rmtree(d, ignore_errors=True)
            write_atomic(out, json.dumps(R, indent=1))        # kept as it grows: a long run stopped early still counts
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [{"clips": r["clips"], **{f"{k}_{q}": r[k][q] for k in labels
                                    for q in ("seconds", "cpu_s", "index_mb")}} for r in R["sizes"]]
    R["projection"] = {key: fit(rows, key, args.project) for key in rows[0] if key != "clips"}
    R["load_avg_end"] = os.getloadavg()
    print(f"projected to {args.project} clips x {len(mods)} modalities (linear in clips from the two largest sizes):")
    for k in labels:
        print(f"  {k:<15} {R['projection'][k + '_seconds']['projected']:7.0f} s  "
              f"({R['projection'][k + '_cpu_s']['projected']:.0f} s cpu)  "
              f"{R['projection'][k + '_index_mb']['projected'] / 1024:6.2f} GB above the imports")
    write_atomic(out, json.dumps(R, indent=1))
    if args.copy_to:
        shutil.copy(out, Path(args.copy_to) / out.name)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
