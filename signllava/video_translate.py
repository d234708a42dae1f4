"""A whole signing video to timed English sentences: segment it, extract each segment's features exactly as the
checkpoint's training data was extracted, translate the segments in time order with the model's own earlier
outputs as context. translate.py and the browser demo (signllava/app.py) are thin shells around this.

    video --(segments: auto from the pose, fixed windows, or a caption file's times)--> [start, end) ranges
          --(clip_inputs.prepare_clip per range: decode, MediaPipe, crops, 208 pose numbers)-->
          --(encoder_bundle.Encoders: MAE, DINOv2, sign2vec, as the checkpoint's extraction record names them)-->
          --(generate.Translator: each segment with the predicted sentences before it, training's windows)-->
    segments with text and the context each was given

Why each segment is extracted again rather than cut out of the segmentation pass: extract.py runs MediaPipe
with a fresh graph per clip (tracking never carries across clips), so a clip's landmarks, and so its features,
depend on its own frames only. Doing the same here makes a segment's features those that extract.py would make
for a clip with those times, which is what the model was trained on. The price is a second MediaPipe pass
(`--segments fixed:S` and captions need no first pass); the timings report each pass's share.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from signllava.clip_sources import ClipSpec, caption_files, caption_video, video_captions
from signllava.errors import CheckpointError, DataError, RunError
from signllava.prompts import translation_prompt

log = logging.getLogger("signllava.translate")
MAX_SEGMENT_SECONDS = 120.0          # as extract.py's --max_clip_seconds: a longer segment is refused, not cut
ENCODE_FRAMES = 4096                 # frames of crops held for the encoders at a time (~0.6 GB at MAE's 224 px)


@dataclass
class SubtitleSegment:
    start: float                   # seconds into the video
    end: float
    text: str
    context: list[str]             # the earlier outputs the prompt carried (training's windows picked them)


@dataclass
class VideoTranslation:
    video: str
    duration: float                                  # seconds of video
    segments: list[SubtitleSegment]
    skipped: list[dict] = field(default_factory=list)           # {start, end, reason}: segments not translated
    seconds: dict[str, float] = field(default_factory=dict)     # wall seconds per phase (segmentation, ...)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # work seconds per stage (decode, mae, ...)
    policy: str = "auto"

    @property
    def real_time_factor(self) -> float:
        """Seconds of video per second of work (> 1: faster than real time)."""
        work = sum(self.seconds.values())
        return self.duration / work if work > 0 else float("inf")

    def to_json(self) -> dict:
        return {"video": self.video, "duration": round(self.duration, 3), "segments_from": self.policy,
                "segments": [{**asdict(s), "start": round(s.start, 3), "end": round(s.end, 3)} for s in self.segments],
                "skipped": self.skipped,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
                "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
                "real_time_factor": round(self.real_time_factor, 3)}


class VideoTranslator:
    """A checkpoint and the encoders its training data was extracted with, loaded once for many videos.

    models:     {"mae" | "dino_face" | "dino_hand" | "sign2vec": path or HF id} to use instead of the
                recorded ones (the same weights moved elsewhere, or a deliberate change: a warning names what
                differs); a recorded model that cannot be loaded is a one-line error naming it and the flag.
    extraction: an extraction.json to use when the checkpoint carries none (trained on features made elsewhere).
    """

    def __init__(self, checkpoint, *, device=None, segments: str = "auto", num_beams: int = 5,
                 allow_different_settings: bool = False, models: dict[str, str] | None = None,
                 extraction: str | Path | None = None, workers: int = 0, batch_size: int = 64,
                 dtype: str | None = None, max_new_tokens: int | None = None):
        from generate import MAX_NEW_TOKENS, Translator
        from signllava.segmentation import parse_policy

        self.policy_text = segments
        parse_policy(segments)                       # a bad --segments fails before any model loads
        self.translator = Translator.from_checkpoint(checkpoint, device)
        self.checkpoint = self.translator.checkpoint
        self.num_beams, self.workers = num_beams, workers
        self.max_new_tokens = max_new_tokens or MAX_NEW_TOKENS
        self.min_new_tokens = 0             # > 0: benchmarks with random weights, whose outputs would stop at random
        self.record = self._record(extraction)
        settings = self.record["settings"]
        cfg = self.translator.cfg
        self.modalities = [m for m in cfg.modalities if m in settings["modalities"]]
        missing = [m for m in cfg.modalities if m not in self.modalities]
        if not self.modalities:
            raise DataError(f"{self.checkpoint}: its extraction record makes {', '.join(settings['modalities'])}, "
                            f"none of the checkpoint's modalities ({', '.join(cfg.modalities)})")
        if missing:
            log.warning("%s: the extraction record lacks %s; those segments go in as absent", self.checkpoint,
                        ", ".join(missing))
        self.face_box = settings.get("pose", {}).get("face_box", "selected")
        self.encoders = self._encoders(models or {}, batch_size, dtype, allow_different_settings)

    # -- loading
    def _record(self, extraction) -> dict:
        from signllava.extraction_record import RECORD_PARTS, differences, read_record
        own = self.translator.cfg.extraction
        if extraction is None:
            if own is None:
                raise CheckpointError(f"{self.checkpoint}: records no extraction (its training data came without "
                                      "an extraction.json); pass --extraction D/extraction.json of the features "
                                      "it was trained on")
            return own
        given = read_record(Path(extraction))
        given = {k: given[k] for k in RECORD_PARTS if k in given}
        if own is not None and differences(own, given):
            log.warning("%s: differs from the checkpoint's own extraction record in %s; using the file",
                        extraction, ", ".join(differences(own, given)[:6]))
        return given

    def _encoders(self, models: dict, batch_size: int, dtype: str | None, allow: bool):
        """The recorded encoders (or the given replacements), checked to make what the record says they made."""
        from signllava.encoder_bundle import Encoders
        from signllava.extraction_record import differences, encoder_choice, settings_record
        device = str(self.translator.device)
        choice = encoder_choice(self.record, device, batch_size, models, dtype)
        try:
            encoders = Encoders(self.modalities, choice)
        except (CheckpointError, DataError, RunError, OSError) as e:
            raise CheckpointError(f"{self.checkpoint}: an encoder its training data was extracted with cannot be "
                                  f"loaded ({e}); pass its new place with --mae/--dino_face/--dino_hand/--sign2vec"
                                  ) from None
        settings = self.record["settings"]
        made = settings_record(settings["modalities"], self.face_box, choice.channel_order == "bgr", choice.dtype,
                               encoders)
        made["settings"]["modalities"] = settings["modalities"]   # the record's own list (we may make fewer)
        recorded_models = {k: v for k, v in self.record["models"].items() if k in made["models"]}
        diffs = differences({**self.record, "models": recorded_models}, made)
        asked = bool(models) or dtype is not None
        if diffs and not (asked or allow):
            raise CheckpointError(f"{self.checkpoint}: the encoders here would extract otherwise than its training "
                                  f"data was ({', '.join(diffs[:6])}); pass --allow_different_settings to go on")
        if diffs:
            log.warning("%s: extracting otherwise than the training data was (%s), as asked", self.checkpoint,
                        ", ".join(diffs[:6]))
        return encoders

    # -- one video
    def translate_video(self, path, captions=None, segments: str | None = None) -> VideoTranslation:
        """Segments of the video at `path` with their translations. `captions`: a caption file (or a folder of
        them, found by the video's name) giving the segment times when the policy is "captions"."""
        from signllava.segmentation import parse_policy
        path = Path(path)
        policy = parse_policy(segments or self.policy_text)
        clock = time.perf_counter()
        ranges, duration = self._segments(path, policy, captions)
        seconds = {"segmentation": time.perf_counter() - clock}
        inputs, skipped, stage_seconds = self.segment_features(path, ranges, seconds)
        clock = time.perf_counter()
        translated = self._translate(inputs)
        seconds["translation"] = time.perf_counter() - clock
        return VideoTranslation(path.stem, duration, translated, skipped, seconds, stage_seconds,
                                policy=segments or self.policy_text)

    def _segments(self, path: Path, policy, captions) -> tuple[list[tuple[float, float]], float]:
        """The [start, end) ranges to translate, in time order, and the video's length in seconds."""
        from signllava import segmentation
        from signllava.landmarks import detect_stream
        from signllava.video_io import VideoStream, video_timeline
        loc = f"{path}"
        if policy.kind == "auto":
            stream = VideoStream(path, loc)
            lm = detect_stream(stream, stream.fps, loc)
            timeline = stream.timeline
            _note_variable_rate(loc, timeline)
            # Segment times from the decoded frames' own timestamps, as read_clip will cut them.
            found = segmentation.auto_segments(lm, times=timeline.times, end=timeline.duration)
            return [(s.start, s.end) for s in found], timeline.duration
        timeline = video_timeline(path, loc)
        if timeline is None:                          # packets without timestamps: decode to find the frames
            stream = VideoStream(path, loc)
            for _ in stream:
                pass
            timeline = stream.timeline
        _note_variable_rate(loc, timeline)
        duration = timeline.duration
        if policy.kind == "fixed":
            return [(s.start, s.end) for s in segmentation.fixed_segments(duration, policy.seconds)], duration
        return [(s, e) for s, e, _ in self._caption_cues(path, captions)], duration

    @staticmethod
    def _caption_cues(path: Path, captions) -> list[tuple[float, float, str]]:
        """The caption times of the video at `path`: from the file given, or from its own file in the folder
        given (found as extract.py finds it; the folder's other files are not read, their faults are not this
        video's). No usable caption is this video's fault, in translate.py's flags."""
        if captions is None:
            raise DataError(f"{path}: --segments captions needs --captions (a caption file or a folder of them)")
        captions = Path(captions)
        if captions.is_dir():
            mine = [p for p in caption_files(captions) if caption_video(p, {path.stem})]
            if not mine:
                raise DataError(f"{path}: no caption file for it in {captions} (--captions: {path.stem}.vtt, "
                                f"{path.stem}.<language>.vtt or {path.stem}.srt)")
            if len(mine) > 1:
                raise DataError(f"{path}: {len(mine)} caption files for it in {captions} "
                                f"({', '.join(p.name for p in mine)}); keep one, or pass one with --captions")
            captions = mine[0]
        specs, faults = video_captions(captions, path.stem, path)
        if not specs:
            raise DataError(f"{faults[0]}; nothing to translate (--segments captions)")
        for f in faults:
            log.warning("caption not translated: %s", f)
        return [(c.start, c.end, c.text) for c in specs]

    def segment_features(self, path: Path, ranges, seconds: dict | None = None):
        """Each range's features (as extract.py makes a clip's), the ranges that failed, the seconds per stage.
        Segments are encoded in groups of about ENCODE_FRAMES frames, so a long video never holds all its crops."""
        from signllava.clip_inputs import ClipTask, prepare_clips
        clock = time.perf_counter()
        tasks = [ClipTask(ClipSpec(path.stem, f"{path.stem}_{i}", path, s, e, None), None, self.encoders.mae_size,
                          "dino" in self.modalities, self.face_box, MAX_SEGMENT_SECONDS)
                 for i, (s, e) in enumerate(ranges)]
        features, pending, skipped, stage_seconds = [], [], [], {}

        def encode_pending():
            if pending:
                feats, enc_seconds = self.encoders.encode([clip for _, clip in pending])
                _add(stage_seconds, enc_seconds)
                features.extend((times, f) for (times, _), f in zip(pending, feats, strict=True))
                pending.clear()

        for (start, end), result in zip(ranges, prepare_clips(tasks, self.workers), strict=True):
            _add(stage_seconds, result.seconds)
            if hasattr(result, "reason"):
                log.warning("segment %.2f-%.2f s not translated: %s", start, end, result.reason)
                skipped.append({"start": round(start, 3), "end": round(end, 3), "reason": result.reason})
                continue
            pending.append(((start, end), result))
            if sum(clip.frames for _, clip in pending) >= ENCODE_FRAMES:
                encode_pending()
        encode_pending()
        if seconds is not None:
            seconds["features"] = time.perf_counter() - clock
        return features, skipped, stage_seconds

    def _translate(self, features) -> list[SubtitleSegment]:
        """In time order, each with the outputs before it as context. A checkpoint trained without context
        gets none, so its segments do not depend on each other and go in one batch."""
        tr = self.translator
        uses_context = tr.context_window > 0 or tr.prelude_window > 0
        if not uses_context:
            items = [tr.make_item(f, tr.context_prompt([])) for _, f in features]
            texts = tr.generate_items(items, self.num_beams, self.max_new_tokens, self.min_new_tokens) if items else []
            return [SubtitleSegment(s, e, t, []) for ((s, e), _), t in zip(features, texts, strict=True)]
        out, earlier = [], []
        for (start, end), feats in features:
            context = tr.pick_context(earlier)
            text = tr.generate_items([tr.make_item(feats, translation_prompt(context))], self.num_beams,
                                     self.max_new_tokens, self.min_new_tokens)[0]
            out.append(SubtitleSegment(start, end, text, context))
            earlier.append(text)
        return out


def _note_variable_rate(loc: str, timeline) -> None:
    """One warning a variable-rate video: its features are made per decoded frame, as training's were, so the
    model sees the signing at another frame rate than it was trained on wherever the rate departs from it."""
    note = timeline.rate_note()
    if note is not None:
        log.warning("%s: variable frame rate (%s); segments follow the frames' own times, but the model sees "
                    "one feature a decoded frame, at another rate than training's in parts", loc, note)


def _add(total: dict, more: dict) -> None:
    for k, v in more.items():
        total[k] = total.get(k, 0.0) + v


# ------------------------------------------------------------------------------------------- the flags
MODEL_FLAGS = ("mae", "dino_face", "dino_hand", "sign2vec")


def add_translator_args(p) -> None:
    """The flags translate.py and the browser demo share: where the recorded encoders are, the device."""
    ext = p.add_argument_group("extraction (default: what the checkpoint records)")
    for flag in MODEL_FLAGS:
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


def translator_kwargs(args) -> dict:
    """VideoTranslator's keyword arguments from the flags of add_translator_args."""
    return {"device": args.device, "allow_different_settings": args.allow_different_settings,
            "models": {f: getattr(args, f) for f in MODEL_FLAGS if getattr(args, f)}, "extraction": args.extraction,
            "workers": args.workers, "batch_size": args.batch_size, "dtype": args.dtype}
