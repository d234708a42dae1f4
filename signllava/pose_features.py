"""From a clip's landmarks to the 208-number pose stream and the image crops the encoders read.

The original's recipe (JSALT2024/PoseEstimation: pose_prediction_parallel.py, utils.crop_pad_image,
data/normalization.py, data/keypoint_dataset.py as of its November 2024 commits, which made the Sign LLaVA
features), rebuilt on MediaPipe Holistic landmarks (signllava/landmarks.py):

1. The signing space: per frame with a body, a square of 4 x the shoulder distance around the point between the
   shoulders (pose 11, 12), widened to hold every keypoint (25 body points, the face, the hands), clipped to the
   frame; the clip's box is the median of each side over those frames.
2. The signer crop: that box made square by growing its shorter side (half before, the rest after), padded with
   colour 114 where it leaves the frame, resized to 512 x 512 (bilinear). The landmarks move into the crop's
   pixels and are rounded to 3 decimals, as the original stored them.
3. The 208 numbers per frame, x and y interleaved, in this order: 25 body points, 21 right-hand, 21 left-hand
   and 37 face points. The body is normalised globally: (p - shoulder midpoint) / (1.5 x shoulder distance). Each
   hand and the face are normalised locally: moved to their own box's corner, the box made square (its shorter
   side grown, points shifted by half the difference, floored, as the original does), padded by 0.2 of its side
   on every side and mapped to [-1, 1]. A missing body is 0, a missing hand or face -1: what the original's
   normalisation makes of the zeros it stored for a missing part.
4. Part crops for DINOv2: face, left and right hand boxes in the 512 crop from their landmarks (square, a 0.25
   border), shifted to lie inside the crop, resized to 56 x 56 (INTER_AREA). A frame without the part repeats
   the last crop of it, or is black until there is one.

Two original recipes differ in the face: PoseEstimation's create_keypoint_features.py normalises the face over
the 37 selected points (`face_box="selected"`, our default: it is the script that writes the pose features),
sign2vec's run_pose_inference.py over all 478 before selecting (`face_box="all"`). Which one made the released
features is not recorded.

Everything stays RGB; the original's BGR-to-RGB swap on frames that were already RGB is not copied.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import cv2
import numpy as np

from signllava.errors import DataError
from signllava.landmarks import Landmarks

SIGN_SPACE = 4.0            # the signing space's side, in shoulder distances
CROP_SIZE = 512             # the signer crop's side
PAD_COLOUR = 114            # where the signer crop runs past the frame
PART_SIZE = 56              # face and hand crops (DINOv2 resizes them to 224 itself)
PART_BORDER = 0.25          # around a part's landmarks, as a share of the box's side (half on each side)
MAE_SIZE = 224
LOCAL_PADDING = 0.2         # the hands' and face's local normalisation
GLOBAL_SCALE = 1.5          # the body's normalisation, in shoulder distances
BODY_POINTS = 25            # pose 0..24: the face, shoulders, arms, hands and hips (not the legs)
FACE_POINTS = (0, 4, 13, 14, 17, 33, 39, 46, 52, 55, 61, 64, 81, 93, 133, 151, 152, 159, 172, 178, 181, 263,
               269, 276, 282, 285, 291, 294, 311, 323, 362, 386, 397, 402, 405, 468, 473)
FEATURES = 2 * (BODY_POINTS + 21 + 21 + len(FACE_POINTS))   # 208
FACE_BOXES = ("selected", "all")
L_SHOULDER, R_SHOULDER = 11, 12


@dataclass(frozen=True)
class Box:
    """Pixels [x0, x1) x [y0, y1) of a frame; may reach past the frame's edges."""
    x0: int
    y0: int
    x1: int
    y1: int


def _square(x0: int, y0: int, x1: int, y1: int, border: float = 0.0) -> Box:
    """The original's crop_pad_image box: the shorter side grown to the longer one (floor of half the difference
    before, the rest after), then round(border x side / 2) more on every side."""
    w, h = x1 - x0, y1 - y0
    before = abs(w - h) // 2
    after = abs(w - h) - before
    if w > h:
        y0, y1 = y0 - before, y1 + after
    else:
        x0, x1 = x0 - before, x1 + after
    b = int(np.round(max(w, h) * border / 2))
    return Box(x0 - b, y0 - b, x1 + b, y1 + b)


# --------------------------------------------------------------------------------------------- signing space


def _frame_space(points: np.ndarray, width: int, height: int, sign_space: float) -> tuple[int, int, int, int]:
    """One frame's signing space from its keypoints (float64 [N, 2], the first 25 the body's)."""
    (lx, ly), (rx, ry) = points[L_SHOULDER], points[R_SHOULDER]
    distance = np.sqrt((lx - rx) ** 2 + (ly - ry) ** 2)
    cx = abs(lx - rx) / 2 + min(lx, rx)
    cy = abs(ly - ry) / 2 + min(ly, ry)
    half = distance * (sign_space / 2)
    # Widened to hold the keypoints; like the original, a coordinate <= 0 does not count (it was its "missing").
    xs, ys = points[points[:, 0] > 0, 0], points[points[:, 1] > 0, 1]
    x0, x1 = min(cx - half, *xs), max(cx + half, *xs)
    y0, y1 = min(cy - half, *ys), max(cy + half, *ys)
    clip = lambda v, hi: int(np.round(np.clip(v, 0, hi)))  # noqa: E731
    return clip(x0, width), clip(y0, height), clip(x1, width), clip(y1, height)


