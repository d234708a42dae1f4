"""--segments: the policies, fixed windows, and `auto` on made-up signers with known cut points (arrays built
directly: fast, exact), plus once on real MediaPipe landmarks of a filmed photo that stands still, moves, stands."""
import math

import numpy as np
import pytest

from signllava import segmentation as S
from signllava.landmarks import Landmarks

W, H, SW = 320, 240, 80.0          # frame size; shoulder width in pixels
REST_BODY = {0: (160, 60), 11: (200, 110), 12: (120, 110), 13: (215, 170), 14: (105, 170), 15: (210, 215),
             16: (110, 215), 23: (190, 235), 24: (130, 235)}
SIGNING_WRIST = np.array([150.0, 130.0])   # the right wrist in the signing space, a quarter width below the shoulders
LAP_WRIST = np.array([110.0, 215.0])       # ... and resting low
HAND_SHAPE = np.stack([np.linspace(0, 20, 21), -np.linspace(0, 24, 21) ** 1.1], axis=1)  # 21 points off the wrist


def signer(fps, seconds, active, *, speed=lambda t: 1.0, hands=True, wrist=SIGNING_WRIST, up=True,
           whole_body=False, missing=None, seed=0, jitter=0.3):
    """Landmarks of a signer whose right hand (or, with whole_body, whole upper body, hands never found) moves
    during the `active` [start, end) stretches, in seconds, and holds still otherwise; the hand circles from
    `wrist` upwards (or downwards). `speed(t)` scales the motion; `missing` marks frames where Holistic lost
    the right hand; every point jitters by `jitter` pixels."""
    t = int(round(seconds * fps))
    times = np.arange(t) / fps
    rate = np.zeros(t)
    for start, end in active:
        rate[(times >= start - 1e-9) & (times < end - 1e-9)] = 1.0
    rate *= np.array([speed(x) for x in times])
    u = (np.cumsum(rate) - rate / 2) / fps   # seconds of motion up to each frame's middle
    phase = 2 * np.pi * 1.5 * u                                # one and a half circles a second
    body = np.zeros((t, 33, 3), np.float32)
    for i in range(33):
        body[:, i, :2] = REST_BODY.get(i, (160, 50 if i < 11 else 300))
    vis = np.full((t, 33), 0.99, np.float32)
    vis[:, 25:] = 0.1                                           # legs out of frame
    if whole_body:
        # The demo language: the whole photo turns and slides; MediaPipe finds no hands and guesses the wrists.
        angle, shift = 0.15 * np.sin(phase), 25 * np.sin(phase / 2)
        c, s = np.cos(angle)[:, None], np.sin(angle)[:, None]
        x, y = body[:, :, 0] - 160, body[:, :, 1] - 235
        body[:, :, 0], body[:, :, 1] = 160 + c * x - s * y + shift[:, None], 235 + s * x + c * y
        vis[:, [15, 16]] = 0.2
        body[:, [15, 16], :2] += np.random.default_rng(seed + 1).normal(0, 6, (t, 2, 2))
        hands = False
    right = np.zeros((t, 21, 3), np.float32)
    if hands:
        path = np.asarray(wrist) + 0.4 * SW * np.stack([np.sin(phase), (np.cos(phase) - 1) * (1 if up else -1)], 1)
        body[:, 16, :2], body[:, 14, :2] = path, (np.array(REST_BODY[14]) + path) / 2
        right[:, :, :2] = path[:, None] + HAND_SHAPE[None]
    rng = np.random.default_rng(seed)
    body[:, :, :2] += rng.normal(0, jitter, (t, 33, 2))
    right[:, :, :2] += rng.normal(0, jitter, (t, 21, 2))
    found = np.full(t, hands) if missing is None else hands & ~missing
    right[~found] = 0.0
    return Landmarks(body=body, body_visibility=vis, body_world=np.zeros_like(body),
                     face=np.zeros((t, 478, 3), np.float32), left_hand=np.zeros((t, 21, 3), np.float32),
                     right_hand=right, body_found=np.ones(t, bool), face_found=np.zeros(t, bool),
                     left_found=np.zeros(t, bool), right_found=found, width=W, height=H, fps=float(fps))


def spans(segments):
    return [(seg.start, seg.end) for seg in segments]


def assert_near(got, want, fps, frames=2):
    assert len(got) == len(want), (spans(got), want)
    for seg, (start, end) in zip(got, want):
        assert abs(seg.start - start) <= frames / fps + 1e-9 and abs(seg.end - end) <= frames / fps + 1e-9, \
            (spans(got), want)


SENTENCES = [(1.0, 4.0), (5.0, 7.4)]


