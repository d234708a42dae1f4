"""Signing videos in, English subtitles out: segment each video, extract every segment's features the way the
checkpoint's training data was extracted, translate the segments in order with the model's own earlier outputs
as context, write .vtt, .srt and .json.

    python translate.py talk.mp4 --checkpoint runs/stage2                      # auto segments from the pose
    python translate.py videos/*.mp4 --checkpoint C --out subs/ --segments fixed:5
    python translate.py clip.mp4 --checkpoint C --segments captions --captions clip.vtt   # your own times

Writes OUT/<video>.vtt, OUT/<video>.srt and OUT/<video>.json (each segment's times, text and the context it
was given; segments that could not be extracted and why; seconds per stage and the real-time factor); OUT is
the video's own folder unless --out says otherwise, so players pick the subtitles up beside the video.

The encoders and every extraction setting come from the checkpoint (training recorded the dataset's
extraction.json into it). --mae/--dino_face/--dino_hand/--sign2vec name where a recorded model lives now;
anything that would extract differently from training is a warning when asked for, else an error.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from signllava.errors import DataError, range_problems, run_command

log = logging.getLogger("signllava.translate")


def parser() -> argparse.ArgumentParser:
    from signllava.video_translate import add_translator_args
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("videos", nargs="+", type=Path, help="video files (or folders of them)")
    p.add_argument("--checkpoint", required=True, help="a run's output dir or one checkpoint (stage 1 or 2, or export.py's)")
    p.add_argument("--out", type=Path, help="folder for the subtitles (default: each video's own folder)")
    seg = p.add_argument_group("segments")
    seg.add_argument("--segments", default="auto",
                     help="auto (signing activity in the pose), fixed:S (windows of S seconds) or captions (--captions' times)")
    seg.add_argument("--captions", type=Path, help="with --segments captions: a .vtt/.srt file, or a folder of <video>.vtt")
    gen = p.add_argument_group("generation")
    gen.add_argument("--num_beams", type=int, default=5)
    gen.add_argument("--max_new_tokens", type=int, help="default: generate.py's")
    add_translator_args(p)
    return p


def validate(p: argparse.ArgumentParser, args) -> None:
    from signllava.segmentation import parse_policy
    problems = range_problems(args, at_least_one=("num_beams", "max_new_tokens", "batch_size"),
                              non_negative=("workers",))
    try:
        policy = parse_policy(args.segments)
    except ValueError as e:
        problems.append(str(e))
    else:
        if (policy.kind == "captions") != (args.captions is not None):
            problems.append("--segments captions and --captions go together")
    if problems:
        p.error("; ".join(problems))


def video_paths(given: list[Path]) -> list[Path]:
    from signllava.clip_sources import by_stem, video_files
    paths = []
    for path in given:
        if path.is_dir():
            paths += sorted(video_files(path).values())
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"{path}: no such video file or folder")
    by_stem(paths, "their subtitles would overwrite each other; translate them apart")
    return paths


def translate(args) -> int:
    from signllava.subtitles import write_subtitles
    from signllava.video_translate import VideoTranslator, translator_kwargs
    videos = video_paths(args.videos)
    vt = VideoTranslator(args.checkpoint, segments=args.segments, num_beams=args.num_beams,
                         max_new_tokens=args.max_new_tokens, **translator_kwargs(args))
    failed = 0
    for path in videos:
        try:
            result = vt.translate_video(path, captions=args.captions)
        except DataError as e:                      # one bad video does not stop the others
            log.error("%s", e)
            failed += 1
            continue
        written = write_subtitles(args.out or path.parent, path.stem, result)
        log.info("%s: %d segments (%d skipped), %.1f s of video at %.2fx real time -> %s", path, len(result.segments),
                 len(result.skipped), result.duration, result.real_time_factor, written["vtt"])
    if failed:
        print(f"error: {failed} of {len(videos)} videos could not be translated (see above)", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    validate(p, args)
    return run_command(lambda: translate(args))


if __name__ == "__main__":
    sys.exit(main())
