"""Frames of one clip out of a video file, decoded once, as RGB.

A clip is a time range of a file (or the whole file). We seek to the keyframe at or before its start and
decode forward to its end, so a clip costs its own frames plus at most one GOP, and no frame is decoded twice
for it (the original seeked back to frame 0 for every frame it cropped). Frames are kept by their
presentation time, counted from the video stream's first frame (a stream that starts at 1.0 s has its first
frame at 0 s here, as players show it), so variable frame rates and streams that do not start at 0 come out right.

Every fault is a DataError naming the file and clip: unreadable or truncated files, no video stream, zero
frames, and a range that runs past the end of the video (by more than one frame period). Nothing is cut
silently: a clip longer than `max_seconds` is refused, not truncated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np

from signllava.errors import DataError


@dataclass
class ClipFrames:
    frames: np.ndarray        # uint8 [T, H, W, 3], RGB
    fps: float                # the stream's average rate (frames / second)
    # One row a decoded frame, whatever the spacing: features are made per frame, as training's were, so a
    # variable-rate video gives the model another frame rate than training did in its faster or slower parts.
    times: np.ndarray         # float64 [T], seconds from the video stream's first frame (see _origin)


def frame_step(times, fps: float) -> float:
    """The last frame's length: the spacing of the last two frames (the real one, where the rate varies),
    one period of the stated rate for a lone frame."""
    return float(times[-1] - times[-2]) if len(times) >= 2 else 1.0 / fps


@dataclass(frozen=True)
class Timeline:
    """A video stream's frame times (seconds from its first frame, presentation order)."""
    times: np.ndarray
    fps: float                # the stream's stated average rate

    @property
    def duration(self) -> float:
        """Seconds to the end of the last frame: its time plus one frame."""
        return float(self.times[-1]) + frame_step(self.times, self.fps) if len(self.times) else 0.0

    def rate_note(self) -> str | None:
        """Where the frame spacing varies by more than a quarter of its median, its range as rates ("10-50
        frames a second"); else None. Timestamp rounding (33/34 ms for 29.97 fps in milliseconds) stays far
        below that; a dropped frame already counts."""
        steps = np.diff(self.times)
        steps = steps[steps > 0]
        if len(steps) < 2 or np.abs(steps - np.median(steps)).max() <= 0.25 * np.median(steps):
            return None
        return f"{1 / steps.max():.3g}-{1 / steps.min():.3g} frames a second"


def _open(path: Path, loc: str):
    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise DataError(f"{loc}: video file not found") from None
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
        raise DataError(f"{loc}: unreadable video ({e})") from None
    if not container.streams.video:
        container.close()
        raise DataError(f"{loc}: no video stream")
    return container


def _origin(stream) -> float:
    """The file time (seconds) that is 0 s on every timeline here: the video stream's first frame.
    Segment and caption times (How2Sign's CSV, a video's .vtt) count from the start a player shows as 0:00, and
    players put 0:00 at the first frame of a file whose timestamps start later (a stream-copy cut, MPEG-TS;
    mpv's default rebase-start-time; ffprobe reports that start as start_time), so a caption made by watching the
    video lines up only on this timeline. The video stream's own start, not the container's: an audio track's
    start (AAC's priming at -0.02 s) must not move the frames."""
    if stream.start_time is not None:
        return float(stream.start_time * stream.time_base)
    return 0.0


def stream_fps(stream) -> float:
    """The stream's average rate (frames / second); 25 where the container states none."""
    return float(stream.average_rate or stream.guessed_rate or 0) or 25.0


def read_clip(path: Path, start: float | None, end: float | None, loc: str, max_seconds: float) -> ClipFrames:
    """The frames with start <= time < end (the whole file when both are None)."""
    container = _open(path, loc)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"           # frame- and slice-threaded decoding inside FFmpeg
        fps = stream_fps(stream)
        stated_end = float(stream.duration * stream.time_base) if stream.duration else None
        origin = _origin(stream)
        if start and start > 0:
            # The keyframe at or before `start`; frames before it are decoded and dropped below.
            container.seek(int((origin + start) / stream.time_base), stream=stream, backward=True, any_frame=False)
        frames, times, ended = _decode_range(container, stream, origin, start or 0.0, end, loc, max_seconds)
    except av.error.FFmpegError as e:
        raise DataError(f"{loc}: video decoding failed ({e})") from None
    finally:
        container.close()
    if not frames:
        raise DataError(f"{loc}: zero frames" + (f" between {start} s and {end} s" if end is not None else ""))
    _check_end(times, end, ended, stated_end, fps, loc)
    return ClipFrames(np.stack(frames), fps, np.asarray(times, dtype=np.float64))


