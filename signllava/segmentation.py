"""Cutting a long signing video into sentence-sized segments: `--segments auto | captions | fixed:S`.

`auto` reads the signer's MediaPipe landmarks (signllava.landmarks.Landmarks), not a learned model. The field
frames segmentation as tagging each frame as inside a sign/sentence or outside it (sign-language-processing's
BIO taggers, Moryossef et al.'s pose-based signing detection, both driven by how fast the pose moves). We keep
that framing with a rule anyone can check: a frame's *signing activity* is how fast the signer's hands, arms and
upper body move, in shoulder widths per second (so camera distance and fps do not matter), weighted up when the
hands are raised into the signing space. A still frame, or one without a body, is rest. Activity is smoothed,
thresholded with hysteresis relative to the video's own signing level (with absolute floors, so a still video
has no segments), and the stretches are tidied: short pauses bridged, blips dropped, long stretches split at
their quietest moment, into segments of `min_seconds` to `max_seconds`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from signllava.landmarks import Landmarks
from signllava.video_io import frame_step

# MediaPipe pose indices (the signer's own left/right).
NOSE, L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW, L_WRIST, R_WRIST = 0, 11, 12, 13, 14, 15, 16
# Points whose motion moves with the whole person: head, shoulders, elbows. They carry the activity when hands
# are not detected, and the demo language's signs (the whole photo shifted, rotated, zoomed) move only these.
CORE_POINTS = [NOSE, L_SHOULDER, R_SHOULDER, L_ELBOW, R_ELBOW]
# Body points below this visibility are MediaPipe's guesses. On the filmed astronaut photo (arms out of frame)
# the guessed wrists (visibility 0.1-0.4) wandered by 1-6 shoulder widths a second and an elbow at 0.5-0.7 by
# about one while the photo stood still; the seen head and shoulders (0.99+) moved under 0.1. MediaPipe's own
# drawing cut-off, 0.5, lets that elbow in; 0.8 keeps it out and still takes any point in plain view.
VISIBLE = 0.8
# A hand this far (in shoulder widths) below the shoulders is at rest (lap, waist); at shoulder height it is
# fully raised. Raised hands count up to RAISED_GAIN times more: the same speed in the signing space is more
# likely a sign than a hand adjusting a sleeve.
REST_BELOW_SHOULDERS = 1.0
RAISED_GAIN = 1.0
# Speed is the displacement across a short baseline centred on the frame, not from one frame to the next:
# landmark jitter (a pixel or so each frame, in no direction) does not add up over frames while motion does, so
# over a baseline of 2k frames jitter weighs 2k times less. Short enough that a sign's back-and-forth (a few
# strokes a second) does not cancel out within it, and that a boundary smears by a frame or two only.
BASELINE_SECONDS = 0.12
# Holistic's landmarks drift for a few frames after it first finds a body (its tracking and smoothing
# settling): on a still photo they moved at up to 0.6 shoulder widths a second over the first three frames.
# Those frames are not measured.
SETTLE_SECONDS = 0.2
# Averaging window after that: evens out the hand/wrist switch where Holistic loses a hand for a frame.
SMOOTH_SECONDS = 0.1
# Hysteresis: a stretch starts where activity reaches ENTER of the video's signing level (its 90th percentile)
# and lasts while it stays above LEAVE of it; a sign's slow moments dip between the two without ending the
# stretch. The level is the signer's own, so a slow signer or a small, jittery detection is cut alike. (A rest
# level, a low percentile, is not subtracted: in a video of almost unbroken signing it would be signing too.)
ACTIVE_PERCENTILE = 90
ENTER, LEAVE = 0.5, 0.25
# Absolute floors (shoulder widths per second): signing hands move at one to several; MediaPipe's jitter on a
# still person stays under ~0.1. A still video (or one signing under a tenth of its time, whose 90th percentile
# is rest) is thus measured against these instead.
ENTER_FLOOR, LEAVE_FLOOR = 0.3, 0.15
# Pauses shorter than this are holds within a sentence, not a boundary between sentences.
MIN_PAUSE_SECONDS = 0.4
# A segment under min_seconds this close to another joins it (a lone sign belongs to the sentence beside it);
# further away it is a blip (a scratch, a fidget) and is dropped.
JOIN_GAP_SECONDS = 1.0
# Defaults: a short sentence lasts about a second. The model learns from sentence clips a few seconds long (the
# original team's demo fed it 5-second windows); a stretch over ten seconds is more than one sentence, so it
# is split to keep each segment near the lengths the model was trained on.
MIN_SECONDS, MAX_SECONDS = 0.6, 10.0


@dataclass(frozen=True)
class Segment:
    start: float   # seconds from the video's start
    end: float


@dataclass(frozen=True)
class SegmentPolicy:
    kind: str                      # "auto" | "captions" | "fixed"
    seconds: float | None = None   # the window length of "fixed"


def parse_policy(text: str) -> SegmentPolicy:
    """`--segments`: auto, captions or fixed:S (S seconds > 0)."""
    if text in ("auto", "captions"):
        return SegmentPolicy(text)
    if text.startswith("fixed:"):
        try:
            seconds = float(text[len("fixed:"):])
        except ValueError:
            seconds = math.nan
        if math.isfinite(seconds) and seconds > 0:
            return SegmentPolicy("fixed", seconds)
    raise ValueError(f"--segments must be auto, captions or fixed:S with S seconds > 0 (e.g. fixed:5), got {text!r}")


def fixed_segments(duration: float, seconds: float) -> list[Segment]:
    """Windows of `seconds` covering [0, duration); the last one is shorter when they do not divide evenly."""
    if not seconds > 0:
        raise ValueError(f"window length must be > 0 seconds, got {seconds}")
    # A window is kept only if it starts clearly before the end: 0.3 / 0.1 is 2.9999..., 0.7 / 0.1 is 6.9999...
    # in floating point, and neither may add a window of zero length.
    count = math.ceil(duration / seconds - 1e-9) if duration > 0 else 0
    return [Segment(k * seconds, min((k + 1) * seconds, duration)) for k in range(count)]


# --------------------------------------------------------------------------------------------- activity


def _speed(points: np.ndarray, valid: np.ndarray, times: np.ndarray, fps: float, scale: float) -> np.ndarray:
    """Mean speed [T] of the valid points (points [T, N, 2], valid [T, N]) across each frame's baseline, in
    shoulder widths per second; NaN where no point is valid at both of its ends. Divided by the frames' own
    time apart (`times`), so that a variable frame rate does not scale it; the baseline's frame count comes
    from the average rate `fps`."""
    k = max(1, int(round(BASELINE_SECONDS * fps / 2)))
    frames = np.arange(len(points))
    lo, hi = np.clip(frames - k, 0, len(points) - 1), np.clip(frames + k, 0, len(points) - 1)
    apart = np.where(hi > lo, times[hi] - times[lo], 1.0)           # one frame alone: no motion, any time
    step = np.linalg.norm(points[hi] - points[lo], axis=2) / (apart[:, None] * scale)
    both = valid[hi] & valid[lo]
    count = both.sum(axis=1)
    return np.where(count > 0, np.where(both, step, 0.0).sum(axis=1) / np.maximum(count, 1), np.nan)


def _arm(lm: Landmarks, side: str, scale: float, settled: np.ndarray, times: np.ndarray):
    """One side's hand as (speed [T], wrist y [T]): the hand's own 21 points where Holistic found it at both
    ends of the baseline, else the body's wrist point where seen (MediaPipe often misses hands); NaN where
    neither is."""
    hand, found = (lm.left_hand, lm.left_found) if side == "left" else (lm.right_hand, lm.right_found)
    wrist = L_WRIST if side == "left" else R_WRIST
    seen = settled & (lm.body_visibility[:, wrist] >= VISIBLE)
    hand_speed = _speed(hand[:, :, :2], np.repeat((found & settled)[:, None], 21, axis=1), times, lm.fps, scale)
    body_speed = _speed(lm.body[:, [wrist], :2], seen[:, None], times, lm.fps, scale)
    wrist_y = np.where(found, hand[:, 0, 1], np.where(seen, lm.body[:, wrist, 1], np.nan))
    return np.where(np.isnan(hand_speed), body_speed, hand_speed), wrist_y


def _settled(found: np.ndarray, fps: float) -> np.ndarray:
    """Frames with a body, less the first SETTLE_SECONDS after each time Holistic (re)found it."""
    frames = np.arange(len(found))
    acquired = found & ~np.concatenate([[False], found[:-1]])
    last = np.maximum.accumulate(np.where(acquired, frames, -len(found) - 1))
    return found & (frames - last >= int(round(SETTLE_SECONDS * fps)))


def _raised(wrist_y: np.ndarray, shoulder_y: np.ndarray, scale: float) -> np.ndarray:
    """0 (hand at rest, or unseen) .. 1 (at the shoulders or above); image y grows downwards."""
    height = (shoulder_y + REST_BELOW_SHOULDERS * scale - wrist_y) / (REST_BELOW_SHOULDERS * scale)
    return np.nan_to_num(np.clip(height, 0.0, 1.0), nan=0.0)


def _smooth(x: np.ndarray, fps: float, seconds: float = SMOOTH_SECONDS) -> np.ndarray:
    """A centred moving average over `seconds`, edges padded with their own values."""
    half = max(0, int(round(seconds * fps / 2)))
    if half == 0 or len(x) == 0:
        return x.astype(np.float64)
    padded = np.pad(x.astype(np.float64), half, mode="edge")
    return np.convolve(padded, np.ones(2 * half + 1) / (2 * half + 1), mode="valid")


def signing_activity(lm: Landmarks, times: np.ndarray | None = None) -> np.ndarray:
    """[T] float, per frame: how much signing is happening (shoulder widths per second, raised hands weighted
    up, smoothed); 0 is rest. `times`: the frames' own times (seconds), by default i / fps."""
    t = len(lm)
    times = np.arange(t) / lm.fps if times is None else np.asarray(times, dtype=np.float64)
    shoulders = lm.body[:, [L_SHOULDER, R_SHOULDER], :2]
    widths = np.linalg.norm(shoulders[:, 0] - shoulders[:, 1], axis=1)[lm.body_found]
    if t < 2 or len(widths) == 0 or np.median(widths) < 1.0:
        return np.zeros(t)   # no body anywhere (or a degenerate one): all rest
    scale = float(np.median(widths))   # the video's median, so one frame's bad shoulders do not swing it
    settled = _settled(lm.body_found, lm.fps)
    seen = settled[:, None] & (lm.body_visibility[:, CORE_POINTS] >= VISIBLE)
    parts = [_speed(lm.body[:, CORE_POINTS, :2], seen, times, lm.fps, scale)]
    shoulder_y = shoulders[:, :, 1].mean(axis=1)
    raised = np.zeros(t)
    for side in ("left", "right"):
        speed, wrist_y = _arm(lm, side, scale, settled, times)
        parts.append(speed)
        raised = np.maximum(raised, _raised(wrist_y, shoulder_y, scale))
    # The fastest part; unmeasurable (no body, or settling) is rest.
    motion = np.nan_to_num(np.fmax.reduce(np.stack(parts)), nan=0.0)   # fmax skips NaN
    motion[~settled] = 0.0
    return _smooth(motion * (1.0 + RAISED_GAIN * raised), lm.fps)


