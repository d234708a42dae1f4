"""The pose stream and the crops: real MediaPipe on a filmed photo, and the recipe's rules on made-up landmarks.

The reference computation here is written apart from signllava/pose_features.py, from the original's
description, in plain per-point loops: it shares no code with the module, so both agreeing means something.
"""
import math

import av
import cv2
import numpy as np
import pytest

from signllava import landmarks as L
from signllava import pose_features as P
from signllava.errors import DataError
from tests.video_kit import film_astronaut

FACE_37 = [0, 4, 13, 14, 17, 33, 39, 46, 52, 55, 61, 64, 81, 93, 133, 151, 152, 159, 172, 178, 181, 263, 269,
           276, 282, 285, 291, 294, 311, 323, 362, 386, 397, 402, 405, 468, 473]


# ------------------------------------------------------------------------------------ the reference recipe


def ref_signing_box(lm):
    """Per frame with a body: 4 shoulder distances around the shoulders' midpoint, widened by every keypoint
    with a positive coordinate, clipped, rounded; then the median of each side."""
    sides = []
    for t in range(len(lm.body)):
        if not lm.body_found[t]:
            continue
        pts = [tuple(map(float, lm.body[t][i][:2])) for i in range(25)]
        for arr, found in ((lm.face, lm.face_found), (lm.left_hand, lm.left_found), (lm.right_hand, lm.right_found)):
            if found[t]:
                pts += [tuple(map(float, p[:2])) for p in arr[t]]
        (lx, ly), (rx, ry) = pts[11], pts[12]
        d = math.sqrt((lx - rx) ** 2 + (ly - ry) ** 2)
        cx, cy = (lx + rx) / 2, (ly + ry) / 2
        x0, x1, y0, y1 = cx - 2 * d, cx + 2 * d, cy - 2 * d, cy + 2 * d
        for x, y in pts:
            if x > 0:
                x0, x1 = min(x0, x), max(x1, x)
            if y > 0:
                y0, y1 = min(y0, y), max(y1, y)
        sides.append([round(min(max(x0, 0), lm.width)), round(min(max(y0, 0), lm.height)),
                      round(min(max(x1, 0), lm.width)), round(min(max(y1, 0), lm.height))])
    return [round(float(np.median([s[k] for s in sides]))) for k in range(4)]


def ref_square(x0, y0, x1, y1):
    w, h = x1 - x0, y1 - y0
    if w > h:
        y0 -= (w - h) // 2
    else:
        x0 -= (h - w) // 2
    return x0, y0, max(w, h)


def ref_local(points):
    """A part's points in their own square, padded by 0.2 of its side, to [-1, 1]."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    w, h = max(xs) - min(xs), max(ys) - min(ys)
    side = max(w, h)
    shift_x = math.floor(abs(w - h) / 2) if h >= w else 0.0
    shift_y = math.floor(abs(w - h) / 2) if w > h else 0.0
    pad = 0.2 * side
    out = []
    for x, y in points:
        out.append(((x - min(xs) + shift_x + pad) / (side + 2 * pad)) * 2 - 1)
        out.append(((y - min(ys) + shift_y + pad) / (side + 2 * pad)) * 2 - 1)
    return out


def ref_features(lm, box, size=512, face_all=False):
    """The 208 numbers from landmarks in the frame's pixels and the signing box."""
    sx0, sy0, side = ref_square(*box)
    scale = size / side
    rows = []
    for t in range(len(lm.body)):
        def crop(arr):
            # Into the crop as the original moves points (scale, then subtract the scaled corner) and rounded
            # with numpy as it rounds them: float32 pixels times 512 / side often land exactly on a tie at the
            # third decimal, and these two choices decide which way it goes.
            return [(float(np.round(float(p[0]) * scale - sx0 * scale, 3)),
                     float(np.round(float(p[1]) * scale - sy0 * scale, 3))) for p in arr[t]]
        row = []
        if lm.body_found[t]:
            body = crop(lm.body)[:25]
            (lx, ly), (rx, ry) = body[11], body[12]
            unit = 1.5 * math.sqrt((lx - rx) ** 2 + (ly - ry) ** 2)
            for x, y in body:
                row += [(x - (lx + rx) / 2) / unit, (y - (ly + ry) / 2) / unit]
        else:
            row += [0.0] * 50
        for arr, found in ((lm.right_hand, lm.right_found), (lm.left_hand, lm.left_found)):
            row += ref_local(crop(arr)) if found[t] else [-1.0] * 42
        if lm.face_found[t]:
            face = crop(lm.face)
            if face_all:
                normed = ref_local(face)
                row += [v for i in FACE_37 for v in normed[2 * i:2 * i + 2]]
            else:
                row += ref_local([face[i] for i in FACE_37])
        else:
            row += [-1.0] * 74
        rows.append(row)
    return np.array(rows)


