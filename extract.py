"""Videos in, the dataset the trainer reads out: MediaPipe pose, sign2vec, DINOv2 face/hand crops and MAE.

    python extract.py --videos CLIPS/ --annotation annotation.train.json --out D --split train ...   # How2Sign clips
    python extract.py --videos VIDEOS/ --segments how2sign_train.csv --out D --split train ...        # cut from videos
    python extract.py --videos VIDEOS/ --captions CAPTIONS/ --out D --split train ...                 # YouTube-ASL
    deepspeed --num_gpus 8 extract.py ...      # or torchrun; ranks split the videos, each writes its own shards

      --modalities pose,sign2vec,dino,mae   --mae M  --dino_face M --dino_hand M  --sign2vec M
      (M: an HF id, a local directory, or the original's checkpoint file)

Writes D/<m>/metadata_<m>.<split>.json and D/<m>/<m>.<split>.<k>.h5 (float16 [T, D] per clip, exactly as
data.py reads them), D/annotation.<split>.json when the clips come from segments or captions,
D/landmarks/<split>/<video>/<clip>.pose (the raw MediaPipe landmarks, pose-format), D/extraction.json (every
setting and model that made the features: a later split, training and translation extract the same way) and
D/extraction_summary.<split>.json (clips written and skipped with the reasons, frames, seconds per stage).

A kill loses at most the videos in flight: --resume skips every finished video and shard; nothing half
written ever looks complete (see signllava/extract_store.py). A clip that fails is reported on one line and
counted, never written as zeros (--on_error stop ends the run at the first one).
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
from pathlib import Path

from signllava.atomic import write_atomic
from signllava.clip_sources import annotation_for, from_annotation, from_captions, from_segments, video_files
from signllava.encoder_bundle import MODALITIES, EncoderChoice, needed_models
from signllava.errors import DataError, range_problems, run_command
from signllava.extraction_record import SETTINGS_FILE, differences, settings_record
from signllava.extract_store import (ExtractionStore, atomic_write_json, my_shards, plan_shards,
                                     read_json_or_none)
from signllava.layout import SPLITS

log = logging.getLogger("signllava.extract")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("clips")
    src.add_argument("--videos", type=Path, required=True, help="folder of video files, or a text file listing them")
    src.add_argument("--out", type=Path, required=True, help="the dataset folder to write (D)")
    src.add_argument("--split", choices=SPLITS, required=True)
    how = src.add_mutually_exclusive_group(required=True)
    how.add_argument("--annotation", type=Path, help="annotation.<split>.json whose clip names are the video files' names")
    how.add_argument("--segments", type=Path, help="How2Sign-style CSV: VIDEO_NAME, SENTENCE_NAME, START/END_REALIGNED, SENTENCE")
    how.add_argument("--captions", type=Path, help="folder of WebVTT/SRT files, one per video (<video>.vtt); each caption a clip")
    enc = p.add_argument_group("features")
    enc.add_argument("--modalities", default="pose,sign2vec,dino,mae", help="any subset of " + ",".join(MODALITIES))
    enc.add_argument("--mae", help="ViT-B/16 MAE encoder: HF id, directory or the original's checkpoint file")
    enc.add_argument("--dino_face", help="DINOv2 ViT-S/14 (registers) face model: HF id, directory or checkpoint file")
    enc.add_argument("--dino_hand", help="DINOv2 ViT-S/14 (registers) hand model")
    enc.add_argument("--sign2vec", help="sign2vec checkpoint: HF id or directory")
    enc.add_argument("--sign2vec_layer", type=int, help="hidden state to keep (0 = encoder input; default: the last)")
    enc.add_argument("--face_box", choices=("selected", "all"), default="selected",
                     help="face normalisation box over the 37 selected points (PoseEstimation's recipe) or all 478 "
                          "(sign2vec's run_pose_inference.py)")
    enc.add_argument("--resize", choices=("pil", "torch"), default="pil",
                     help="image encoders' resize to their input: PIL bilinear on the host, as the original (default), "
                          "or antialiased bilinear on the encoders' device: DINOv2's input ~7x faster on an H200, within "
                          "a few uint8 levels of PIL (bench/extract_speed.py); recorded, so translation resizes alike")
    enc.add_argument("--released_channel_order", action="store_true",
                     help="feed MAE and DINOv2 BGR frames, as the original's scripts did by mistake, to match the "
                          "released features (off: RGB)")
    run = p.add_argument_group("run")
    run.add_argument("--device", help="encoders' device (default: this rank's GPU, else cpu)")
    run.add_argument("--dtype", choices=("bfloat16", "float32"), help="encoders' dtype (default: bf16 on GPU, fp32 on CPU)")
    run.add_argument("--batch_size", type=int, default=256, help="frames per encoder batch")
    run.add_argument("--encode_frames", type=int, default=8192,
                     help="frames held for the encoders before a video's clips so far are encoded")
    run.add_argument("--workers", type=int, default=max(1, min(16, (os.cpu_count() or 2) - 1)),
                     help="processes decoding and running MediaPipe (0: in this process)")
    run.add_argument("--videos_per_shard", type=int, default=100)
    run.add_argument("--max_clip_seconds", type=float, default=120.0, help="longer clips are refused, never cut")
    run.add_argument("--on_error", choices=("skip", "stop"), default="skip",
                     help="a clip that fails: report it and go on, or stop the run")
    run.add_argument("--resume", action="store_true", help="continue an interrupted extraction into --out")
    run.add_argument("--allow_different_settings", action="store_true",
                     help="extract although D/extraction.json records other settings or models (a warning)")
    run.add_argument("--no_landmark_files", action="store_true", help="do not keep the raw .pose landmarks")
    run.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    return p


def validate(p: argparse.ArgumentParser, args) -> None:
    problems = range_problems(args, at_least_one=("batch_size", "encode_frames", "videos_per_shard"),
                              non_negative=("workers",))
    args.modality_list = [m.strip() for m in args.modalities.split(",") if m.strip()]
    unknown = [m for m in args.modality_list if m not in MODALITIES]
    if unknown or not args.modality_list:
        problems.append(f"--modalities: unknown {', '.join(unknown) or '(none given)'}; choose from {','.join(MODALITIES)}")
    if args.max_clip_seconds <= 0:
        problems.append("--max_clip_seconds must be > 0")
    missing = needed_models([m for m in args.modality_list if m in MODALITIES], encoder_choice(args))
    if missing:
        problems.append(f"--modalities {args.modalities} needs {' '.join(missing)}")
    if problems:
        p.error("; ".join(problems))


def encoder_choice(args) -> EncoderChoice:
    return EncoderChoice(mae=args.mae, dino_face=args.dino_face, dino_hand=args.dino_hand, sign2vec=args.sign2vec,
                         sign2vec_layer=args.sign2vec_layer, device=args.device or "cpu",
                         dtype=args.dtype or "float32", batch_size=args.batch_size,
                         channel_order="bgr" if args.released_channel_order else "rgb", resize=args.resize)


def rank_and_world() -> tuple[int, int, int]:
    """This process's place under deepspeed / torchrun / a hostfile (their RANK, WORLD_SIZE, LOCAL_RANK)."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def wait_for_all_ranks(world: int) -> None:
    """A barrier over the launcher's rendezvous (MASTER_ADDR/MASTER_PORT, gloo on the CPU: the encoders' device
    plays no part). Alone, nothing to wait for."""
    if world == 1:
        return
    import torch.distributed as dist
    if not dist.is_initialized():
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise DataError(f"WORLD_SIZE={world} but {' and '.join(missing)} not set: launch with deepspeed or torchrun")
        dist.init_process_group("gloo", timeout=datetime.timedelta(hours=2))
    dist.barrier()