# --------------------------------------------------------------------------------------------- segments


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) frame ranges where mask is true."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), np.flatnonzero(edges == -1).tolist()))


def _thresholds(activity: np.ndarray) -> tuple[float, float]:
    """(enter, leave) activity levels of the hysteresis."""
    level = float(np.percentile(activity, ACTIVE_PERCENTILE))
    return max(ENTER_FLOOR, ENTER * level), max(LEAVE_FLOOR, LEAVE * level)


# Runs are [start, end) frame ranges; `edge[i]` is frame i's time and edge[T] the video's end, so a run spans
# edge[s] .. edge[e] seconds. Lengths and gaps are measured in those seconds, not in frames at an average rate:
# in a variable-rate video a frame lasts 20 ms in one part and 100 ms in another. EPS absorbs float error
# (15 frames at 25 fps is 0.6 s to within 1e-16, not exactly).
EPS = 1e-9


def _bridge_pauses(runs, edge: np.ndarray, min_pause: float):
    """Runs separated by less than min_pause seconds merged into one."""
    out = []
    for s, e in runs:
        if out and edge[s] - edge[out[-1][1]] < min_pause - EPS:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def _join_or_drop_short(runs, edge: np.ndarray, min_seconds: float, join_gap: float):
    """Runs shorter than min_seconds join the nearer neighbour within join_gap seconds, else are dropped."""
    runs = list(runs)
    while True:
        short = [i for i, (s, e) in enumerate(runs) if edge[e] - edge[s] < min_seconds - EPS]
        if not short:
            return runs
        i = short[0]
        gaps = [(edge[runs[i][0]] - edge[runs[i - 1][1]], i - 1) if i > 0 else None,
                (edge[runs[i + 1][0]] - edge[runs[i][1]], i + 1) if i + 1 < len(runs) else None]
        near = min((g for g in gaps if g is not None and g[0] <= join_gap + EPS), default=None)
        if near is None:
            del runs[i]
        else:
            j = near[1]
            runs[min(i, j)] = (runs[min(i, j)][0], runs[max(i, j)][1])
            del runs[max(i, j)]