def features(lm, box):
    return P.pose_features(P.landmarks_in_crop(lm, box))


# ------------------------------------------------------------------------------------ the real MediaPipe


def mp4_round_trip(frames, path, fps=25):
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "12"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())
    with av.open(str(path)) as inp:
        return np.stack([f.to_ndarray(format="rgb24") for f in inp.decode(video=0)])


@pytest.fixture(scope="module")
def astronaut(tmp_path_factory):
    frames = mp4_round_trip(film_astronaut(), tmp_path_factory.mktemp("video") / "astronaut.mp4")
    return frames, L.detect(frames, 25.0, "astronaut.mp4")


def test_astronaut_body_and_face_found_hands_missing(astronaut):
    frames, lm = astronaut
    assert frames.shape == (8, 240, 320, 3)
    assert lm.body_found.all() and lm.face_found.all()
    assert not lm.left_found.any() and not lm.right_found.any()
    assert lm.body.shape == (8, 33, 3) and lm.face.shape == (8, 478, 3) and lm.left_hand.shape == (8, 21, 3)
    assert (lm.width, lm.height, lm.fps) == (320, 240, 25.0)
    # Pixels of the frame, the face above the shoulders, and the signer's left shoulder on the image's right.
    assert (lm.face[:, :, 0] > 0).all() and (lm.face[:, :, 0] < 320).all()
    assert (lm.face[:, :, 1].mean(axis=1) < lm.body[:, 11, 1]).all()
    assert (lm.body[:, 11, 0] > lm.body[:, 12, 0]).all()
    assert not lm.left_hand.any() and not lm.right_hand.any()


def test_astronaut_features_match_the_reference(astronaut):
    frames, lm = astronaut
    got = P.signer_inputs(frames, lm, "astronaut.mp4")
    box = ref_signing_box(lm)
    assert [got.box.x0, got.box.y0, got.box.x1, got.box.y1] == box
    assert box[2] - box[0] < 320 and box[0] > 0          # a real crop, not the whole frame
    assert got.pose.shape == (8, 208) and got.pose.dtype == np.float32
    np.testing.assert_allclose(got.pose, ref_features(lm, box), rtol=0, atol=1e-6)
    np.testing.assert_allclose(P.pose_features(got.landmarks, face_box="all"), ref_features(lm, box, face_all=True),
                               rtol=0, atol=1e-6)
    assert (got.pose[:, 50:134] == -1).all()             # both hands missing
    assert np.abs(got.pose[:, 134:]).max() <= 1 and np.abs(got.pose[:, :50]).max() > 0
    # Crops: the signer at 512, a face on every frame, the never-seen hands black.
    assert got.signer.shape == (8, 512, 512, 3) and got.face.shape == (8, 56, 56, 3)
    assert all(f.std() > 10 for f in got.face)
    assert not got.left_hand.any() and not got.right_hand.any()
    assert P.mae_input(got.signer).shape == (8, 224, 224, 3)


