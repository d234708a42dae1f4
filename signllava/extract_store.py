"""Where an extraction writes, complete-or-invisible, so that a kill at any moment loses at most one video.

    D/.extract/<split>/v<i>.h5 + v<i>.json   one finished video (its features; its clips' outcomes). The JSON
                                             is written last: a video counts as done only when it is there.
    D/<m>/<m>.<split>.<k>.h5                 shard k of modality m, assembled from its videos when all are done
    D/.extract/<split>/shard-<k>.json        shard k done (written after its h5 files; the video pieces go)
    D/<m>/metadata_<m>.<split>.json          written once every shard of the split is done, by whichever rank
    D/annotation.<split>.json                finishes last; until then data.py sees no dataset at all
    D/extraction_summary.<split>.json

Shards are numbered over the split's videos in natural order (`videos_per_shard` each) and shard k belongs to
rank k % world, so the files do not depend on how many ranks made them. Every file is written beside its
place and renamed into it.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from signllava.atomic import atomic_file, write_atomic
from signllava.errors import DataError
from signllava.layout import natural_key, shard_path


def atomic_write_json(path: Path, obj) -> None:
    write_atomic(path, json.dumps(obj, indent=1, ensure_ascii=False))


def read_json_or_none(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


FINISH_LOCK = "finishing"


@dataclass(frozen=True)
class Shard:
    index: int
    videos: tuple[str, ...]


def plan_shards(videos, videos_per_shard: int) -> list[Shard]:
    ordered = sorted(videos, key=natural_key)
    return [Shard(k, tuple(ordered[i:i + videos_per_shard]))
            for k, i in enumerate(range(0, len(ordered), videos_per_shard))]


def my_shards(shards: list[Shard], rank: int, world: int) -> list[Shard]:
    return [s for s in shards if s.index % world == rank]


class ExtractionStore:
    def __init__(self, root: Path, split: str, modalities: list[str], shards: list[Shard]):
        self.root, self.split, self.modalities, self.shards = root, split, list(modalities), shards
        self.work = root / ".extract" / split
        self._video_index = {v: i for i, v in enumerate(sorted((v for s in shards for v in s.videos),
                                                               key=natural_key))}

    # ---- paths
    def metadata(self, m: str) -> Path:
        return self.root / m / f"metadata_{m}.{self.split}.json"

    def shard_file(self, m: str, k: int) -> Path:
        return shard_path(self.metadata(m), k)

    def _piece(self, video: str, suffix: str) -> Path:
        return self.work / f"v{self._video_index[video]}{suffix}"

    def _shard_record(self, k: int) -> Path:
        return self.work / f"shard-{k}.json"

    def summary_file(self) -> Path:
        return self.root / f"extraction_summary.{self.split}.json"

    # ---- state
    def complete(self) -> bool:
        """A previous extraction of this split finished: its summary is written and its work folder gone."""
        return self.summary_file().is_file() and not self.work.is_dir()

    def start(self, resume: bool, rank: int = 0) -> bool:
        """Ready the work folder; False when there is nothing to do (a finished split, resumed). Only rank 0
        judges a fresh start: the other ranks may find the folder it has just made."""
        if self.complete():
            if resume:
                return False
            raise DataError(f"{self.root}: split {self.split!r} is already extracted there "
                            f"({self.summary_file().name}); another --out, or remove it first")
        if not resume and rank == 0 and (self.work.is_dir() or any(self.metadata(m).is_file() for m in self.modalities)):
            raise DataError(f"{self.work}: an interrupted extraction of split {self.split!r} is here; "
                            "--resume to continue it, or remove the folder to start over")
        self.work.mkdir(parents=True, exist_ok=True)
        if resume and rank == 0:
            # A finish that was cut short: claim_finish's lock is from a process that is gone.
            (self.work / FINISH_LOCK).unlink(missing_ok=True)
        return True

    def claim_finish(self) -> bool:
        """Of the ranks that find every shard done, the one that gets here first writes the metadata."""
        try:
            os.close(os.open(self.work / FINISH_LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False

    def video_record(self, video: str) -> dict | None:
        rec = read_json_or_none(self._piece(video, ".json"))
        if rec is None or rec.get("video") != video:
            return None
        if rec["written"] and not self._piece(video, ".h5").is_file():
            return None
        return rec

    def shard_done(self, shard: Shard) -> bool:
        rec = read_json_or_none(self._shard_record(shard.index))
        return (rec is not None and rec.get("videos") == list(shard.videos)
                and all(self.shard_file(m, shard.index).is_file() for m in rec.get("modalities", [])))

    # ---- writing
    def write_video(self, video: str, features: dict[str, dict[str, np.ndarray]], outcome: dict) -> None:
        """One video's features (clip -> modality -> array) and its record (clip outcomes, seconds)."""
        self.work.mkdir(parents=True, exist_ok=True)
        h5 = self._piece(video, ".h5")
        if features:
            with atomic_file(h5, "w+b") as raw, h5py.File(raw, "w", track_order=True) as f:
                for clip, by_modality in features.items():
                    for m, arr in by_modality.items():
                        f.create_dataset(f"{m}/{clip}", data=arr, track_times=False)
        atomic_write_json(self._piece(video, ".json"), {"video": video, "written": bool(features), **outcome})

    def assemble_shard(self, shard: Shard) -> None:
        """Shard k's h5 file per modality from its finished videos, then its record; then the pieces go."""
        records = {v: self.video_record(v) for v in shard.videos}
        missing = [v for v, r in records.items() if r is None]
        if missing:
            raise RuntimeError(f"shard {shard.index} assembled before videos {missing[:3]} were done")
        present = set()
        for m in self.modalities:
            out = self.shard_file(m, shard.index)
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(out, "w+b") as raw, h5py.File(raw, "w", track_order=True) as dst:
                for video in shard.videos:
                    if not records[video]["written"]:
                        continue
                    with h5py.File(self._piece(video, ".h5"), "r") as src:
                        if m not in src:
                            continue
                        group = dst.create_group(video, track_order=True)
                        for clip in records[video]["clip_order"]:
                            if clip in src[m]:
                                group.create_dataset(clip, data=src[m][clip][()], track_times=False)
                                present.add(m)
        atomic_write_json(self._shard_record(shard.index),
                          {"videos": list(shard.videos), "modalities": self.modalities,
                           "records": [records[v] for v in shard.videos]})
        for video in shard.videos:
            for suffix in (".h5", ".json"):
                self._piece(video, suffix).unlink(missing_ok=True)

    def all_shards_done(self) -> bool:
        return all(self.shard_done(s) for s in self.shards)

    def records(self) -> list[dict]:
        return [r for s in self.shards for r in read_json_or_none(self._shard_record(s.index))["records"]]

    def finish(self, annotation: dict | None, summary: dict) -> None:
        """Metadata (video -> shard, for videos with at least one clip), the annotation when the source carries
        the sentences, and the summary; then the work folder goes. Deterministic: two ranks finishing at once
        write the same files."""
        videos_written = {}
        for shard in self.shards:
            rec = read_json_or_none(self._shard_record(shard.index))
            for r in rec["records"]:
                if r["written"]:
                    videos_written[r["video"]] = shard.index
        if annotation is not None:
            atomic_write_json(self.root / f"annotation.{self.split}.json", annotation)
        for m in self.modalities:
            atomic_write_json(self.metadata(m), videos_written)
        atomic_write_json(self.summary_file(), summary)
        self.discard()

    def abandon(self) -> None:
        """A split with no clip written leaves nothing behind: its (empty) shard files and the work folder go,
        so that nothing in D looks like a part of it and a run on fixed inputs starts afresh."""
        for m in self.modalities:
            for shard in self.shards:
                self.shard_file(m, shard.index).unlink(missing_ok=True)
            try:
                self.metadata(m).parent.rmdir()              # the modality's folder, when this split was all of it
            except OSError:
                pass
        self.discard()

    def discard(self) -> None:
        """The work folder goes (a finished split, or one with nothing to show)."""
        shutil.rmtree(self.work, ignore_errors=True)       # ours alone: the pieces and records of this split
        try:
            self.work.parent.rmdir()                        # .extract, once no other split is in progress
        except OSError:
            pass