def _split_long(run, activity: np.ndarray, edge: np.ndarray, min_seconds: float, max_seconds: float):
    """A run longer than max_seconds cut at its quietest frame (each piece at least min_seconds), recursively."""
    s, e = run
    if edge[e] - edge[s] <= max_seconds + EPS:
        return [run]
    cuts = np.arange(s + 1, e)
    cuts = cuts[(edge[cuts] - edge[s] >= min_seconds - EPS) & (edge[e] - edge[cuts] >= min_seconds - EPS)]
    cut = int(cuts[np.argmin(activity[cuts])]) if len(cuts) else (s + e) // 2
    return (_split_long((s, cut), activity, edge, min_seconds, max_seconds)
            + _split_long((cut, e), activity, edge, min_seconds, max_seconds))


def _edges(lm: Landmarks, times, end) -> np.ndarray:
    """[T + 1]: each frame's time, then the video's end (the last frame's time plus one frame)."""
    if times is None:
        return np.arange(len(lm) + 1) / lm.fps
    times = np.asarray(times, dtype=np.float64)
    if len(times) != len(lm):
        raise ValueError(f"{len(times)} frame times for {len(lm)} frames of landmarks")
    last = end if end is not None else times[-1] + frame_step(times, lm.fps)
    return np.append(times, last)