def test_astronaut_pose_file_round_trip_and_determinism(astronaut, tmp_path):
    frames, lm = astronaut
    path = tmp_path / "astronaut.pose"
    L.save_pose(lm, path)
    back = L.load_pose(path)
    for name in ("body", "body_visibility", "body_world", "face", "left_hand", "right_hand",
                 "body_found", "face_found", "left_found", "right_found"):
        assert np.array_equal(getattr(back, name), getattr(lm, name)), name
    box = P.signing_space(lm)
    assert P.signing_space(back) == box
    assert np.array_equal(features(back, box), features(lm, box))
    # A fresh graph per clip: the same clip gives the same landmarks again.
    again = L.detect(frames, 25.0, "astronaut.mp4")
    assert np.array_equal(again.body, lm.body) and np.array_equal(again.face, lm.face)


# ------------------------------------------------------------------------------------ made-up landmarks


def made_landmarks(t=3, width=1000, height=1000, seed=0):
    """A body with shoulders 200 px apart, a face and two hands near it; every part found."""
    rng = np.random.default_rng(seed)
    body = np.zeros((t, 33, 3), np.float32)
    body[:, :, 0] = rng.uniform(350, 650, (t, 33))
    body[:, :, 1] = rng.uniform(150, 650, (t, 33))
    body[:, 11, :2], body[:, 12, :2] = (600, 300), (400, 300)
    face = np.zeros((t, 478, 3), np.float32)
    face[:, :, 0], face[:, :, 1] = rng.uniform(440, 560, (t, 478)), rng.uniform(120, 260, (t, 478))
    hands = [np.zeros((t, 21, 3), np.float32) for _ in range(2)]
    for hand, x in zip(hands, (650, 350)):
        hand[:, :, 0], hand[:, :, 1] = rng.uniform(x - 30, x + 30, (t, 21)), rng.uniform(420, 470, (t, 21))
    lm = L._from_arrays(body, np.full((t, 33), 0.9, np.float32), body * 0.001, face, hands[0], hands[1],
                        width, height, 29.97)
    return lm


def without(lm, part, frames):
    """The same landmarks with `part` missing in `frames` (zeros, as MediaPipe's missing parts are stored)."""
    arrays = dict(body=lm.body.copy(), face=lm.face.copy(), left_hand=lm.left_hand.copy(),
                  right_hand=lm.right_hand.copy(), vis=lm.body_visibility.copy())
    arrays[part][frames] = 0
    if part == "body":
        arrays["vis"][frames] = 0
    return L._from_arrays(arrays["body"], arrays["vis"], lm.body_world, arrays["face"], arrays["left_hand"],
                          arrays["right_hand"], lm.width, lm.height, lm.fps)


def test_missing_body_is_zero_missing_hand_or_face_is_minus_one():
    lm = made_landmarks()
    box = P.signing_space(lm)
    full = features(lm, box)
    for part, cols, value in (("body", slice(0, 50), 0.0), ("right_hand", slice(50, 92), -1.0),
                              ("left_hand", slice(92, 134), -1.0), ("face", slice(134, 208), -1.0)):
        lm2 = without(lm, part, [1])
        got = features(lm2, box)
        assert (got[1, cols] == value).all(), part
        assert np.array_equal(np.delete(got[1], np.r_[cols]), np.delete(full[1], np.r_[cols])), part
        assert np.array_equal(got[[0, 2]], full[[0, 2]]), part
        np.testing.assert_allclose(got, ref_features(lm2, [box.x0, box.y0, box.x1, box.y1]), rtol=0, atol=1e-6)


