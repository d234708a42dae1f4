"""Where a video's frames lie in time, as the segments, durations and clips see them: the video stream's own
length (not a longer audio track's), streams that do not start at 0 s, variable frame rates, and phone videos
stored sideways with a display rotation. Small frames, a few seconds each, written with PyAV at exact times."""
from __future__ import annotations

from fractions import Fraction

import av
import numpy as np
import pytest

from signllava import segmentation as S
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


def write_timed(path, times, audio_seconds=None, rotation=None, codec="libx264"):
    """Frames picture(0), picture(1), ... at the given presentation times (seconds); with `audio_seconds`, a
    silent audio track that long; with `rotation`, a display matrix turning the stored picture that many
    degrees counter-clockwise (PyAV's convention, as frame.rotation reads it back)."""
    with av.open(str(path), "w") as out:
        video = out.add_stream(codec, rate=25)
        video.width, video.height, video.pix_fmt = W, H, "yuv420p"
        video.codec_context.time_base = Fraction(1, 1000)
        video.options = {"crf": "10"} if codec == "libx264" else {}
        if rotation is not None:
            video.set_display_rotation(rotation)
        audio = out.add_stream("libopus" if str(path).endswith(".webm") else "aac", rate=48000,
                               layout="mono") if audio_seconds else None
        for i, t in enumerate(times):
            frame = av.VideoFrame.from_ndarray(picture(i), format="rgb24")
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
