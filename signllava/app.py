"""A browser demo: upload a signing video (or record one with the webcam) and get it back with English subtitles.

    python -m signllava.app --checkpoint C [--host 127.0.0.1] [--port 7860] [--segments auto|fixed:S]
                            [--num_beams 5] [--max_new_tokens N] [--device D] [translate.py's extraction flags]

C is what translate.py takes: a stage-1 or stage-2 output dir, a checkpoint dir or an export.py folder. The
checkpoint is loaded once, at start; each click runs `VideoTranslator.translate_video` on the video (the
extraction its training data was made with, segmentation, translation with the model's own context) and shows
the video with the subtitles as a track, a table of the segments (start, end, text, the context the model was
given) and each stage's seconds with the real-time factor; the .vtt, .srt and .json are there to download.

A video the translator refuses (not a video, no person in it, a caption file that does not parse) is the
translator's one-line message on the page, not a traceback. Nothing is sent anywhere: Gradio's analytics and
version check are off, there is no share link, and the page loads nothing from outside the server (the
default theme's fonts are served by the app itself). The server listens on 127.0.0.1 unless --host says
otherwise. Requests run one at a time: the model and the landmark detector are shared by every visitor.
"""
from __future__ import annotations

import os

# Before gradio is imported: its analytics and the version check read this at import and at launch.
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"

import argparse  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import gradio as gr  # noqa: E402

from signllava.cli import make_parser  # noqa: E402
from signllava.errors import DataError, RunError, range_problems, run_command  # noqa: E402
from signllava.segmentation import parse_policy  # noqa: E402
from signllava.subtitles import write_subtitles  # noqa: E402
from signllava.video_translate import (VideoTranslation, VideoTranslator, add_translator_args,  # noqa: E402
                                        translator_kwargs)

SEGMENT_MODES = ["auto", "fixed", "captions"]
SEGMENT_HEADERS = ["start (s)", "end (s)", "text", "context"]
TIMING_HEADERS = ["phase or stage", "seconds", "share"]
CONTEXT_SEPARATOR = " | "
DEFAULT_FIXED_SECONDS = 5.0
VIDEO_HEIGHT = 320