def resolve_device(args, local_rank: int) -> None:
    import torch
    if args.device is None:
        args.device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: no CUDA device here")
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"


# ------------------------------------------------------------------------------------------ the clips
def plan_clips(args):
    """(clips by video, faults found before any decoding, the annotation to write or None)."""
    files = video_files(args.videos)
    if args.annotation is not None:
        clips, faults = from_annotation(args.annotation, files)
        return clips, faults, None          # the user's annotation is copied as it is
    if args.segments is not None:
        clips, faults = from_segments(args.segments, files)
    else:
        clips, faults = from_captions(args.captions, files)
    return clips, faults, annotation_for(clips)


# ------------------------------------------------------------------------------------------ the record
def record_settings(args, record: dict, rank: int) -> None:
    """D/extraction.json: written by the first extraction into D; every later one (another split, a resumed
    run, another rank) must match it, so a dataset never mixes features made differently."""
    path = args.out / SETTINGS_FILE
    old = read_json_or_none(path)
    if old is not None:
        diffs = differences(old, record)
        if diffs and not args.allow_different_settings:
            raise DataError(f"{path}: this dataset was extracted with other settings or models ({', '.join(diffs[:6])}); "
                            "use the same flags, another --out, or --allow_different_settings")
        if diffs:
            log.warning("%s: extracting with other settings or models than recorded: %s", path, ", ".join(diffs))
    if rank == 0:
        splits = dict((old or {}).get("splits", {}))
        source = {k: str(getattr(args, k)) for k in ("annotation", "segments", "captions") if getattr(args, k)}
        splits[args.split] = {"videos": str(args.videos), **source}
        atomic_write_json(path, {**(old if old and not args.allow_different_settings else record),
                                 "splits": splits})