def _check_end(times: list, end: float | None, ended: bool, stated_end: float | None, fps: float, loc: str):
    """A clip running past the video's last frame, or a whole file whose frames stop before its stated end, is
    refused. Only where decoding ran out of frames (`ended` False): a frame at or after `end` proves the video
    goes on. The tolerance is the real spacing of the last frames, not the average rate's: in a variable-rate
    video they differ by several times."""
    last, step = times[-1], frame_step(times, fps)
    if end is not None and not ended and end > last + 1.5 * step:
        raise DataError(f"{loc}: clip ends at {end:.3f} s, past the video's last frame at {last:.3f} s")
    if end is None and stated_end is not None and stated_end > last + 2.5 * step:
        raise DataError(f"{loc}: truncated video: frames stop at {last:.3f} s, the file says {stated_end:.3f} s")


def _decode_range(container, stream, origin: float, start: float, end: float | None, loc: str,
                  max_seconds: float):
    """The frames and times in [start, end), and whether a frame at or after `end` was reached."""
    frames, times = [], []
    for t, frame in _timed_frames(container, stream, origin):
        if t < start - 1e-6:
            continue
        if end is not None and t >= end - 1e-6:
            return frames, times, True
        if t >= start + max_seconds + 1e-6:     # by time: a frame count at the average rate misjudges VFR clips
            raise DataError(f"{loc}: clip longer than {max_seconds:g} s (--max_clip_seconds); refused, not cut")
        frames.append(upright_rgb(frame, loc))
        times.append(t)
    return frames, times, False


def upright_rgb(frame, loc: str) -> np.ndarray:
    """The frame as RGB [H, W, 3], turned as its display matrix says (a phone stores its picture sideways and
    marks the turn; players and OpenCV apply it, and MediaPipe needs the signer upright). frame.rotation is
    FFmpeg's counter-clockwise angle, as np.rot90 turns; PyAV truncates it to an int, so 89 means 90."""
    img = frame.to_ndarray(format="rgb24")
    turn = frame.rotation
    quarters = round(turn / 90)
    if abs(turn - 90 * quarters) > 1:
        raise DataError(f"{loc}: display rotation of {turn} degrees; only quarter turns are supported")
    return np.ascontiguousarray(np.rot90(img, quarters)) if quarters % 4 else img


def _timed_frames(container, stream, origin: float):
    """(seconds from the stream's first frame, frame) in decoding order."""
    for frame in container.decode(stream):
        t = frame.time if frame.time is not None else (frame.pts or 0) * float(stream.time_base)
        yield t - origin, frame


@dataclass
class VideoStream:
    """A whole video's frames one at a time (RGB uint8 [H, W, 3]), for a pass that must not hold them all.
    `times` fills as frames are read; iterate once."""
    path: Path
    loc: str
    fps: float = 25.0
    times: list = field(default_factory=list)

    def __post_init__(self):
        container = _open(self.path, self.loc)
        stream = container.streams.video[0]
        self.fps = stream_fps(stream)
        container.close()

    def __iter__(self):
        container = _open(self.path, self.loc)
        try:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for t, frame in _timed_frames(container, stream, _origin(stream)):
                self.times.append(t)
                yield upright_rgb(frame, self.loc)
        except av.error.FFmpegError as e:
            raise DataError(f"{self.loc}: video decoding failed ({e})") from None
        finally:
            container.close()

    @property
    def timeline(self) -> Timeline:
        """The times of the frames read so far."""
        return Timeline(np.asarray(self.times, dtype=np.float64), self.fps)

    @property
    def duration(self) -> float:
        """Seconds from the start to the end of the last frame read."""
        return self.timeline.duration


def video_timeline(path: Path, loc: str) -> Timeline | None:
    """Every frame's time from the video stream's packets, without decoding (for checks and fixed windows
    before any frame is decoded); None where the packets carry no timestamps (then decode: VideoStream)."""
    container = _open(path, loc)
    try:
        stream = container.streams.video[0]
        fps, origin, stamps = stream_fps(stream), _origin(stream), []
        # The video stream's own packets only: the container's duration also covers a longer audio track (a
        # 2.96 s video with 5 s of audio in webm states 5.008 s), which would put windows past the last frame.
        for packet in container.demux(stream):
            if packet.size == 0:                 # the demuxer's end-of-stream marker, no frame
                continue
            if packet.pts is None:
                return None
            stamps.append(float(packet.pts * stream.time_base) - origin)
    except av.error.FFmpegError as e:
        raise DataError(f"{loc}: video demuxing failed ({e})") from None
    finally:
        container.close()
    return Timeline(np.sort(np.asarray(stamps, dtype=np.float64)), fps)


def write_video(path: Path, frames: np.ndarray, fps: int = 25, codec: str = "libx264", lossless: bool = False) -> Path:
    """RGB frames to a video file (tests and demos); h264 at near-lossless quality. `lossless`: h264 in RGB at
    quantiser 0, so decoding gives back exactly these frames; x264's lossy output was seen to vary slightly from
    run to run for the same frames, which a test of what MediaPipe finds in them cannot have."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if lossless:
        codec = "libx264rgb"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        if lossless:
            stream.options = {"qp": "0", "g": "12"}
        elif codec == "libx264":
            stream.options = {"crf": "12", "g": "12"}
        for img in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