# ------------------------------------------------------------------------------------------------ auto


@pytest.mark.parametrize("fps", [25, 30])
def test_known_cut_points_are_recovered(fps):
    lm = signer(fps, 8.6, SENTENCES)
    assert_near(S.auto_segments(lm), SENTENCES, fps)
    # Whole frames: every time is a frame boundary.
    for seg in S.auto_segments(lm):
        for time in (seg.start, seg.end):
            assert math.isclose(time * fps, round(time * fps))


def test_activity_does_not_depend_on_fps_or_camera_distance():
    at_25, at_30 = S.signing_activity(signer(25, 8.6, SENTENCES)), S.signing_activity(signer(30, 8.6, SENTENCES))
    assert np.median(at_25[30:95]) == pytest.approx(np.median(at_30[36:114]), rel=0.05)
    far = signer(25, 8.6, SENTENCES)
    for arr in (far.body, far.right_hand):
        arr[:, :, :2] *= 0.5                                      # the same signer, twice as far away
    assert np.median(S.signing_activity(far)[30:95]) == pytest.approx(np.median(at_25[30:95]), rel=0.05)
    assert S.auto_segments(far) == S.auto_segments(signer(25, 8.6, SENTENCES))


def test_signing_to_the_last_frame_ends_at_the_video_end():
    lm = signer(25, 6.0, [(1.0, 6.0)])
    assert_near(S.auto_segments(lm), [(1.0, 6.0)], 25)
    assert S.auto_segments(lm)[-1].end == pytest.approx(len(lm) / 25)


def test_raised_hands_count_more_than_the_same_motion_at_rest():
    raised = S.signing_activity(signer(25, 4.0, [(0.0, 4.0)]))
    low = S.signing_activity(signer(25, 4.0, [(0.0, 4.0)], wrist=LAP_WRIST, up=False))
    # The raised hand circles between a quarter shoulder width below the shoulders and above them.
    assert 1 + S.RAISED_GAIN * 0.7 < np.median(raised) / np.median(low) < 1 + S.RAISED_GAIN * 1.05


@pytest.mark.parametrize("case", ["jitter", "perfectly still", "no body", "guessed wrists"])
def test_a_still_video_has_no_segments(case):
    lm = signer(25, 6.0, [], jitter=0.0 if case == "perfectly still" else 0.5, whole_body=case == "guessed wrists")
    if case == "no body":
        lm.body_found[:] = False
    assert S.auto_segments(lm) == []
    assert S.signing_activity(lm).max() < S.ENTER_FLOOR


def test_a_hand_lost_in_some_frames_does_not_split_a_segment():
    rng = np.random.default_rng(3)
    missing = rng.random(round(8.6 * 25)) < 0.3
    missing[60:68] = True                      # and eight frames in a row, mid-sentence
    lm = signer(25, 8.6, SENTENCES, missing=missing)
    assert lm.right_found.sum() < 0.75 * len(lm)
    assert_near(S.auto_segments(lm), SENTENCES, 25)


@pytest.mark.parametrize("fps", [25, 30])
def test_body_motion_alone_segments_when_hands_are_never_found(fps):
    lm = signer(fps, 8.6, SENTENCES, whole_body=True)
    assert not lm.right_found.any() and not lm.left_found.any()
    assert_near(S.auto_segments(lm), SENTENCES, fps)


def test_a_long_stretch_is_split_at_its_quietest_moment():
    quiet = lambda t: 0.5 if 6.0 <= t < 6.4 else 1.0              # noqa: E731  a slower moment mid-stretch
    got = S.auto_segments(signer(25, 15.0, [(0.5, 14.5)], speed=quiet), max_seconds=10.0)
    assert len(got) == 2 and 6.0 <= got[0].end <= 6.4 and got[0].end == got[1].start
    assert got[0].start == pytest.approx(0.5, abs=0.08) and got[1].end == pytest.approx(14.5, abs=0.08)


def test_a_very_long_stretch_is_split_again_until_each_piece_fits():
    dips = [(k, k + 0.4) for k in (4.0, 8.0, 12.0, 16.0, 20.0)]
    slow = lambda t: 0.5 if any(a <= t < b for a, b in dips) else 1.0   # noqa: E731
    got = S.auto_segments(signer(25, 25.0, [(0.5, 24.5)], speed=slow), min_seconds=1.0, max_seconds=7.0)
    assert len(got) >= 4 and all(1.0 <= seg.end - seg.start <= 7.0 for seg in got)
    assert all(a.end == b.start for a, b in zip(got, got[1:]))        # cut, not trimmed
    assert all(any(a <= seg.end <= b for a, b in dips) for seg in got[:-1])


