"""The CPU half of extraction, one clip at a time: decode, landmarks, the signer and part crops, the 208
pose numbers. It runs in a pool of worker processes (extract.py --workers); the encoders take its output.

A clip that cannot be made (unreadable or truncated video, zero frames, times past the end, no person) comes
back as a `ClipFailure` with the one-line reason, never as zeros. Landmarks are kept as a `.pose` file per
clip; a file already there (a resumed or repeated run) is read instead of running MediaPipe again, so the
208 numbers can always be remade from it without MediaPipe.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from signllava.clip_sources import ClipSpec
from signllava.errors import DataError

# MediaPipe's C++ logging (glog, TFLite) prints a few lines per graph, i.e. per clip; warnings and errors stay.
os.environ.setdefault("GLOG_minloglevel", "2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@dataclass(frozen=True)
class ClipTask:
    spec: ClipSpec
    pose_file: Path | None          # where the clip's raw landmarks live (.pose); None: not kept
    mae_size: int | None            # the MAE input's side, or None when MAE is not extracted
    part_crops: bool                # DINOv2's face and hand crops wanted
    face_box: str                   # pose_features' face recipe ("selected" | "all")
    max_seconds: float              # longer clips are refused (never cut)


@dataclass
class ClipInputs:
    video: str
    clip: str
    fps: float
    pose: np.ndarray                         # float32 [T, 208]
    mae: np.ndarray | None = None            # uint8 [T, S, S, 3] RGB signer crop at the MAE input size
    face: np.ndarray | None = None           # uint8 [T, 56, 56, 3] RGB
    left_hand: np.ndarray | None = None
    right_hand: np.ndarray | None = None
    seconds: dict = field(default_factory=dict)   # stage -> seconds spent on this clip

    @property
    def frames(self) -> int:
        return len(self.pose)


@dataclass
class ClipFailure:
    video: str
    clip: str
    reason: str
    seconds: dict = field(default_factory=dict)


def prepare_clip(task: ClipTask) -> ClipInputs | ClipFailure:
    """Everything the encoders need from one clip, or why it could not be made."""
    from signllava import landmarks, pose_features
    from signllava.video_io import read_clip

    spec, loc = task.spec, task.spec.where()
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str):
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = seconds.get(stage, 0.0) + now - clock
        clock = now

    try:
        clip = read_clip(spec.file, spec.start, spec.end, loc, task.max_seconds)
        lap("decode")
        if task.pose_file is not None and task.pose_file.is_file():
            lm = landmarks.load_pose(task.pose_file)
            if len(lm) != len(clip.frames) or (lm.width, lm.height) != clip.frames.shape[2:0:-1]:
                raise DataError(f"{loc}: kept landmarks {task.pose_file} are for {len(lm)} frames of "
                                f"{lm.width}x{lm.height}, the clip has {len(clip.frames)} of "
                                f"{clip.frames.shape[2]}x{clip.frames.shape[1]}; delete the file to remake it")
        else:
            lm = landmarks.detect(clip.frames, clip.fps, loc)
            if task.pose_file is not None:
                task.pose_file.parent.mkdir(parents=True, exist_ok=True)
                landmarks.save_pose(lm, task.pose_file)
        lap("landmarks")
        inputs = pose_features.signer_inputs(clip.frames, lm, loc, face_box=task.face_box)
        out = ClipInputs(spec.video, spec.clip, clip.fps, inputs.pose.astype(np.float32))
        if task.mae_size:
            out.mae = pose_features.mae_input(inputs.signer, task.mae_size)
        if task.part_crops:
            out.face, out.left_hand, out.right_hand = inputs.face, inputs.left_hand, inputs.right_hand
        lap("crops")
    except DataError as e:
        return ClipFailure(spec.video, spec.clip, str(e), seconds)
    out.seconds = seconds
    return out


def prepare_clips(tasks, workers: int):
    """prepare_clip over `tasks`, results in order. With workers > 0 in that many processes ('forkserver':
    nothing of the parent's threads or CUDA state is forked), at most two tasks a worker in flight so that
    finished crops never pile up faster than the encoders take them."""
    if workers == 0:
        yield from map(prepare_clip, tasks)
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor
    tasks = iter(tasks)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("forkserver")) as pool:
        window = deque(pool.submit(prepare_clip, t) for _, t in zip(range(2 * workers), tasks))
        while window:
            done = window.popleft().result()
            nxt = next(tasks, None)
            if nxt is not None:
                window.append(pool.submit(prepare_clip, nxt))
            yield done
