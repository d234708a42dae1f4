"""Where the clips of an extraction come from: which video file, which time range, which sentence.

Three sources, one result (a list of `ClipSpec` per video, in time order):

    annotation  an existing annotation.<split>.json whose clip names are video files (How2Sign's sentence
                clips): every file is one clip, read whole.
    segments    a CSV with How2Sign's columns (VIDEO_NAME, SENTENCE_NAME, START_REALIGNED, END_REALIGNED,
                SENTENCE; tab-separated and unquoted as How2Sign's, or comma-separated CSV) cut from whole videos.
    captions    a folder of WebVTT / SRT files, one per video (YouTube-ASL; `<video>.vtt` or `<video>.<lang>.vtt`,
                matched by the video's whole name, dots and all): each caption is a clip.

Segments and captions carry the sentences, so the extraction also writes the annotation in the seed's format
(`annotation_for`). Every fault is a DataError naming the file (and the video or clip).
"""
from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import dataclass
from pathlib import Path

import webvtt

from signllava.errors import DataError
from signllava.layout import load_annotation, natural_key, where

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v")
CAPTION_SUFFIXES = (".vtt", ".srt")
# How2Sign's column names; the realigned times are the ones aligned to the signing, the plain ones to speech.
SEGMENT_COLUMNS = {"video": ("VIDEO_NAME", "VIDEO_ID"), "clip": ("SENTENCE_NAME", "SENTENCE_ID"),
                   "start": ("START_REALIGNED", "START"), "end": ("END_REALIGNED", "END"), "text": ("SENTENCE",)}


@dataclass(frozen=True)
class ClipSpec:
    video: str                 # the dataset's video key (h5 group, annotation key)
    clip: str                  # the dataset's clip key
    file: Path                 # the video file the frames come from
    start: float | None        # seconds into the file; None: the whole file
    end: float | None
    text: str | None           # the sentence, where the source carries one

    def where(self) -> str:
        return where(self.file, self.video, self.clip)