def signing_space(lm: Landmarks, sign_space: float = SIGN_SPACE) -> Box | None:
    """The clip's signing space in the frame's pixels (the median of its frames' boxes), or None when no frame
    has a body or the box is empty: no signer to crop."""
    boxes = []
    for t in np.flatnonzero(lm.body_found):
        parts = [lm.body[t, :BODY_POINTS, :2]]
        parts += [arr[t, :, :2] for arr, found in ((lm.face, lm.face_found), (lm.left_hand, lm.left_found),
                                                  (lm.right_hand, lm.right_found)) if found[t]]
        boxes.append(_frame_space(np.concatenate(parts).astype(np.float64), lm.width, lm.height, sign_space))
    if not boxes:
        return None
    x0, y0, x1, y1 = (int(np.round(v)) for v in np.median(np.array(boxes), axis=0))
    return Box(x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


# --------------------------------------------------------------------------------------------- signer crop


def _paste(frame: np.ndarray, box: Box, fill: int) -> np.ndarray:
    """frame[box], with `fill` where the box runs past the frame."""
    h, w = frame.shape[:2]
    out = np.full((box.y1 - box.y0, box.x1 - box.x0, 3), fill, np.uint8)
    sx0, sy0, sx1, sy1 = max(box.x0, 0), max(box.y0, 0), min(box.x1, w), min(box.y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - box.y0:sy1 - box.y0, sx0 - box.x0:sx1 - box.x0] = frame[sy0:sy1, sx0:sx1]
    return out


def crop_signer(frames: np.ndarray, box: Box, size: int = CROP_SIZE) -> np.ndarray:
    """The signer crop of every frame: uint8 [T, size, size, 3] RGB (the square of `box`, padded with 114)."""
    square = _square(box.x0, box.y0, box.x1, box.y1)
    if square.x1 <= square.x0:
        raise ValueError(f"empty signing space {box}")
    return np.stack([cv2.resize(_paste(f, square, PAD_COLOUR), (size, size)) for f in frames])


def landmarks_in_crop(lm: Landmarks, box: Box, size: int = CROP_SIZE) -> Landmarks:
    """The landmarks in the signer crop's pixels (x, y moved and scaled like the image, rounded to 3 decimals,
    float64 like the original's JSON numbers); z, the world landmarks and the found masks as they were."""
    square = _square(box.x0, box.y0, box.x1, box.y1)
    scale = size / (square.x1 - square.x0)

    def move(points: np.ndarray, found: np.ndarray) -> np.ndarray:
        out = points.astype(np.float64)
        # The original's order of operations: scale, then subtract the scaled corner.
        out[..., 0] = out[..., 0] * scale - square.x0 * scale
        out[..., 1] = out[..., 1] * scale - square.y0 * scale
        out[..., :2] = np.round(out[..., :2], 3)
        out[~found] = 0
        return out

    return replace(lm, body=move(lm.body, lm.body_found), face=move(lm.face, lm.face_found),
                   left_hand=move(lm.left_hand, lm.left_found), right_hand=move(lm.right_hand, lm.right_found),
                   width=size, height=size)


def mae_input(signer_frames: np.ndarray, size: int = MAE_SIZE) -> np.ndarray:
    """The signer crop at MAE's input size, uint8 [T, size, size, 3] RGB (bilinear, as the original's cv2.resize)."""
    return np.stack([cv2.resize(f, (size, size)) for f in signer_frames])


# --------------------------------------------------------------------------------------------- 208 numbers


def _divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b, 0 where b is 0 (the original's safe_divide)."""
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def _local(points: np.ndarray) -> np.ndarray:
    """Each frame's points [T, N, 2] in their own padded square, mapped to [-1, 1] (normalization.py's
    local_keypoint_normalization, step for step, so the float64 results agree to the last bit)."""
    p = points - points.min(axis=1, keepdims=True)
    xmax, ymax = p[:, :, 0].max(axis=1), p[:, :, 1].max(axis=1)
    diff = np.abs(xmax - ymax)
    shift = np.floor(diff / 2)
    wide = xmax > ymax
    p[wide, :, 1] += shift[wide, None]
    p[~wide, :, 0] += shift[~wide, None]
    ymax = np.where(wide, ymax + diff, ymax)
    xmax = np.where(wide, xmax, xmax + diff)
    padding = np.maximum(xmax, ymax) * LOCAL_PADDING
    p += padding[:, None, None]
    return _divide(p, (xmax + 2 * padding)[:, None, None]) * 2 - 1


def _global(body: np.ndarray) -> np.ndarray:
    """Body points [T, N, 2] around the shoulders' midpoint, in units of 1.5 shoulder distances."""
    left, right = body[:, L_SHOULDER], body[:, R_SHOULDER]
    distance = np.sqrt(((left - right) ** 2).sum(axis=1))
    centre = np.abs(left - right) / 2 + np.minimum(left, right)
    return _divide(body - centre[:, None], (GLOBAL_SCALE * distance)[:, None, None])


def pose_features(lm: Landmarks, face_box: str = "selected") -> np.ndarray:
    """float32 [T, 208] from landmarks in the signer crop (landmarks_in_crop): body 25, right hand 21, left hand 21,
    face 37, each point (x, y). face_box: "selected" normalises the face in the box of its 37 points, "all" in
    the box of all 478."""
    if face_box not in FACE_BOXES:
        raise ValueError(f"face_box must be one of {FACE_BOXES}, not {face_box!r}")

    def part(values: np.ndarray, found: np.ndarray, missing: float) -> np.ndarray:
        return np.where(found[:, None, None], values, missing)

    xy = lambda a: a[..., :2].astype(np.float64)  # noqa: E731
    face = (_local(xy(lm.face)[:, list(FACE_POINTS)]) if face_box == "selected"
            else _local(xy(lm.face))[:, list(FACE_POINTS)])
    points = np.concatenate([part(_global(xy(lm.body)[:, :BODY_POINTS]), lm.body_found, 0.0),
                             part(_local(xy(lm.right_hand)), lm.right_found, -1.0),
                             part(_local(xy(lm.left_hand)), lm.left_found, -1.0),
                             part(face, lm.face_found, -1.0)], axis=1)
    return points.reshape(len(points), FEATURES).astype(np.float32)


# --------------------------------------------------------------------------------------------- part crops


def part_box(points: np.ndarray, width: int, height: int, border: float = PART_BORDER) -> Box:
    """A part's box in a frame from its landmarks' x, y: rounded to pixels, squared with a border, then shifted
    (not cut) to lie inside the frame; cut only where it is larger than the frame."""
    kp = np.round(points[:, :2]).astype(int)
    b = _square(kp[:, 0].min(), kp[:, 1].min(), kp[:, 0].max(), kp[:, 1].max(), border)

    def inside(lo: int, hi: int, limit: int) -> tuple[int, int]:
        side = max(hi - lo, 1)                 # a part whose points coincide still gets a pixel
        lo = max(min(lo, limit - side), 0)
        return lo, min(lo + side, limit)

    (x0, x1), (y0, y1) = inside(b.x0, b.x1, width), inside(b.y0, b.y1, height)
    return Box(x0, y0, x1, y1)


def part_crops(signer_frames: np.ndarray, lm: Landmarks, size: int = PART_SIZE,
               border: float = PART_BORDER) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Face, left-hand and right-hand crops, each uint8 [T, size, size, 3] RGB, from the signer crop's frames and
    the landmarks in its pixels. A frame without the part repeats the part's previous crop, or is black."""
    h, w = signer_frames.shape[1:3]
    out = []
    for points, found in ((lm.face, lm.face_found), (lm.left_hand, lm.left_found), (lm.right_hand, lm.right_found)):
        crops = np.zeros((len(signer_frames), size, size, 3), np.uint8)
        for t, frame in enumerate(signer_frames):
            if found[t]:
                b = part_box(points[t], w, h, border)
                crops[t] = cv2.resize(frame[b.y0:b.y1, b.x0:b.x1], (size, size), interpolation=cv2.INTER_AREA)
            elif t > 0:
                crops[t] = crops[t - 1]
        out.append(crops)
    return out[0], out[1], out[2]


# --------------------------------------------------------------------------------------------- one clip


@dataclass
class SignerInputs:
    """What the encoders and the pose stream take from one clip."""
    box: Box                     # the signing space in the frame's pixels
    signer: np.ndarray           # uint8 [T, 512, 512, 3] RGB: MAE reads it (mae_input), the part crops come from it
    landmarks: Landmarks         # in the signer crop's pixels
    pose: np.ndarray             # float32 [T, 208]
    face: np.ndarray             # uint8 [T, 56, 56, 3] RGB, for DINOv2's face model
    left_hand: np.ndarray        # uint8 [T, 56, 56, 3] RGB, for DINOv2's hand model
    right_hand: np.ndarray


def signer_inputs(frames: np.ndarray, lm: Landmarks, loc: str, face_box: str = "selected") -> SignerInputs:
    """Steps 1-4 for one clip: its RGB frames (uint8 [T, H, W, 3]) and their landmarks (landmarks.detect)."""
    if len(frames) != len(lm) or frames.shape[1:3] != (lm.height, lm.width):
        raise DataError(f"{loc}: {len(lm)} landmark frames of {lm.width}x{lm.height} for {len(frames)} video "
                        f"frames of {frames.shape[2]}x{frames.shape[1]}")
    box = signing_space(lm)
    if box is None:
        raise DataError(f"{loc}: no person found (no frame with a body)")
    signer = crop_signer(frames, box)
    in_crop = landmarks_in_crop(lm, box)
    face, left, right = part_crops(signer, in_crop)
    return SignerInputs(box, signer, in_crop, pose_features(in_crop, face_box), face, left, right)