# ------------------------------------------------------------------------------------------ the work
def clip_tasks(args, videos, clips, mae_size):
    from signllava.clip_inputs import ClipTask
    keep = not args.no_landmark_files
    for video in videos:
        for spec in clips[video]:
            pose_file = (args.out / "landmarks" / args.split / _safe_name(video) / f"{_safe_name(spec.clip)}.pose"
                         if keep else None)
            yield ClipTask(spec, pose_file, mae_size, "dino" in args.modality_list, args.face_box,
                           args.max_clip_seconds)


def _safe_name(name: str) -> str:
    """A video or clip name as one path component (names are the dataset's keys, not paths)."""
    return name.replace(os.sep, "%2F").replace("\0", "") if name not in (".", "..") else f"%{name}"


class VideoBatch:
    """The clips of one video as they come back from the workers; encoded every `encode_frames` frames and
    at the video's end (so a clip's features depend on its video alone, not on ranks or resumes)."""

    def __init__(self, video: str, expected: int):
        self.video, self.expected = video, expected
        self.pending, self.features, self.failed = [], {}, []
        self.order, self.seconds, self.frames, self.received = [], {}, 0, 0

    def add(self, result) -> None:
        self.received += 1
        for stage, s in result.seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + s
        if hasattr(result, "reason"):
            self.failed.append({"clip": result.clip, "reason": result.reason})
        else:
            self.pending.append(result)

    def pending_frames(self) -> int:
        return sum(c.frames for c in self.pending)

    def encode(self, encoders) -> None:
        if not self.pending:
            return
        feats, seconds = encoders.encode(self.pending)
        for clip, f in zip(self.pending, feats, strict=True):
            self.features[clip.clip] = f
            self.order.append(clip.clip)
            self.frames += clip.frames
        for stage, s in seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + s
        self.pending = []

    def outcome(self, clip_order: list[str]) -> dict:
        rank = {c: i for i, c in enumerate(clip_order)}
        return {"clip_order": sorted(self.order, key=rank.__getitem__), "failed": self.failed,
                "frames": self.frames, "seconds": self.seconds,
                "feature_frames": {m: sum(len(f[m]) for f in self.features.values())
                                   for m in next(iter(self.features.values()), {})}}


def extract_rank(args, clips, store: ExtractionStore, encoders, rank: int, world: int) -> None:
    """This rank's shards: every unfinished video through the workers and the encoders, each shard
    assembled as soon as its last video is written."""
    from tqdm import tqdm

    from signllava.clip_inputs import prepare_clips
    shards = [s for s in my_shards(store.shards, rank, world) if not store.shard_done(s)]
    pending = {s.index: [v for v in s.videos if store.video_record(v) is None] for s in shards}
    for s in shards:
        if not pending[s.index]:              # every video written before a kill, the shard itself not yet
            store.assemble_shard(s)
    shards = [s for s in shards if pending[s.index]]
    todo = [v for s in shards for v in pending[s.index]]
    left = {s.index: len(pending[s.index]) for s in shards}
    shard_of = {v: s for s in shards for v in s.videos}
    bar = tqdm(total=sum(len(clips[v]) for v in todo), unit="clip", disable=rank != 0, mininterval=2,
               desc=f"extract {args.split}")
    log.info("rank %d/%d: %d videos to extract (%d clips) in %d shards", rank, world, len(todo), bar.total, len(shards))
    batch = None
    for result in prepare_clips(clip_tasks(args, todo, clips, encoders.mae_size), args.workers):
        if batch is None or batch.video != result.video:
            batch = VideoBatch(result.video, len(clips[result.video]))
        batch.add(result)
        bar.update(1)
        if hasattr(result, "reason"):
            log.warning("skipped: %s", result.reason)
            if args.on_error == "stop":
                raise DataError(f"{result.reason} (--on_error stop; --resume continues after fixing it)")
        if batch.pending_frames() >= args.encode_frames or batch.received == batch.expected:
            batch.encode(encoders)
        if batch.received == batch.expected:
            store.write_video(batch.video, batch.features, batch.outcome([c.clip for c in clips[batch.video]]))
            shard = shard_of[batch.video]
            left[shard.index] -= 1
            if left[shard.index] == 0:
                store.assemble_shard(shard)
            batch = None
    bar.close()


