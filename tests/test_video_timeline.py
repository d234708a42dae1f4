"""Where a video's frames lie in time, as the segments, durations and clips see them: the video stream's own
length (not a longer audio track's), streams that do not start at 0 s, variable frame rates, and phone videos
stored sideways with a display rotation. Small frames, a few seconds each, written with PyAV at exact times."""
from __future__ import annotations

import dataclasses
import logging
from fractions import Fraction

import av
import numpy as np
import pytest

from signllava import segmentation as S
from signllava.errors import DataError
from signllava.segmentation import parse_policy
from signllava.video_io import read_clip, video_timeline
from signllava.video_translate import VideoTranslator

W, H = 64, 48


def picture(i: int) -> np.ndarray:
    """Frame i: its number in the red channel, i // 32 on the left half and i % 32 on the right, 8 levels a
    step (lossy coding keeps it), so the frame a decoder gives back is known; a left-to-right ramp in green and
    a top-to-bottom one in blue (an image turned or mirrored is not the same)."""
    img = np.zeros((H, W, 3), np.uint8)
    img[:, :W // 2, 0], img[:, W // 2:, 0] = 8 * (i // 32), 8 * (i % 32)
    img[..., 1] = np.linspace(0, 250, W, dtype=np.uint8)[None, :]
    img[..., 2] = np.linspace(0, 250, H, dtype=np.uint8)[:, None]
    return img


def frame_number(img: np.ndarray) -> int:
    high, low = (int(round(float(np.median(half[..., 0])) / 8)) for half in np.split(img, 2, axis=1))
    return 32 * high + low


def write_timed(path, times, audio_seconds=None, rotation=None, codec="libx264", pictures=picture):
    """Frames pictures(0), pictures(1), ... at the given presentation times (seconds); with `audio_seconds`, a
    silent audio track that long; with `rotation`, a display matrix turning the stored picture that many
    degrees counter-clockwise (PyAV's convention, as frame.rotation reads it back)."""
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=25)
        height, width = pictures(0).shape[:2]             # sideways pictures (a phone's): the stream is theirs
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.codec_context.time_base = Fraction(1, 1000)
        video.options = {"crf": "10"} if codec == "libx264" else {}
        if rotation is not None:
            video.set_display_rotation(rotation)
        audio = out.add_stream("libopus" if str(path).endswith(".webm") else "aac", rate=48000,
                               layout="mono") if audio_seconds else None
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(pictures(i)), format="rgb24")
            frame.pts = int(round(t * 1000))
            out.mux(video.encode(frame))
        out.mux(video.encode())
        if audio is not None:
            _silence(out, audio, audio_seconds)
    return path


def _silence(out, audio, seconds: float):
    size, pts = audio.codec_context.frame_size or 1024, 0
    while pts < seconds * 48000:
        frame = av.AudioFrame.from_ndarray(np.zeros((1, size), np.float32), format="fltp", layout="mono")
        frame.sample_rate, frame.pts = 48000, pts
        out.mux(audio.encode(frame))
        pts += size
    out.mux(audio.encode())


def cfr(fps: float, seconds: float, start: float = 0.0):
    return [start + i / fps for i in range(int(round(fps * seconds)))]


def fixed_ranges(path, seconds):
    """translate.py's own ranges and duration for --segments fixed:S (no model needed for this step)."""
    return VideoTranslator._segments(VideoTranslator, path, parse_policy(f"fixed:{seconds}"), None)


# ------------------------------------------------------------------------------- D9: the video's own length
def test_duration_is_the_video_streams_not_a_longer_audio_tracks(tmp_path):
    """A 2.96 s video with 5 s of audio in webm: the container says 5.008 s; windows stop at the video's end."""
    path = write_timed(tmp_path / "longaudio.webm", cfr(25, 3), audio_seconds=5.0, codec="libvpx-vp9")
    with av.open(str(path)) as c:
        assert c.duration / 1e6 > 4.9                 # the trap: the container's length is the audio's
    assert video_timeline(path, "longaudio").duration == pytest.approx(3.0)
    ranges, duration = fixed_ranges(path, 1)
    assert duration == pytest.approx(3.0) and ranges == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    for start, end in ranges:                         # every window has its frames; none is past the end
        assert len(read_clip(path, start, end, "longaudio", 60).frames) == 25