def segments_flag(text: str) -> str:
    """--segments: the page's first choice, `auto` or `fixed:S` (captions need a file, chosen on the page)."""
    try:
        policy = parse_policy(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if policy.kind == "captions":
        raise argparse.ArgumentTypeError("captions: choose them on the page with their file; give auto or fixed:S")
    return text


def segments_request(mode: str, seconds: float | None, captions: str | None) -> tuple[str, str | None]:
    """The page's choice -> (segments, captions) for translate_video; a choice that cannot run is a DataError."""
    if mode == "fixed":
        if not seconds or seconds <= 0:
            raise DataError("fixed segments need a window length in seconds > 0")
        return f"fixed:{seconds:g}", None
    if mode == "captions":
        if not captions:
            raise DataError("segments from captions need a caption file (.vtt or .srt)")
        return "captions", captions
    return "auto", None


def segment_rows(result: VideoTranslation) -> list[list[str]]:
    return [[f"{s.start:.2f}", f"{s.end:.2f}", s.text, CONTEXT_SEPARATOR.join(s.context)] for s in result.segments]


def timing_rows(result: VideoTranslation) -> list[list[str]]:
    """Each phase's wall seconds and share of the whole, then the extraction stages inside `features`."""
    total = sum(result.seconds.values()) or float("nan")
    rows = [[phase, f"{sec:.2f}", f"{100 * sec / total:.0f} %"] for phase, sec in result.seconds.items()]
    return rows + [[f"features: {stage}", f"{sec:.2f}", f"{100 * sec / total:.0f} %"]
                   for stage, sec in result.stage_seconds.items()]


def result_line(result: VideoTranslation, video: str) -> str:
    """What came out, the segments that did not and why, and the real-time factor (seconds of video per second
    of work, the project's measure)."""
    name = Path(video).name
    if not result.segments and not result.skipped:
        return f"**No signing found in {name}** ({result.policy} segments): try fixed windows."
    if not result.segments:
        return f"**Nothing in {name} could be translated:** {for_visitor(result.skipped[0]['reason'], video)}"
    line = (f"{len(result.segments)} segments from {result.duration:.1f} s of video in "
            f"{sum(result.seconds.values()):.1f} s of work: real-time factor {result.real_time_factor:.2f} "
            "(seconds of video per second of work)")
    for skip in result.skipped:
        line += f"\n\n{skip['start']:.2f}-{skip['end']:.2f} s not translated: {for_visitor(skip['reason'], video)}"
    return line


def for_visitor(text: str, *uploads: str | None) -> str:
    """A message as the visitor knows the files (the video, a caption file): by their names, not by the
    server's upload paths."""
    for upload in filter(None, uploads):
        path = Path(upload)
        text = text.replace(str(path), path.name).replace(str(path.with_suffix("")), path.stem)
    return text


def refusal(video: str, err: Exception, captions: str | None = None) -> str:
    name = Path(video).name
    detail = for_visitor(str(err), video, captions)
    detail = detail[len(name) + 2:] if detail.startswith(f"{name}: ") else detail
    return f"Could not translate {name}: {detail}"


class Demo:
    """The loaded translator and the folder the per-request subtitle files go to (gradio copies what a
    handler returns into its own cache, so these can go when the app stops)."""

    def __init__(self, translator: VideoTranslator, default_segments: str = "auto"):
        self.translator = translator
        self.default_segments = default_segments
        self._work = tempfile.TemporaryDirectory(prefix="signllava-app-")
        self._requests = 0

    def translate(self, video: str | None, mode: str, seconds: float | None, captions: str | None):
        """One click -> (the output video, segment rows, status text, timing rows, download files)."""
        if not video:
            return self._failed("Upload a video or record one with the webcam first.")
        try:
            segments, caption_file = segments_request(mode, seconds, captions)
            result = self.translator.translate_video(video, captions=caption_file, segments=segments)
        except (DataError, RunError) as e:
            return self._failed(refusal(video, e, captions))
        self._requests += 1
        files = write_subtitles(Path(self._work.name) / str(self._requests), Path(video).stem, result)
        return (gr.Video(value=video, subtitles=str(files["vtt"])), segment_rows(result), result_line(result, video),
                timing_rows(result), [str(p) for p in files.values()])

    @staticmethod
    def _failed(message: str):
        # The outputs of an earlier video are cleared: a stale table under a new error would read as its result.
        return gr.Video(value=None, subtitles=None), [], f"**{message}**", [], None

    def blocks(self, title: str) -> gr.Blocks:
        mode, seconds = (("fixed", float(self.default_segments.split(":", 1)[1]))
                         if self.default_segments.startswith("fixed:") else ("auto", DEFAULT_FIXED_SECONDS))
        with gr.Blocks(title="Sign LLaVA", analytics_enabled=False, delete_cache=(3600, 3600)) as page:
            gr.Markdown(f"# Sign LLaVA: signing video to English subtitles\n{title}")
            with gr.Row():
                with gr.Column():
                    video_in = gr.Video(label="Signing video", sources=["upload", "webcam"], height=VIDEO_HEIGHT,
                                        elem_id="video_in")
                    with gr.Row():
                        mode_in = gr.Radio(SEGMENT_MODES, value=mode, label="Segments", scale=2,
                                           info="auto: from signing activity in the pose stream; fixed: windows "
                                                "of the length at the right; captions: a caption file's times")
                        seconds_in = gr.Number(seconds, label="Fixed window (s)", minimum=0.1, scale=1)
                    captions_in = gr.File(label="Caption file (for captions)", file_types=[".vtt", ".srt"],
                                          height=120)
                    button = gr.Button("Translate", variant="primary", elem_id="translate")
                with gr.Column():
                    video_out = gr.Video(label="With subtitles", interactive=False, height=VIDEO_HEIGHT,
                                         elem_id="video_out")
                    status = gr.Markdown(elem_id="status")
            rows = gr.Dataframe(headers=SEGMENT_HEADERS, label="Segments", interactive=False, wrap=True,
                                elem_id="segments")
            with gr.Row():
                timings = gr.Dataframe(headers=TIMING_HEADERS, label="Seconds per stage", interactive=False,
                                       elem_id="timings")
                downloads = gr.File(label="Subtitles and JSON", file_count="multiple", interactive=False)
            button.click(self.translate, [video_in, mode_in, seconds_in, captions_in],
                         [video_out, rows, status, timings, downloads], concurrency_limit=1)
        return page


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    p = make_parser(__doc__, prog=prog)
    p.add_argument("--checkpoint", required=True, help="a stage-1/2 output dir, checkpoint dir or export.py folder")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--segments", type=segments_flag, default="auto", help="the page's first choice: auto | fixed:S")
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--max_new_tokens", type=int, help="tokens per segment at most (default: generate.py's)")
    add_translator_args(p)
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link (off: nothing leaves)")
    args = p.parse_args(argv)
    problems = range_problems(args, at_least_one=("num_beams", "max_new_tokens", "batch_size"), non_negative=("workers",))
    if not 1 <= args.port <= 65535:
        problems.append("--port must be between 1 and 65535")
    if problems:
        p.error("; ".join(problems))
    return args


def main(argv=None, prog: str | None = None) -> int:
    """`prog`: the usage line's name (argparse's default, the file name, would say app.py under `python -m`)."""
    args = parse_args(argv, prog)

    def serve() -> int:
        translator = VideoTranslator(args.checkpoint, segments=args.segments, num_beams=args.num_beams,
                                     max_new_tokens=args.max_new_tokens, **translator_kwargs(args))
        demo = Demo(translator, args.segments)
        # The name only: the page may be seen from other machines (--host), the server's folders are not theirs.
        title = f"Checkpoint `{Path(args.checkpoint).name}`, beam search with {args.num_beams} beams."
        try:
            demo.blocks(title).launch(server_name=args.host, server_port=args.port, share=args.share,
                                      ssr_mode=False, show_error=False)
        except OSError as e:        # the port is taken, or the address is not this machine's
            raise RunError(f"--host {args.host} --port {args.port}: cannot listen there ({e})") from None
        return 0

    return run_command(serve)


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m signllava.app"))