def summarise(args, store: ExtractionStore, plan_faults: list[str], clips, world: int, wall: float) -> dict:
    records = store.records()
    skipped = [{"video": r["video"], **f} for r in records for f in r["failed"]]
    skipped += [{"reason": f} for f in plan_faults]
    seconds: dict[str, float] = {}
    feature_frames: dict[str, int] = {}
    for r in records:
        for stage, s in r["seconds"].items():
            seconds[stage] = round(seconds.get(stage, 0.0) + s, 3)
        for m, n in r.get("feature_frames", {}).items():
            feature_frames[m] = feature_frames.get(m, 0) + n
    frames = sum(r["frames"] for r in records)
    return {"split": args.split, "videos": len(records), "videos_written": sum(r["written"] for r in records),
            "clips_planned": sum(len(c) for c in clips.values()) + len(plan_faults),
            "clips_written": sum(len(r["clip_order"]) for r in records), "clips_skipped": len(skipped),
            "skipped": skipped, "frames": frames, "feature_frames": feature_frames,
            "seconds_per_stage": seconds,
            "frames_per_second_per_stage": {k: round(frames / v, 2) for k, v in seconds.items() if v > 0},
            "ranks": world, "last_rank_wall_seconds": round(wall, 2)}


def written_annotation(annotation: dict | None, store: ExtractionStore) -> dict | None:
    """The annotation of the clips that were written (a clip that failed has no features to train on)."""
    if annotation is None:
        return None
    kept = {r["video"]: r["clip_order"] for r in store.records() if r["written"]}
    out = {}
    for video, order in kept.items():
        entry = annotation[video]
        out[video] = {"clip_order": order, **{c: entry[c] for c in order}}
    return out


def copy_annotation(args) -> None:
    """A How2Sign-style annotation goes into D unchanged (clips that failed are the checker's warnings)."""
    if args.annotation is None:
        return
    target = args.out / f"annotation.{args.split}.json"
    if target.exists() and target.samefile(args.annotation):
        return
    write_atomic(target, args.annotation.read_bytes())


def extract(args) -> int:
    rank, world, local_rank = rank_and_world()
    resolve_device(args, local_rank)
    started = time.perf_counter()
    clips, plan_faults, annotation = plan_clips(args)
    for f in plan_faults:
        log.warning("skipped: %s", f)
    if plan_faults and args.on_error == "stop":
        raise DataError(f"{plan_faults[0]} (--on_error stop)")
    if not clips:
        raise DataError(f"{args.videos}: no clip to extract ({len(plan_faults)} skipped)")
    from signllava.encoder_bundle import Encoders
    encoders = Encoders(args.modality_list, encoder_choice(args))
    args.out.mkdir(parents=True, exist_ok=True)
    record = settings_record(args.modality_list, args.face_box, args.released_channel_order, args.dtype, encoders)
    record_settings(args, record, rank)
    store = ExtractionStore(args.out, args.split, args.modality_list, plan_shards(clips, args.videos_per_shard))
    # Rank 0 judges a fresh start before any other rank makes the work folder (a faster rank once made it
    # first, and rank 0 took it for an interrupted extraction).
    ready = store.start(args.resume, rank) if rank == 0 else None
    wait_for_all_ranks(world)
    if ready is None:
        ready = store.start(args.resume, rank)
    if not ready:
        log.info("%s: split %r is already extracted; nothing to resume", args.out, args.split)
        return 0
    extract_rank(args, clips, store, encoders, rank, world)
    if store.all_shards_done() and store.claim_finish():
        finish_split(args, store, summarise(args, store, plan_faults, clips, world, time.perf_counter() - started),
                     annotation)
    else:
        log.info("rank %d: its shards are done; the last rank to finish writes the metadata", rank)
    return 0


def finish_split(args, store: ExtractionStore, summary: dict, annotation: dict | None) -> None:
    """The split's metadata, annotation and summary, written by the rank that finishes last: it alone sees every
    rank's videos, so "no clip written" is judged for the whole run here. Such a run is an error, not an empty
    dataset that data.py would pass, and leaves nothing of the split behind (ExtractionStore.abandon)."""
    if summary["clips_written"] == 0:
        store.abandon()
        first = next((s["reason"] for s in summary["skipped"]), "no clip was planned")
        raise DataError(f"{args.out}: no clip of split {args.split!r} could be extracted, all "
                        f"{summary['clips_skipped']} skipped (the first: {first}); nothing written")
    copy_annotation(args)
    store.finish(written_annotation(annotation, store), summary)
    log.info("%s: %d clips written, %d skipped, %d frames; summary in %s", args.out, summary["clips_written"],
             summary["clips_skipped"], summary["frames"], store.summary_file().name)
    print(json.dumps({k: v for k, v in summary.items() if k != "skipped"}))


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    validate(p, args)
    try:
        return run_command(lambda: extract(args))
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