def test_face_box_all_versus_selected():
    lm = made_landmarks()
    box = P.signing_space(lm)
    crop = P.landmarks_in_crop(lm, box)
    ref_box = [box.x0, box.y0, box.x1, box.y1]
    selected, every = P.pose_features(crop), P.pose_features(crop, face_box="all")
    np.testing.assert_allclose(every, ref_features(lm, ref_box, face_all=True), rtol=0, atol=1e-6)
    assert np.array_equal(selected[:, :134], every[:, :134]) and not np.allclose(selected[:, 134:], every[:, 134:])
    with pytest.raises(ValueError, match="face_box"):
        P.pose_features(crop, face_box="some")


def test_signing_box_is_the_median_over_frames_with_a_body():
    lm = made_landmarks(t=4)
    # Shoulders 200 px apart, moving 20 px down-right each frame: boxes of side 800 around their midpoints.
    for t in range(4):
        lm.body[t, 11, :2] = (600 + 20 * t, 300 + 20 * t)
        lm.body[t, 12, :2] = (400 + 20 * t, 300 + 20 * t)
    lm.right_hand[:, 0, 0] = 950             # widens x1 in every frame
    lm.face[:, 0, :2] = (-5, 500)            # x <= 0 is not counted (the original's "missing"); y = 500 is inside
    lm = without(lm, "body", [3])            # frame 3 has no body: not counted, whatever else it holds
    lm.face[3, :, 0] = 999
    box = P.signing_space(lm)
    # Per frame (x0, y0, x1, y1): (100, 0, 950, 700), (120, 0, 950, 720), (140, 0, 950, 740) -> medians.
    assert box == P.Box(120, 0, 950, 720)
    assert [box.x0, box.y0, box.x1, box.y1] == ref_signing_box(lm)
    assert P.signing_space(without(lm, "body", [0, 1, 2, 3])) is None


def test_signer_crop_squares_pads_with_114_and_moves_landmarks():
    frame = np.arange(100 * 100 * 3, dtype=np.uint32).reshape(100, 100, 3).astype(np.uint8)
    box = P.Box(0, 0, 100, 50)               # wider than high: grows 25 up (off the frame) and 25 down
    crop = P.crop_signer(frame[None], box, size=100)[0]
    assert (crop[:25] == 114).all() and np.array_equal(crop[25:], frame[:75])
    lm = made_landmarks(t=1, width=100, height=100)
    lm.body[0, 0, :2] = (50, 0)
    lm.body[0, 1, :2] = (1 / 3, 10)
    moved = P.landmarks_in_crop(lm, box, size=200)
    assert tuple(moved.body[0, 0, :2]) == (100.0, 50.0)
    assert tuple(moved.body[0, 1, :2]) == (0.667, 70.0)                 # rounded to 3 decimals
    assert (moved.width, moved.height) == (200, 200) and moved.body[0, 0, 2] == lm.body[0, 0, 2]


def test_part_crops_shift_inside_the_frame_and_reuse_the_previous_crop():
    rng = np.random.default_rng(1)
    frames = rng.integers(0, 255, (3, 512, 512, 3), dtype=np.uint8)
    lm = made_landmarks(t=3, width=512, height=512)
    # Right hand in the bottom-right corner: its 0.25-bordered square would run past both edges.
    lm.right_hand[:, :, 0] = np.linspace(470, 510, 21)
    lm.right_hand[:, :, 1] = np.linspace(490, 500, 21)
    # Left hand near the top-left corner, found in frames 0 and 2 only; the face only in frame 1.
    lm.left_hand[:, :, 0] = np.linspace(2, 30, 21)
    lm.left_hand[:, :, 1] = np.linspace(5, 25, 21)
    lm.left_hand[2, :, :2] += 100
    lm = without(without(lm, "left_hand", [1]), "face", [0, 2])
    face, left, right = P.part_crops(frames, lm)

    # The right hand's box: x 470..510, y 490..500 -> square 40 (y 475..515), border round(40 * 0.25 / 2) = 5:
    # x 465..515, y 470..520, shifted to end at the frame's edge: x 462..512, y 462..512, side kept.
    want = cv2.resize(frames[0, 462:512, 462:512], (56, 56), interpolation=cv2.INTER_AREA)
    assert P.part_box(lm.right_hand[0], 512, 512) == P.Box(462, 462, 512, 512)
    assert np.array_equal(right[0], want)
    # Left hand: x 2..30, y 5..25 -> square 28 (y 1..29), border 4: x -2..34, y -3..33 -> shifted to 0..36.
    assert P.part_box(lm.left_hand[0], 512, 512) == P.Box(0, 0, 36, 36)
    assert np.array_equal(left[0], cv2.resize(frames[0, 0:36, 0:36], (56, 56), interpolation=cv2.INTER_AREA))
    assert np.array_equal(left[1], left[0]) and not np.array_equal(left[2], left[1])   # missing: the previous one
    assert not face[0].any() and face[1].any() and np.array_equal(face[2], face[1])    # black until first seen
    assert face.shape == left.shape == right.shape == (3, 56, 56, 3) and face.dtype == np.uint8