def test_blips_are_dropped_and_a_lone_sign_beside_a_sentence_joins_it():
    # A sentence, a short sign 0.7 s after it (a pause, but within the join gap), a 0.2 s blip far from
    # anything, and a second sentence.
    lm = signer(25, 11.0, [(1.0, 3.0), (3.7, 4.1), (6.0, 6.2), (8.0, 10.0)])
    assert_near(S.auto_segments(lm), [(1.0, 4.1), (8.0, 10.0)], 25)
    assert S.auto_segments(signer(25, 5.0, [(2.0, 2.3)])) == []


def test_pauses_shorter_than_the_minimum_do_not_cut():
    hold = signer(25, 6.0, [(1.0, 2.5), (2.8, 5.0)])                 # a 0.3 s hold inside one sentence
    assert_near(S.auto_segments(hold), [(1.0, 5.0)], 25)
    pause = signer(25, 6.0, [(1.0, 2.5), (3.3, 5.0)])                # a 0.8 s pause between two
    assert_near(S.auto_segments(pause), [(1.0, 2.5), (3.3, 5.0)], 25)
    assert_near(S.auto_segments(pause, min_pause=1.0), [(1.0, 5.0)], 25)


def test_impossible_lengths_are_refused():
    with pytest.raises(ValueError, match="min_seconds"):
        S.auto_segments(signer(25, 2.0, []), min_seconds=3.0, max_seconds=5.0)


# ------------------------------------------------------------------------------------ fixed and policy


def test_fixed_segments_cover_the_video_exactly():
    assert S.fixed_segments(10.0, 2.5) == [S.Segment(0, 2.5), S.Segment(2.5, 5.0), S.Segment(5.0, 7.5),
                                           S.Segment(7.5, 10.0)]
    assert S.fixed_segments(10.0, 3.0)[-1] == S.Segment(9.0, 10.0) and len(S.fixed_segments(10.0, 3.0)) == 4
    assert S.fixed_segments(2.0, 5.0) == [S.Segment(0.0, 2.0)]
    assert S.fixed_segments(0.0, 5.0) == []
    for duration, seconds, count in ((0.3, 0.1, 3), (0.7, 0.1, 7), (1.0, 0.1, 10)):   # 0.7 / 0.1 = 6.99...
        got = S.fixed_segments(duration, seconds)
        assert len(got) == count and got[-1].end == duration and got[-1].end - got[-1].start > 0.09
    with pytest.raises(ValueError):
        S.fixed_segments(10.0, 0.0)


def test_parse_policy():
    assert S.parse_policy("auto") == S.SegmentPolicy("auto")
    assert S.parse_policy("captions") == S.SegmentPolicy("captions", None)
    assert S.parse_policy("fixed:5") == S.SegmentPolicy("fixed", 5.0)
    assert S.parse_policy("fixed:0.5").seconds == 0.5


@pytest.mark.parametrize("text", ["", "Auto", "auto ", "fixed", "fixed:", "fixed:0", "fixed:-2", "fixed:abc",
                                  "fixed:nan", "fixed:inf", "sentences", "5"])
def test_parse_policy_refuses_other_forms_in_one_line(text):
    with pytest.raises(ValueError) as err:
        S.parse_policy(text)
    message = str(err.value)
    assert "\n" not in message and "--segments" in message
    assert all(form in message for form in ("auto", "captions", "fixed:S")) and repr(text) in message


# ------------------------------------------------------------------------------------ real landmarks


def test_real_mediapipe_landmarks_of_a_photo_that_moves_for_a_second(tmp_path):
    from signllava import landmarks as L
    from signllava.video_io import read_clip, write_video
    from tests.video_kit import film_astronaut_still_move_still

    # Through a real file, as translate.py reads it: codec noise on the still frames too.
    path = write_video(tmp_path / "astronaut.mp4", film_astronaut_still_move_still(25, 25, 30), fps=25)
    clip = read_clip(path, None, None, "astronaut.mp4", max_seconds=60)
    lm = L.detect(clip.frames, clip.fps, "astronaut.mp4")
    assert lm.body_found.all() and not lm.left_found.any() and not lm.right_found.any()
    got = S.auto_segments(lm)
    # It moves over frames 25..50 (1.0 s to 2.0 s); MediaPipe's landmark smoothing trails the motion by up to
    # ~0.4 s as it settles.
    assert len(got) == 1, spans(got)
    assert got[0].start == pytest.approx(1.0, abs=0.12) and 2.0 <= got[0].end <= 2.6, spans(got)
    assert S.signing_activity(lm)[-5:].max() < S.LEAVE_FLOOR       # and is still again at the end