def video_files(videos: Path) -> dict[str, Path]:
    """Stem -> path of every video file in a folder, or of every path listed in a text file (one a line,
    relative paths taken from the list's folder). Two files with one stem are refused."""
    if videos.is_dir():
        paths = sorted(p for p in videos.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    elif videos.is_file():
        lines = [ln.strip() for ln in videos.read_text(encoding="utf-8").splitlines()]
        paths = [(videos.parent / ln) if not Path(ln).is_absolute() else Path(ln)
                 for ln in lines if ln and not ln.startswith("#")]
    else:
        raise DataError(f"{videos}: no such folder or list file (--videos)")
    found = by_stem(paths, "their clips would collide in the dataset")
    if not found:
        raise DataError(f"{videos}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    return found


def by_stem(paths, why: str) -> dict[str, Path]:
    """Stem -> path; two paths with one stem are a DataError naming both and `why` that matters."""
    found: dict[str, Path] = {}
    for p in paths:
        if p.stem in found:
            raise DataError(f"{found[p.stem]} and {p}: two videos named {p.stem!r}; {why}")
        found[p.stem] = p
    return found


def from_annotation(annotation: Path, files: dict[str, Path]) -> tuple[dict[str, list[ClipSpec]], list[str]]:
    """Every annotated clip whose name is a video file's stem, read whole. Clips without a file are returned
    as faults (one line each), not dropped silently."""
    ann = load_annotation(annotation)
    clips: dict[str, list[ClipSpec]] = {}
    faults = []
    for video, order in ann.videos.items():
        for clip in order:
            path = files.get(clip)
            if path is None:
                faults.append(f"{where(annotation, video, clip)}: annotated clip has no video file")
                continue
            text = ann.clips[(video, clip)].translation
            clips.setdefault(video, []).append(ClipSpec(video, clip, path, None, None, text))
    return clips, faults


def _column(header: list[str], role: str, path: Path) -> int:
    for name in SEGMENT_COLUMNS[role]:
        if name in header:
            return header.index(name)
    raise DataError(f"{path}: no {' or '.join(SEGMENT_COLUMNS[role])} column (has: {', '.join(header)[:200]})")


def _seconds(value: str, path: Path, line: int, what: str) -> float:
    try:
        t = float(value)
    except ValueError:
        raise DataError(f"{path}:{line}: {what} time {value[:40]!r} is not a number of seconds") from None
    if not t >= 0:
        raise DataError(f"{path}:{line}: {what} time {t} is negative or NaN")
    return t


def _table_rows(text: str):
    """The rows of a segment table. How2Sign's tab-separated files are not quoted: a sentence may start with
    `"` (`"Hi," she said.`), which CSV quoting would take for an opening quote and run on across rows, so tabs
    are read with no quoting at all. Comma-separated files need CSV's quoting for their commas and keep it."""
    if "\t" in text.split("\n", 1)[0]:
        return csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
    return csv.reader(io.StringIO(text))


def from_segments(csv_path: Path, files: dict[str, Path]) -> tuple[dict[str, list[ClipSpec]], list[str]]:
    """How2Sign's segment table: one row a sentence, cut from a whole video."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")      # a spreadsheet's BOM is not the first column's name
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{csv_path}: unreadable ({e})") from None
    rows = list(_table_rows(text))
    if not rows:
        raise DataError(f"{csv_path}: empty segment table")
    header = [h.strip() for h in rows[0]]
    cols = {role: _column(header, role, csv_path) for role in SEGMENT_COLUMNS}
    clips: dict[str, list[ClipSpec]] = {}
    faults, seen = [], set()
    for line, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) < len(header):
            raise DataError(f"{csv_path}:{line}: {len(row)} columns, the header has {len(header)}")
        video, clip = row[cols["video"]].strip(), row[cols["clip"]].strip()
        start = _seconds(row[cols["start"]], csv_path, line, "start")
        end = _seconds(row[cols["end"]], csv_path, line, "end")
        if end <= start:
            faults.append(f"{where(csv_path, video, clip)}: line {line}: ends at {end} s, not after its start {start} s")
            continue
        if (video, clip) in seen:
            raise DataError(f"{where(csv_path, video, clip)}: line {line}: sentence listed twice")
        seen.add((video, clip))
        path = files.get(video)
        if path is None:
            faults.append(f"{where(csv_path, video, clip)}: no video file {video!r} in --videos")
            continue
        clips.setdefault(video, []).append(ClipSpec(video, clip, path, start, end, row[cols["text"]].strip()))
    return _in_time_order(clips), faults


# A trailing language tag in a caption file's name (`talk.en.vtt`, `talk.en-US.vtt`, `talk.ase.vtt`): BCP 47's
# shape, letters first, so that the dotted parts of a video's own name (`talk.2024.01`) are never taken for one.
LANGUAGE_TAG = re.compile(r"[A-Za-z]{2,3}(?:-[A-Za-z0-9]{1,8})*")


def caption_video(path: Path, videos) -> str | None:
    """The video (of `videos`, their stems) that a caption file belongs to: the one named as the file less its
    suffix, else as that less one trailing language tag; None when neither is there."""
    stem = path.stem
    if stem in videos:
        return stem
    base, dot, tag = stem.rpartition(".")
    return base if dot and LANGUAGE_TAG.fullmatch(tag) and base in videos else None


def caption_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in CAPTION_SUFFIXES and p.is_file())


def _caption_text(raw: str, vtt: bool) -> str:
    """A caption's words on one line: cue tags (<i>, <c.colour>, <00:01.000> karaoke stamps) and speaker
    marks are dropped by webvtt-py; what remains is joined across lines. WebVTT cue text is markup, so its
    character references (&amp; &lt; &nbsp;) are decoded once, after the tags are gone (an escaped `&lt;b>` is
    text, not a tag); webvtt-py decodes none. SRT text is plain (translate.py writes it unescaped): kept as is."""
    return re.sub(r"\s+", " ", html.unescape(raw) if vtt else raw).strip()


def from_captions(folder: Path, files: dict[str, Path]) -> tuple[dict[str, list[ClipSpec]], list[str]]:
    """One caption file per video (`<video>.vtt`, `<video>.srt`, or with a language tag `<video>.en.vtt`):
    each non-empty caption is a clip `<video>_<k>`, k counting in time order from 0. A video whose file has
    no usable caption is left out with one fault line (it would have no clip to write)."""
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder (--captions)")
    clips: dict[str, list[ClipSpec]] = {}
    faults = []
    owner: dict[str, Path] = {}
    for path in caption_files(folder):
        video = caption_video(path, files)
        if video is None:
            faults.append(f"{where(path, path.stem)}: caption file has no video in --videos")
            continue
        if video in owner:
            raise DataError(f"{path}: a second caption file for video {video!r} (also {owner[video].name}); "
                            "keep one per video")
        owner[video] = path
        specs, more = video_captions(path, video, files[video])
        faults += more
        if specs:
            clips[video] = specs
    if not owner and not faults:
        raise DataError(f"{folder}: no caption files ({', '.join(CAPTION_SUFFIXES)})")
    return clips, faults


def video_captions(path: Path, video: str, file: Path) -> tuple[list[ClipSpec], list[str]]:
    """One caption file's clips of `video` (in time order) and its faults, one line each; no clip at all is
    one fault saying why."""
    cues = [(s, e, t) for s, e, t in read_captions(path) if t]
    kept = sorted((c for c in cues if c[1] > c[0]), key=lambda c: (c[0], c[1]))
    backwards = [f"{where(path, video)}: caption at {s:.3f} s ends at {e:.3f} s, not after its start"
                 for s, e, _ in cues if e <= s]
    if not kept:
        why = f"{len(backwards)} end at or before their start" if backwards else "none with text"
        return [], [f"{where(path, video)}: caption file has no usable caption ({why})"]
    return [ClipSpec(video, f"{video}_{k}", file, s, e, t) for k, (s, e, t) in enumerate(kept)], backwards


def read_captions(path: Path) -> list[tuple[float, float, str]]:
    vtt = path.suffix.lower() != ".srt"
    try:
        with open(path, encoding="utf-8-sig") as f:
            cues = webvtt.from_buffer(f, format="vtt" if vtt else "srt")
    except (webvtt.errors.MalformedFileError, webvtt.errors.MalformedCaptionError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: malformed caption file ({e or type(e).__name__})") from None
    except OSError as e:
        raise DataError(f"{path}: unreadable ({e.strerror or e})") from None
    return [(c.start_time.in_milliseconds() / 1000, c.end_time.in_milliseconds() / 1000, _caption_text(c.text, vtt))
            for c in cues]


def _in_time_order(clips: dict[str, list[ClipSpec]]) -> dict[str, list[ClipSpec]]:
    return {v: sorted(cs, key=lambda c: (c.start or 0.0, natural_key(c.clip))) for v, cs in clips.items()}


def annotation_for(clips: dict[str, list[ClipSpec]]) -> dict:
    """The seed's annotation layout for the given clips (time order kept): translation, no paraphrases or
    keywords (the source has none)."""
    out = {}
    for video, specs in clips.items():
        entry = {"clip_order": [c.clip for c in specs]}
        for c in specs:
            entry[c.clip] = {"translation": c.text or "", "paraphrases": [], "keywords": []}
        out[video] = entry
    return out