# ------------------------------------------------------------------- D6: a stream whose first frame is at 1 s
@pytest.mark.parametrize("suffix", ["mkv", "mp4"])
def test_a_stream_starting_late_is_timed_from_its_first_frame(tmp_path, suffix):
    """Frames at 1.00-5.96 s of the file (a stream-copy cut, MPEG-TS): players show the first frame at 0:00,
    so 0 s is that frame everywhere: the duration, fixed windows (the last 0.96 s too) and read_clip."""
    path = write_timed(tmp_path / f"offset.{suffix}", cfr(25, 5, start=1.0))
    assert video_timeline(path, "offset").duration == pytest.approx(5.0)
    ranges, duration = fixed_ranges(path, 1)
    assert duration == pytest.approx(5.0) and len(ranges) == 5 and ranges[-1] == pytest.approx((4.0, 5.0))
    last = read_clip(path, 4.0, 5.0, "offset", 60)
    assert [frame_number(f) for f in last.frames] == list(range(100, 125))
    assert last.times == pytest.approx(np.arange(100, 125) / 25)
    whole = read_clip(path, None, None, "offset", 60)
    assert whole.times[0] == pytest.approx(0.0) and frame_number(whole.frames[0]) == 0


def test_a_caption_file_made_for_a_late_starting_video_lines_up(tmp_path):
    """Signing filmed at 3.4-4.6 s of the file's timestamps is at 2.4-3.6 s in a player; a caption for it says
    2.4-3.6 and gets exactly those frames."""
    path = write_timed(tmp_path / "offset.mp4", cfr(25, 5, start=1.0))
    vtt = tmp_path / "offset.vtt"
    vtt.write_text("WEBVTT\n\n00:00:02.400 --> 00:00:03.600\nthe signing\n")
    ranges, _ = VideoTranslator._segments(VideoTranslator, path, parse_policy("captions"), vtt)
    assert ranges == [(2.4, 3.6)]
    clip = read_clip(path, *ranges[0], "offset", 60)
    assert [frame_number(f) for f in clip.frames] == list(range(60, 90))     # file times 3.40-3.56 s


# ---------------------------------------------------------------------------- D5: a variable frame rate
# 10 fps for 0-2 s, 50 fps for 2-4 s, 10 fps for 4-6 s: 140 frames, an average of 23.3 frames a second.
VFR_TIMES = cfr(10, 2) + cfr(50, 2, start=2.0) + cfr(10, 2, start=4.0)


def vfr_signer():
    """A made-up signer (tests/test_segmentation.py's) signing at 2.4-3.6 s, filmed at 50 fps, and the same
    kept at VFR_TIMES only: its landmarks and those times."""
    from tests.test_segmentation import signer
    full = signer(50, 6.0, [(2.4, 3.6)])
    keep = np.round(np.asarray(VFR_TIMES) * 50).astype(int)
    parts = {k: v[keep] for k, v in vars(full).items() if isinstance(v, np.ndarray)}
    return full, dataclasses.replace(full, **parts, fps=len(keep) / 6.0), np.asarray(VFR_TIMES)


def test_auto_segments_of_a_variable_rate_video_follow_the_frames_own_times():
    full, vfr, times = vfr_signer()
    control = S.auto_segments(full)                                  # the same signing at a constant 50 fps
    assert len(control) == 1 and abs(control[0].start - 2.4) < 0.1 and abs(control[0].end - 3.6) < 0.1
    got = S.auto_segments(vfr, times=times, end=6.0)
    assert len(got) == 1
    assert got[0].start == pytest.approx(control[0].start, abs=0.05)
    assert got[0].end == pytest.approx(control[0].end, abs=0.05)