def auto_segments(lm: Landmarks, min_seconds: float = MIN_SECONDS, max_seconds: float = MAX_SECONDS,
                  min_pause: float = MIN_PAUSE_SECONDS, join_gap: float = JOIN_GAP_SECONDS,
                  times=None, end: float | None = None) -> list[Segment]:
    """Sentence-sized segments of signing, in time order. `times`: each frame's own time (the decoded frames'
    timestamps, seconds from the video's first frame) and `end` the video's end; frame i spans
    [times[i], times[i + 1]). Without them, frame i spans [i/fps, (i+1)/fps), right only at a constant rate."""
    if not (0 < min_seconds and 2 * min_seconds <= max_seconds):
        raise ValueError(f"segment lengths need 0 < min_seconds and 2 * min_seconds <= max_seconds, got "
                         f"{min_seconds} and {max_seconds}")
    if len(lm) == 0:
        return []
    edge = _edges(lm, times, end)
    activity = signing_activity(lm, edge[:-1])
    enter, leave = _thresholds(activity)
    runs = [(s, e) for s, e in _runs(activity >= leave) if activity[s:e].max() >= enter]
    runs = _join_or_drop_short(_bridge_pauses(runs, edge, min_pause), edge, min_seconds, join_gap)
    runs = [piece for run in runs for piece in _split_long(run, activity, edge, min_seconds, max_seconds)]
    return [Segment(float(edge[s]), float(edge[e])) for s, e in runs]