def test_pose_file_round_trip_with_missing_parts(tmp_path):
    from pose_format import Pose
    from pose_format.utils.generic import detect_known_pose_format

    lm = without(without(made_landmarks(t=4), "left_hand", [0, 3]), "body", [2])
    path = tmp_path / "clip.pose"
    L.save_pose(lm, path)
    back = L.load_pose(path)
    for name in ("body", "body_visibility", "body_world", "face", "left_hand", "right_hand"):
        assert np.array_equal(getattr(back, name), getattr(lm, name)), name
    assert back.left_found.tolist() == [False, True, True, False]
    assert back.body_found.tolist() == [True, True, False, True]
    assert (back.width, back.height) == (1000, 1000) and back.fps == pytest.approx(29.97, rel=1e-6)
    box = P.signing_space(lm)
    assert np.array_equal(features(back, box), features(lm, box))
    # Another tool's view: pose-format itself reads it as MediaPipe Holistic, components named as it names them.
    pose = Pose.read(path.read_bytes())
    assert detect_known_pose_format(pose) == "holistic"
    assert [c.name for c in pose.header.components][:4] == ["POSE_LANDMARKS", "FACE_LANDMARKS",
                                                           "LEFT_HAND_LANDMARKS", "RIGHT_HAND_LANDMARKS"]


def test_bad_inputs_are_one_line_errors(tmp_path):
    from pose_format import Pose
    from pose_format.numpy import NumPyPoseBody

    (tmp_path / "junk.pose").write_bytes(b"\x00\x01\x02")
    L.save_pose(made_landmarks(t=2), tmp_path / "whole.pose")
    (tmp_path / "cut.pose").write_bytes((tmp_path / "whole.pose").read_bytes()[:-4])
    pose = L.to_pose(made_landmarks(t=2))      # the same layout less its world landmarks: not ours to read
    header = pose.header
    header.components = header.components[:4]
    with open(tmp_path / "four.pose", "wb") as f:
        Pose(header, NumPyPoseBody(25.0, pose.body.data[:, :, :553].data, pose.body.confidence[:, :, :553])).write(f)
    for name, message in (("none.pose", "not found"), ("junk.pose", "unreadable"), ("cut.pose", "unreadable"),
                          ("four.pose", "not a MediaPipe Holistic pose")):
        path = tmp_path / name
        with pytest.raises(DataError, match=message) as err:
            L.load_pose(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="clip7: frames must be"):
        L.detect(np.zeros((2, 8, 8), np.uint8), 25.0, "clip7")
    lm = without(made_landmarks(t=2), "body", [0, 1])
    with pytest.raises(DataError, match="clip8: no person found"):
        P.signer_inputs(np.zeros((2, 1000, 1000, 3), np.uint8), lm, "clip8")
    with pytest.raises(DataError, match="clip9: 2 landmark frames"):
        P.signer_inputs(np.zeros((3, 1000, 1000, 3), np.uint8), made_landmarks(t=2), "clip9")
