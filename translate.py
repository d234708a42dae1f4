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
    ext = p.add_argument_group("extraction (default: what the checkpoint records)")
    for flag in ("mae", "dino_face", "dino_hand", "sign2vec"):
        ext.add_argument(f"--{flag}", help=f"where the recorded {flag} model is now (HF id, folder or checkpoint file)")
    ext.add_argument("--extraction", type=Path,
                     help="an extraction.json to use (a checkpoint trained on features made elsewhere records none)")
    ext.add_argument("--allow_different_settings", action="store_true",
                     help="extract although the encoders here differ from the recorded ones (a warning)")
    run = p.add_argument_group("run")
    run.add_argument("--device", help="default: the GPU if there is one, else cpu")
    run.add_argument("--dtype", choices=("bfloat16", "float32"), help="encoders' dtype (default: the recorded one)")
    run.add_argument("--batch_size", type=int, default=64, help="frames per encoder batch")
    run.add_argument("--workers", type=int, default=0, help="processes for decoding and MediaPipe (0: this one)")
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
    from signllava.clip_sources import video_files
    paths = []
    for path in given:
        if path.is_dir():
            paths += sorted(video_files(path).values())
        elif path.is_file():
            paths.append(path)
        else:
            raise DataError(f"{path}: no such video file or folder")
    if len({p.stem for p in paths}) < len(paths):
        raise DataError("two videos share a name: their subtitles would overwrite each other; translate them apart")
    return paths


def translate(args) -> int:
    from signllava.subtitles import write_subtitles
    from signllava.video_translate import VideoTranslator
    videos = video_paths(args.videos)
    models = {f: getattr(args, f) for f in ("mae", "dino_face", "dino_hand", "sign2vec") if getattr(args, f)}
    vt = VideoTranslator(args.checkpoint, device=args.device, segments=args.segments, num_beams=args.num_beams,
                         allow_different_settings=args.allow_different_settings, models=models,
                         extraction=args.extraction, workers=args.workers, batch_size=args.batch_size,
                         dtype=args.dtype, max_new_tokens=args.max_new_tokens)
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
