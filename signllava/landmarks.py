"""MediaPipe Holistic landmarks of one clip, and their `.pose` file (sign-language-processing's pose-format).

Landmarks come from MediaPipe's legacy `solutions.holistic` (pose 33, refined face mesh 478, two hands of 21),
whose models ship inside the mediapipe wheel: nothing is downloaded at run time. Only model_complexity=1 ships
(0 and 2 are fetched on first use), so that is the one we run. Each clip gets a fresh graph in video mode:
tracking carries from frame to frame within the clip, never across clips, so a clip's landmarks do not depend
on which clips a worker saw before it.

Coordinates are the frame's pixels (x to the right, y down), as pose-format's own MediaPipe exporter writes them:
x = MediaPipe's normalised x times the frame width, y times the height, z as MediaPipe gives it (relative depth,
not scaled). Arrays are float32, the `.pose` file's own type, so a file read back holds the very same numbers.

Left and right are the signer's own, as MediaPipe labels them: the pose's LEFT_SHOULDER (11) is the signer's
left shoulder (on the right of the image for a signer facing the camera), and Holistic's left hand is the hand
it tracks from the pose's left wrist. The original (JSALT2024/PoseEstimation) assigned its hand-landmarker's
hands to the sides the same way, by matching them to the pose's left (15) and right (16) wrists, so our
"left hand" is its "left_hand_landmarks".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from signllava.atomic import atomic_file
from signllava.errors import DataError

# The only Holistic settings that work offline, plus MediaPipe's own defaults for the rest; recorded by
# extract.py in extraction.json so the landmarks can be made again the same way.
HOLISTIC_SETTINGS = dict(static_image_mode=False, model_complexity=1, smooth_landmarks=True,
                         refine_face_landmarks=True, enable_segmentation=False,
                         min_detection_confidence=0.5, min_tracking_confidence=0.5)

# pose-format's component names and sizes, in its file order.
COMPONENTS = (("POSE_LANDMARKS", 33), ("FACE_LANDMARKS", 478), ("LEFT_HAND_LANDMARKS", 21),
              ("RIGHT_HAND_LANDMARKS", 21), ("POSE_WORLD_LANDMARKS", 33))


@dataclass
class Landmarks:
    """One clip's landmarks: arrays [T, N, 3] float32 (x, y in pixels, z as MediaPipe gives it) and, per part,
    a found mask [T] bool. A part not found in a frame holds zeros there."""
    body: np.ndarray             # [T, 33, 3]
    body_visibility: np.ndarray  # [T, 33] MediaPipe's visibility of each body point (0 where not found)
    body_world: np.ndarray       # [T, 33, 3] MediaPipe's world landmarks, scaled as pose-format stores them
    face: np.ndarray             # [T, 478, 3]
    left_hand: np.ndarray        # [T, 21, 3] the signer's left hand
    right_hand: np.ndarray       # [T, 21, 3] the signer's right hand
    body_found: np.ndarray       # [T] bool
    face_found: np.ndarray
    left_found: np.ndarray
    right_found: np.ndarray
    width: int                   # the frame the pixel coordinates refer to
    height: int
    fps: float

    def __len__(self) -> int:
        return len(self.body)


def _points(component, n: int, width: int, height: int) -> np.ndarray:
    """A MediaPipe landmark list as [n, 3] pixels (x, y) and raw z; zeros when the part was not found."""
    if component is None:
        return np.zeros((n, 3), np.float32)
    xyz = np.array([(p.x, p.y, p.z) for p in component.landmark], np.float64)
    xyz[:, 0] *= width
    xyz[:, 1] *= height
    return xyz.astype(np.float32)


def detect(frames: np.ndarray, fps: float, loc: str) -> Landmarks:
    """Holistic over one clip's RGB frames (uint8 [T, H, W, 3]); `loc` names the clip in errors."""
    if not (isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4
            and frames.shape[-1] == 3 and len(frames) > 0):
        raise DataError(f"{loc}: frames must be a non-empty uint8 array [T, H, W, 3], got "
                        f"{getattr(frames, 'dtype', type(frames).__name__)} {getattr(frames, 'shape', '')}")
    return detect_stream(iter(frames), fps, loc)