def test_read_clip_of_a_variable_rate_video_uses_the_real_frame_spacing(tmp_path):
    path = write_timed(tmp_path / "vfr.mp4", VFR_TIMES)
    timeline = video_timeline(path, "vfr")
    assert timeline.duration == pytest.approx(6.0) and timeline.rate_note() == "10-50 frames a second"
    assert video_timeline(write_timed(tmp_path / "cfr.mp4", cfr(25, 2)), "cfr").rate_note() is None
    clip = read_clip(path, 1.70, 4.37, "vfr", 60)        # refused before: 4.37 > 4.30 + 1.5 / 23.3
    assert clip.times[0] == pytest.approx(1.7) and clip.times[-1] == pytest.approx(4.3)
    assert [frame_number(f) for f in clip.frames] == list(range(17, 124))
    assert len(read_clip(path, 5.0, 6.05, "vfr", 60).frames) == 10      # to the end of the last frame, 6.0 s
    with pytest.raises(DataError, match=r"vfr: clip ends at 6.200 s, past the video's last frame at 5.900 s"):
        read_clip(path, 5.0, 6.2, "vfr", 60)
    assert len(read_clip(path, 2.0, 4.0, "vfr", 2.5).frames) == 100     # 2 s at 50 fps is not over 2.5 s
    with pytest.raises(DataError, match=r"vfr: clip longer than 5 s \(--max_clip_seconds\)"):
        read_clip(path, None, None, "vfr", 5)


def test_a_variable_rate_video_is_warned_about_once(tmp_path, caplog):
    path = write_timed(tmp_path / "vfr.mp4", VFR_TIMES)
    with caplog.at_level(logging.WARNING, logger="signllava.translate"):
        ranges, duration = fixed_ranges(path, 2)
    assert duration == pytest.approx(6.0) and len(ranges) == 3
    warned = [r.getMessage() for r in caplog.records if "variable frame rate" in r.getMessage()]
    assert len(warned) == 1 and "vfr.mp4: variable frame rate (10-50 frames a second)" in warned[0]


# -------------------------------------------------------------------- D8: a phone video stored sideways
def test_the_direction_of_a_quarter_turn():
    """np.rot90 with k=1 turns counter-clockwise, FFmpeg's (and PyAV's frame.rotation's) sense of a positive
    angle: the top-right corner goes to the top-left."""
    img = picture(0)
    assert (np.rot90(img, 1)[0, 0] == img[0, -1]).all()


@pytest.mark.parametrize("degrees", [90, 180, 270])
def test_rotated_videos_decode_upright_as_opencv_shows_them(tmp_path, degrees):
    """The stored frames are picture(i) turned the other way; the display matrix turns them back. Both readers
    give the upright pictures, equal to OpenCV's auto-rotated read of the same file."""
    import cv2

    from signllava.video_io import VideoStream
    stored = tmp_path / "stored.mp4"
    write_timed(stored, cfr(25, 0.4))
    path = write_timed(tmp_path / f"phone{degrees}.mp4", cfr(25, 0.4), rotation=degrees,
                       pictures=lambda i: np.rot90(picture(i), -degrees // 90))
    clip = read_clip(path, None, None, "phone", 60)
    streamed = np.stack(list(VideoStream(path, "phone")))
    upright = read_clip(stored, None, None, "stored", 60).frames
    assert clip.frames.shape == upright.shape == streamed.shape
    assert np.abs(clip.frames.astype(int) - upright).mean() < 2 and (streamed == clip.frames).all()
    capture = cv2.VideoCapture(str(path))
    ok, first = capture.read()
    capture.release()
    assert ok and first.shape == clip.frames[0].shape
    assert np.abs(first[:, :, ::-1].astype(int) - clip.frames[0]).mean() < 1
