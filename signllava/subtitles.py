"""A translated video's segments as subtitle files: WebVTT (browsers' <track>, YouTube), SRT (players,
editors) and a JSON of everything (times, text, the context each segment was translated with, timings).

webvtt-py writes both formats. A cue's text is kept to one line: a blank line would end the cue early and a
`-->` inside it would read as a timing line, so both are neutralised rather than written through.
"""
from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path

import webvtt

from signllava.atomic import write_atomic


def timestamp(seconds: float) -> str:
    """WebVTT's HH:MM:SS.mmm (webvtt-py turns it into SRT's comma form itself)."""
    ms = max(0, round(seconds * 1000))
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def cue_text(text: str) -> str:
    return re.sub(r"\s+", " ", text.replace("-->", "->")).strip()


def _render(segments, fmt: str) -> str:
    # WebVTT cue text is markup: a model's "<" or "&" would start a tag or an entity, so they are escaped
    # there (a browser shows them as written); SRT players take text as it is.
    escape = (lambda t: html.escape(t, quote=False)) if fmt == "vtt" else (lambda t: t)
    captions = webvtt.WebVTT(captions=[webvtt.Caption(timestamp(s.start), timestamp(s.end), escape(cue_text(s.text)))
                                       for s in segments if cue_text(s.text)])
    buf = io.StringIO()
    captions.write(buf, format=fmt)
    return buf.getvalue()


def vtt_text(segments) -> str:
    return _render(segments, "vtt")


def srt_text(segments) -> str:
    return _render(segments, "srt")


def write_subtitles(out_dir: Path, stem: str, translation) -> dict[str, Path]:
    """OUT/<stem>.vtt, .srt and .json for one VideoTranslation; each file complete or absent."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("vtt", "srt", "json")}
    write_atomic(paths["vtt"], vtt_text(translation.segments))
    write_atomic(paths["srt"], srt_text(translation.segments))
    write_atomic(paths["json"], json.dumps(translation.to_json(), indent=1, ensure_ascii=False) + "\n")
    return paths
