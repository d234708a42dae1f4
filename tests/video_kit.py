"""Test videos of a real person without downloads: skimage's astronaut photo, filmed as a moving signer, and
the two dataset shapes extract.py reads (How2Sign sentence clips, YouTube-ASL whole videos with captions)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
from skimage import data

from signllava.video_io import write_video

SENTENCES = ["the cat sees a dog", "a big dog runs", "Anna eats the red apple", "the small cat runs",
             "blue sky today", "we sign the news"]


def film_astronaut(n=8, width=320, height=240, seed=0):
    """A real photo of a person, scaled, shifted and mirrored from frame to frame on a grey backdrop
    (`seed` shifts the path, so that different clips have different frames)."""
    photo = data.astronaut()
    frames = []
    for t in range(n):
        s = 200 + 6 * (t % 8) + 3 * seed
        img = cv2.resize(photo, (s, s), interpolation=cv2.INTER_AREA)
        if t % 3 == 2:
            img = img[:, ::-1]
        canvas = np.full((height, width, 3), 90, np.uint8)
        x0, y0 = 40 + 4 * (t % 8) - 5 * seed, 20 - 2 * (t % 8)
        ys, xs = slice(max(y0, 0), min(y0 + s, height)), slice(max(x0, 0), min(x0 + s, width))
        canvas[ys, xs] = img[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
        frames.append(canvas)
    return np.stack(frames)



def film_astronaut_still_move_still(still: int, moving: int, after: int, width=320, height=240):
    """The photo standing still for `still` frames, then turning, sliding and zooming (as the demo language's
    signs do) over `moving` frames back to where it began, then still again for `after` frames."""
    photo = cv2.resize(data.astronaut(), (200, 200), interpolation=cv2.INTER_AREA)
    frames = []
    for t in range(still + moving + after):
        k = min(max(t - still, 0), moving) / moving      # 0 .. 1 across the moving stretch, constant outside it
        turn = cv2.getRotationMatrix2D((100, 100), 12 * np.sin(2 * np.pi * k), 1 + 0.1 * np.sin(np.pi * k))
        turn[:, 2] += (60 + 30 * np.sin(np.pi * k), 20)
        frames.append(cv2.warpAffine(photo, turn, (width, height), borderValue=(90, 90, 90)))
    return np.stack(frames)

def how2sign_clips(root: Path, videos: int = 2, clips: int = 2, frames: int = 6) -> tuple[Path, Path]:
    """A folder of sentence clips (one file a clip, named after the clip) and their annotation."""
    folder, ann = root / "clips", {}
    k = 0
    for v in range(videos):
        video = f"vid{v}"
        names = [f"{video}_{c}" for c in range(clips)]
        ann[video] = {"clip_order": names}
        for name in names:
            write_video(folder / f"{name}.mp4", film_astronaut(frames, seed=k % 4))
            ann[video][name] = {"translation": SENTENCES[k % len(SENTENCES)], "paraphrases": [], "keywords": []}
            k += 1
    path = root / "annotation.train.json"
    path.write_text(json.dumps(ann, indent=1))
    return folder, path


def youtube_asl(root: Path, videos: int = 2, captions: int = 2, fps: int = 10, seconds_per_caption: float = 0.8):
    """Whole videos and a WebVTT (or, for the second video, SRT) caption file each; captions with gaps
    between them and listed out of time order in the file."""
    vids, caps = root / "videos", root / "captions"
    caps.mkdir(parents=True, exist_ok=True)
    for v in range(videos):
        video = f"yt{v}"
        n = int(round((captions * seconds_per_caption + 0.6) * fps))
        write_video(vids / f"{video}.mp4", film_astronaut(n, seed=v), fps=fps)
        cues = []
        for c in range(captions):
            start = 0.3 + c * seconds_per_caption
            cues.append((start, start + seconds_per_caption - 0.2, SENTENCES[(v + c) % len(SENTENCES)]))
        cues = cues[::-1]          # file order is not time order
        if v % 2 == 0:
            body = "WEBVTT\n\n" + "\n".join(f"{_ts(s)} --> {_ts(e)}\n{t}\n" for s, e, t in cues)
            (caps / f"{video}.en.vtt").write_text(body)
        else:
            body = "\n".join(f"{i + 1}\n{_ts(s, ',')} --> {_ts(e, ',')}\n{t}\n" for i, (s, e, t) in enumerate(cues))
            (caps / f"{video}.srt").write_text(body)
    return vids, caps


def _ts(seconds: float, sep: str = ".") -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def tiny_encoders(root: Path) -> list[str]:
    """Flags for extract.py with tiny random encoders of the real architectures (tests/encoder_kit.py)."""
    from tests.encoder_kit import make_tiny_dino, make_tiny_mae, make_tiny_sign2vec
    return ["--mae", make_tiny_mae(root / "mae"), "--dino_face", make_tiny_dino(root / "dino_face", seed=5),
            "--dino_hand", make_tiny_dino(root / "dino_hand", seed=6), "--sign2vec", make_tiny_sign2vec(root / "s2v")]


def trained_video_run(tmp_path_factory) -> dict:
    """extract.py on two filmed videos with three captions each (all four streams, tiny random encoders) and
    stage 1 trained two steps on them with a context window of 2: the checkpoint test_translate.py and
    test_app.py both translate with. Built once per test session, also across pytest-xdist workers (a lock in
    the session's shared temp folder: a second worker waits, then reuses it). Its users only read it.
    -> {root, videos, captions, data, run, encoders (extract.py's model flags)}"""
    import fcntl
    import os

    from tests.kit import build_tiny_llm, run_script, script_env, train_args
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    root = shared / "trained_video_run"
    out = {"root": root, "videos": root / "yt" / "videos", "captions": root / "yt" / "captions", "data": root / "D",
           "run": root / "run"}
    with open(shared / "trained_video_run.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = root / "built.json"
        if not done.exists():
            youtube_asl(root / "yt", videos=2, captions=3)
            flags = [str(f) for f in tiny_encoders(root / "enc")]
            run_script("extract.py", "--videos", out["videos"], "--captions", out["captions"], "--out", out["data"],
                       "--split", "train", "--workers", 1, *flags, env=script_env(OMP_NUM_THREADS=1))
            build_tiny_llm(root / "llm", out["data"])
            run_script("pretrain.py", *train_args(out["data"], root / "llm", out["run"], 2, "--context_window", 2))
            done.write_text(json.dumps({"encoders": flags}))
    return {**out, "encoders": json.loads(done.read_text())["encoders"]}