def detect_stream(frames, fps: float, loc: str) -> Landmarks:
    """Holistic over RGB frames (uint8 [H, W, 3]) as they come, one graph for all of them, without holding
    them: a whole video's landmarks for segmenting it (translate.py), in the memory of its landmarks alone."""
    import mediapipe as mp   # heavy (protobuf graphs); only the landmark workers need it

    parts = {name: [] for name in ("body", "vis", "world", "face", "left", "right")}
    height = width = None
    with mp.solutions.holistic.Holistic(**HOLISTIC_SETTINGS) as holistic:
        for frame in frames:
            height, width = frame.shape[:2]
            r = holistic.process(np.ascontiguousarray(frame))
            parts["body"].append(_points(r.pose_landmarks, 33, width, height))
            parts["vis"].append(np.zeros(33, np.float32) if r.pose_landmarks is None else
                                np.array([p.visibility for p in r.pose_landmarks.landmark], np.float32))
            # pose-format's exporter scales the world landmarks by the frame size too; so do we, so that
            # our files and its own are alike to any tool that reads them.
            parts["world"].append(_points(r.pose_world_landmarks, 33, width, height))
            parts["face"].append(_points(r.face_landmarks, 478, width, height))
            parts["left"].append(_points(r.left_hand_landmarks, 21, width, height))
            parts["right"].append(_points(r.right_hand_landmarks, 21, width, height))
    if width is None:
        raise DataError(f"{loc}: zero frames")
    return _from_arrays(np.stack(parts["body"]), np.stack(parts["vis"]), np.stack(parts["world"]),
                        np.stack(parts["face"]), np.stack(parts["left"]), np.stack(parts["right"]),
                        width, height, fps)


def _found(points: np.ndarray, confidence: np.ndarray | None = None) -> np.ndarray:
    """A part counts as found in a frame when any of its numbers is set (MediaPipe never returns an all-zero
    part; a missing one is stored as zeros with zero confidence)."""
    found = np.any(points != 0, axis=(1, 2))
    return found if confidence is None else found | np.any(confidence > 0, axis=1)


def _from_arrays(body, vis, world, face, left, right, width, height, fps) -> Landmarks:
    return Landmarks(body=body, body_visibility=vis, body_world=world, face=face, left_hand=left,
                     right_hand=right, body_found=_found(body, vis), face_found=_found(face),
                     left_found=_found(left), right_found=_found(right), width=int(width), height=int(height),
                     fps=float(fps))


# ---------------------------------------------------------------------------------------------------- .pose


def to_pose(lm: Landmarks):
    """The landmarks as a pose-format `Pose`, laid out as pose-format's own Holistic exporter lays it out
    (its header builder, refined face): POSE, FACE, LEFT_HAND, RIGHT_HAND, POSE_WORLD."""
    from pose_format import Pose
    from pose_format.numpy import NumPyPoseBody
    from pose_format.pose_header import PoseHeader, PoseHeaderDimensions
    from pose_format.utils.holistic import holistic_components

    header = PoseHeader(version=0.2, dimensions=PoseHeaderDimensions(width=lm.width, height=lm.height, depth=0),
                        components=holistic_components("XYZC", additional_face_points=10))
    data = np.concatenate([lm.body, lm.face, lm.left_hand, lm.right_hand, lm.body_world], axis=1)
    ones = lambda found, n: np.repeat(found.astype(np.float32)[:, None], n, axis=1)  # noqa: E731
    # Confidence as the exporter writes it: visibility for the body (MediaPipe gives its world landmarks the
    # same visibility), 1 for a found face or hand, 0 for a missing part.
    confidence = np.concatenate([lm.body_visibility, ones(lm.face_found, 478), ones(lm.left_found, 21),
                                 ones(lm.right_found, 21), lm.body_visibility], axis=1)
    body = NumPyPoseBody(fps=lm.fps, data=data[:, None].astype(np.float32),
                         confidence=confidence[:, None].astype(np.float32))
    return Pose(header, body)


def save_pose(lm: Landmarks, path: str | Path) -> None:
    """Write the landmarks as a `.pose` file; written beside and renamed into place, so a file that exists is
    complete."""
    with atomic_file(path, "wb") as f:
        to_pose(lm).write(f)


def load_pose(path: str | Path) -> Landmarks:
    """Read a `.pose` file written by save_pose (or by pose-format's Holistic exporter with a refined face)."""
    from pose_format import Pose

    try:
        pose = Pose.read(Path(path).read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: pose file not found") from None
    except Exception as e:   # pose-format raises struct / value / index errors on a bad or truncated file
        raise DataError(f"{path}: unreadable .pose file ({type(e).__name__}: {e})") from None
    layout = tuple((c.name, len(c.points)) for c in pose.header.components)
    if layout != COMPONENTS:
        raise DataError(f"{path}: not a MediaPipe Holistic pose with a refined face: components {layout}")
    data = np.ma.getdata(pose.body.data)
    if data.ndim != 4 or data.shape[1] < 1 or data.shape[-1] != 3:
        raise DataError(f"{path}: expected [frames, people, points, 3] data, got {data.shape}")
    data = np.asarray(data[:, 0], np.float32)
    confidence = np.asarray(pose.body.confidence[:, 0], np.float32)
    split = np.cumsum([n for _, n in COMPONENTS])[:-1]
    body, face, left, right, world = np.split(data, split, axis=1)
    dims = pose.header.dimensions
    return _from_arrays(body, confidence[:, :33], world, face, left, right, dims.width, dims.height,
                        pose.body.fps)
