"""A small visual sign language filmed from a real photo, to prove that the whole chain learns from video.

Every sign is a MOTION of skimage's astronaut photo over a few frames: a tilt, a stretch or a lean, or two
of them at once, out and back. The person always moves during a sign and stands still between sentences,
because automatic segmentation reads stillness as rest. A sign stands for one English word; a sentence is
2-4 signs from a small grammar, signed in English word order:

    SUBJECT INTRANSITIVE            "dogs run"
    SUBJECT VERB OBJECT [ADVERB]    "cats chase balls today"

The motions were chosen for what the pose stream can see. Its 208 numbers put each frame's body around the
shoulders' midpoint in units of the shoulder distance, and the face and hands in their own boxes
(signllava/pose_features.py), so a shift or an even zoom of the whole photo is normalised away; a rotation,
an uneven stretch and a shear change the body's shape and survive. Each video adds a random shift and zoom of
its own to every frame and each rendition of a sign a random strength, so nothing is learnt from where the
person stands or from one exact frame. `python -m signllava.visual_language probe` measures how well the
pose stream tells the signs apart before anything is trained (nearest-neighbour accuracy), and how little
it sees of a shift or a zoom.

`write_corpus(out, ...)` writes, deterministically from a seed (the videos lossless h264, so what is decoded
is exactly what was filmed):

    OUT/<split>/videos/<video>.mp4      sentences separated by still rest (>= REST_MIN frames)
    OUT/<split>/captions/<video>.vtt    one cue per sentence: its time (with a little rest either side, as
                                         real captions are loose) and its English (what extract.py --captions
                                         reads, YouTube-ASL's shape)
    OUT/language.json                   the signs, the grammar and every video's sentences with their exact
                                         times (first to last moving frame) and their captions' times

The held-out split ("test") draws its sentences from the same grammar with renditions of its own; the grammar
makes 87 sentences, so some held-out ones were never seen in training (language.json counts them).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from signllava.atomic import write_atomic
from signllava.video_io import write_video

FPS = 25
REST_MIN = 20                  # frames of stillness between sentences: 0.8 s at 25 fps. Auto segmentation takes a
                               # pause under 0.4 s for a hold inside a sentence, and its segments reach past the
                               # motion by a few frames; at 0.6 s two sentences were once taken for one.
BACKDROP = 90                  # grey around the photo, as tests/video_kit.py films it


# ---------------------------------------------------------------------------------------------- the signs
# What a motion moves. angle: degrees counter-clockwise; stretch_x / stretch_y: log of the scale on that axis;
# shear: x moves by shear * (y - centre). shift_x / shift_y (pixels) and zoom (log scale) move the person
# without changing its shape: each video's placement uses them, and the pose stream does not see them.
PARAMETERS = ("angle", "stretch_x", "stretch_y", "shear", "shift_x", "shift_y", "zoom")
TILT, STRETCH, SHEAR = 22.0, 0.35, 0.45


@dataclass(frozen=True)
class Sign:
    """A word and its motion: each parameter goes out to its amplitude and back over the sign's frames.

    The pose stream sees three directions of the photo's shape (the tilt, the aspect ratio, the shear; an even
    zoom and a shift it normalises away), so the signs are 13 distinct points of that space, one axis or two at
    a time. Each sign goes out and back rather than one way then the other: a sign is then also told apart by
    the frames it holds, not only by their order, which a two-layer LLM learns far faster from 150 sentences."""
    gloss: str
    word: str
    motion: tuple[tuple[str, float], ...]       # (parameter, amplitude)

    def offsets(self, frames: int, strength: float = 1.0) -> dict[str, np.ndarray]:
        """Each parameter's value at each of the sign's frames: sin(pi u) at the frames' centres u, so every
        frame of a sign is off the rest pose and the person never stands still inside a sentence."""
        u = (np.arange(frames) + 0.5) / frames
        out = {p: np.zeros(frames) for p in PARAMETERS}
        for parameter, amplitude in self.motion:
            out[parameter] = out[parameter] + strength * amplitude * np.sin(np.pi * u)
        return out


# Two axes at once go to 0.8 of each one's amplitude: at full strength on both, MediaPipe's tracking through a
# whole video now and then lost the body for a frame, and auto segmentation reads a lost body as rest.
COMBINED = 0.8
CW, CCW, TALL, WIDE, LEAN_R, LEAN_L = (("angle", -TILT),), (("angle", TILT),), (("stretch_y", STRETCH),), \
    (("stretch_x", STRETCH),), (("shear", SHEAR),), (("shear", -SHEAR),)


def both(a, b):
    return tuple((p, COMBINED * v) for p, v in a + b)



# Chosen by measurement (nearest-neighbour accuracy of pose sequences, as `probe` measures it): of the 18 one- and two-axis motions,
# the 5 whose pose sequences lay nearest another's were left out (wide + lean left, ccw + wide, tall + lean
# right, tall + lean left, cw + lean left).
SIGNS = (
    Sign("CAT", "cats", CCW), Sign("DOG", "dogs", CW), Sign("BIRD", "birds", TALL),          # subjects
    Sign("RUN", "run", WIDE), Sign("SLEEP", "sleep", LEAN_R),                                  # intransitive
    Sign("SEE", "see", LEAN_L), Sign("CHASE", "chase", both(CCW, TALL)), Sign("LIKE", "like", both(CW, TALL)),   # verbs
    Sign("FISH", "fish", both(CCW, LEAN_R)), Sign("BALL", "balls", both(CW, LEAN_R)), Sign("TREE", "trees", both(CCW, LEAN_L)),
    Sign("TODAY", "today", both(CW, WIDE)), Sign("OFTEN", "often", both(WIDE, LEAN_R)),                  # adverbs
)
BY_GLOSS = {s.gloss: s for s in SIGNS}
GRAMMAR = {
    "subject": ("CAT", "DOG", "BIRD"),
    "intransitive": ("RUN", "SLEEP"),
    "verb": ("SEE", "CHASE", "LIKE"),
    "object": ("FISH", "BALL", "TREE"),
    "adverb": ("TODAY", "OFTEN"),
}
RULES = (("subject", "intransitive"), ("subject", "verb", "object"), ("subject", "verb", "object", "adverb"))


def sentence_glosses(rng: np.random.Generator) -> tuple[str, ...]:
    rule = RULES[rng.integers(len(RULES))]
    return tuple(GRAMMAR[slot][rng.integers(len(GRAMMAR[slot]))] for slot in rule)


def english(glosses: tuple[str, ...]) -> str:
    return " ".join(BY_GLOSS[g].word for g in glosses)


def all_sentences() -> list[tuple[str, ...]]:
    """Every sentence the grammar makes (for the report of how many held-out sentences were never seen)."""
    out = [()]
    for rule in RULES:
        prefix = [()]
        for slot in rule:
            prefix = [p + (g,) for p in prefix for g in GRAMMAR[slot]]
        out += prefix
    return out[1:]


# ---------------------------------------------------------------------------------------------- filming
@dataclass(frozen=True)
class Filming:
    """How the videos are made; `write_corpus` records it in language.json."""
    size: int = 192                 # square frames
    photo: float = 0.8              # the photo's side in the frame, before the video's own zoom
    sign_frames: int = 10           # frames per sign (0.4 s at 25 fps): a two-sign sentence lasts 0.8 s, enough
                                    # over auto segmentation's 0.6 s shortest sentence that the edges it trims
                                    # never take it under (at 0.64 s it was joined to its neighbour)
    rest_frames: tuple[int, int] = (REST_MIN, REST_MIN + 5)     # still frames between sentences, drawn in range
    lead_frames: int = 8            # still frames before the first and after the last sentence
    caption_margin: tuple[int, int] = (0, 5)    # rest frames a caption takes in before and after its sentence,
                                    # drawn per side: real captions are loose, and auto segments reach into the
                                    # rest too, so the model must not learn that a clip starts on a sign's frame
    strength: tuple[float, float] = (0.85, 1.15)                 # a rendition's amplitudes, drawn in range
    place_shift: float = 10.0       # a video's own shift (pixels, each axis) and zoom (log) of the whole photo
    place_zoom: float = 0.06

    def __post_init__(self):
        # A caption never reaches past the video's ends or into the next sentence's caption.
        if not (0 <= self.caption_margin[0] <= self.caption_margin[1] <= self.lead_frames
                and 2 * self.caption_margin[1] < self.rest_frames[0] <= self.rest_frames[1]):
            raise ValueError(f"caption margins {self.caption_margin} must fit in the lead ({self.lead_frames}) and "
                             f"in half the rest ({self.rest_frames}) frames")


def _photo_canvas(f: Filming) -> np.ndarray:
    from skimage import data
    side = int(round(f.size * f.photo))
    photo = cv2.resize(data.astronaut(), (side, side), interpolation=cv2.INTER_AREA)
    canvas = np.full((f.size, f.size, 3), BACKDROP, np.uint8)
    o = (f.size - side) // 2
    canvas[o:o + side, o:o + side] = photo
    return canvas


def _warp(canvas: np.ndarray, p: dict[str, float]) -> np.ndarray:
    """The canvas moved about its centre: stretch, shear, rotation, zoom, then shift."""
    n = canvas.shape[0]
    c = n / 2
    zoom = np.exp(p["zoom"])
    scale = np.diag([np.exp(p["stretch_x"]) * zoom, np.exp(p["stretch_y"]) * zoom])
    shear = np.array([[1.0, p["shear"]], [0.0, 1.0]])
    a = np.deg2rad(p["angle"])
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])    # counter-clockwise on screen (y down)
    m = rot @ shear @ scale
    t = np.array([c + p["shift_x"], c + p["shift_y"]]) - m @ np.array([c, c])
    return cv2.warpAffine(canvas, np.hstack([m, t[:, None]]), (n, n), flags=cv2.INTER_LINEAR,
                          borderValue=(BACKDROP,) * 3)


@dataclass
class Sentence:
    glosses: tuple[str, ...]
    text: str
    start_frame: int               # first frame of its first sign
    end_frame: int                 # one past its last sign's last frame
    sign_starts: list[int] = field(default_factory=list)
    caption: tuple[int, int] = (0, 0)   # the caption's [start, end) frames: the sentence and some rest

    def times(self) -> tuple[float, float]:
        return self.start_frame / FPS, self.end_frame / FPS

    def caption_times(self) -> tuple[float, float]:
        return self.caption[0] / FPS, self.caption[1] / FPS


def film_video(sentences: list[tuple[str, ...]], rng: np.random.Generator, f: Filming,
               canvas: np.ndarray | None = None) -> tuple[np.ndarray, list[Sentence]]:
    """uint8 [T, size, size, 3] RGB frames of the sentences, rest between them, and where each one lies."""
    canvas = _photo_canvas(f) if canvas is None else canvas
    place = {"shift_x": rng.uniform(-f.place_shift, f.place_shift), "shift_y": rng.uniform(-f.place_shift, f.place_shift),
             "zoom": rng.uniform(-f.place_zoom, f.place_zoom)}
    rest = {p: place.get(p, 0.0) for p in PARAMETERS}
    track: list[dict[str, float]] = [rest] * f.lead_frames
    placed = []
    for k, glosses in enumerate(sentences):
        if k:
            track += [rest] * int(rng.integers(f.rest_frames[0], f.rest_frames[1] + 1))
        s = Sentence(glosses, english(glosses), len(track), 0)
        for g in glosses:
            s.sign_starts.append(len(track))
            moves = BY_GLOSS[g].offsets(f.sign_frames, rng.uniform(*f.strength))
            track += [{p: rest[p] + moves[p][t] for p in PARAMETERS} for t in range(f.sign_frames)]
        s.end_frame = len(track)
        s.caption = (s.start_frame - int(rng.integers(f.caption_margin[0], f.caption_margin[1] + 1)),
                     s.end_frame + int(rng.integers(f.caption_margin[0], f.caption_margin[1] + 1)))
        placed.append(s)
    track += [rest] * f.lead_frames
    # Rest frames are one image, warped once: stillness is exact, as in a real video's pauses.
    still = _warp(canvas, rest)
    frames = np.stack([still if p is rest else _warp(canvas, p) for p in track])
    return frames, placed


# ---------------------------------------------------------------------------------------------- the corpus
def _timestamp(seconds: float) -> str:
    ms = int(round(seconds * 1000))
    return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def webvtt(sentences: list[Sentence]) -> str:
    cues = [f"{_timestamp(s.caption_times()[0])} --> {_timestamp(s.caption_times()[1])}\n{s.text}\n" for s in sentences]
    return "WEBVTT\n\n" + "\n".join(cues)


def write_corpus(out: Path, videos: dict[str, int], sentences_per_video: tuple[int, int] = (3, 5), seed: int = 0,
                 filming: Filming = Filming()) -> dict:
    """Videos, captions and language.json for each split ({split: number of videos}); returns the record.
    The same seed gives the same frames (the videos are lossless: decoding returns them exactly), captions and
    language.json."""
    out = Path(out)
    canvas = _photo_canvas(filming)
    record = {"seed": seed, "fps": FPS, "filming": asdict(filming),
              "signs": [{"gloss": s.gloss, "word": s.word, "motion": [list(m) for m in s.motion]} for s in SIGNS],
              "grammar": {k: list(v) for k, v in GRAMMAR.items()}, "rules": [list(r) for r in RULES], "videos": {}}
    for split_no, (split, count) in enumerate(videos.items()):
        for v in range(count):
            rng = np.random.default_rng([seed, split_no, v])
            n = int(rng.integers(sentences_per_video[0], sentences_per_video[1] + 1))
            frames, placed = film_video([sentence_glosses(rng) for _ in range(n)], rng, filming, canvas)
            name = f"{split}{v:03d}"
            write_video(out / split / "videos" / f"{name}.mp4", frames, fps=FPS, lossless=True)
            write_atomic(out / split / "captions" / f"{name}.vtt", webvtt(placed))
            record["videos"][name] = {
                "split": split, "frames": len(frames), "seconds": len(frames) / FPS,
                "sentences": [{"glosses": list(s.glosses), "text": s.text, "start": s.times()[0], "end": s.times()[1],
                               "caption": list(s.caption_times()), "sign_starts": [t / FPS for t in s.sign_starts]}
                              for s in placed]}
    seen = {tuple(s["glosses"]) for r in record["videos"].values() if r["split"] == "train" for s in r["sentences"]}
    for split in videos:
        held = [tuple(s["glosses"]) for r in record["videos"].values() if r["split"] == split for s in r["sentences"]]
        record.setdefault("unseen_sentences", {})[split] = sum(g not in seen for g in held)
    write_atomic(out / "language.json", json.dumps(record, indent=1))
    return record


def load_record(root: Path) -> dict:
    return json.loads((Path(root) / "language.json").read_text())


# ---------------------------------------------------------------------------------------------- scoring
def _iou(a: tuple[float, float], b: tuple[float, float]) -> float:
    inter = max(0.0, min(a[1], b[1]) - max(a[0], b[0]))
    union = max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0


def score_subtitles(record: dict, subtitles: dict[str, list[dict]], split: str = "test", min_iou: float = 0.5) -> dict:
    """translate.py's segments ({video: [{"start", "end", "text"}, ...]}, its OUT/<video>.json "segments")
    against the sentences the videos were filmed with: each sentence is paired with the segment that overlaps
    it most (intersection over union, each segment used once, pairs under `min_iou` not paired); a sentence
    without a segment counts as translated by nothing. BLEU and chrF as generate.py scores them (sacreBLEU),
    and the time errors of the pairs."""
    from signllava.scoring import bleu_chrf
    hyps, refs, pairs, extra, missed = [], [], [], 0, 0
    for video, r in sorted(record["videos"].items()):
        if r["split"] != split:
            continue
        segs = [(float(g["start"]), float(g["end"]), g.get("text") or "") for g in subtitles.get(video, [])]
        sentences = [(s["start"], s["end"], s["text"]) for s in r["sentences"]]
        scored = sorted(((_iou(seg[:2], sen[:2]), i, j) for i, sen in enumerate(sentences)
                         for j, seg in enumerate(segs)), reverse=True)
        taken_s, taken_g, match = set(), set(), {}
        for iou, i, j in scored:
            if iou >= min_iou and i not in taken_s and j not in taken_g:
                taken_s.add(i), taken_g.add(j)
                match[i] = (j, iou)
        extra += len(segs) - len(match)
        for i, (start, end, text) in enumerate(sentences):
            refs.append(text)
            if i not in match:
                hyps.append("")
                missed += 1
                continue
            j, iou = match[i]
            hyps.append(segs[j][2])
            pairs.append({"video": video, "start_error": segs[j][0] - start, "end_error": segs[j][1] - end,
                          "iou": iou, "reference": text, "hypothesis": segs[j][2]})
    b, c, _, _ = bleu_chrf(hyps, [refs])
    worst = max((max(abs(p["start_error"]), abs(p["end_error"])) for p in pairs), default=None)
    return {"sentences": len(refs), "paired": len(pairs), "missed": missed, "extra_segments": extra,
            "bleu": b.score, "chrf": c.score, "exact": sum(p["hypothesis"] == p["reference"] for p in pairs),
            "worst_time_error": worst, "mean_iou": float(np.mean([p["iou"] for p in pairs])) if pairs else 0.0,
            "pairs": pairs}


# ---------------------------------------------------------------------------------------------- the probe
# Motions outside the vocabulary, measured beside the signs: the whole photo moved without changing its shape.
CONTROLS = (Sign("SHIFT", "-", (("shift_x", 15.0), ("shift_y", -10.0))), Sign("ZOOM", "-", (("zoom", 0.25),)))
STILL_LEAD = 4           # still frames before each probe clip's sign: MediaPipe's tracking settles, and they are
                         # the reference the sign's frames are measured from


def probe(renditions: int = 3, seed: int = 0, filming: Filming = Filming()) -> dict:
    """What the pose stream sees of each sign before anything is trained: every sign (and the CONTROLS) filmed
    `renditions` times, each in a placement and strength of its own, as a clip of STILL_LEAD still frames and the
    sign; MediaPipe and the 208 pose numbers exactly as extract.py makes them (signer_inputs). Returns
    - nn_accuracy: how often a sign's pose sequence is nearest (Euclidean, each number standardised) to a
      rendition of the same sign in another placement; chance is 1/13;
    - displacement: per motion, the mean |pose - still pose| over its frames, over MediaPipe's jitter (the
      same measure between the still frames): far above 1 for the signs, near 1 for a shift or an even zoom;
    - body_found: the share of a motion's frames in which MediaPipe found the body (a frame without one is
      missing from the pose stream, and auto segmentation reads it as rest)."""
    from signllava import landmarks, pose_features

    rng = np.random.default_rng(seed)
    canvas = _photo_canvas(filming)
    motions = SIGNS + CONTROLS
    seqs, labels, groups, moved, jitter = [], [], [], {m.gloss: [] for m in motions}, []
    found = {m.gloss: [] for m in motions}
    for r in range(renditions):
        for m in motions:
            place = {p: 0.0 for p in PARAMETERS}
            place.update(shift_x=rng.uniform(-filming.place_shift, filming.place_shift),
                         shift_y=rng.uniform(-filming.place_shift, filming.place_shift),
                         zoom=rng.uniform(-filming.place_zoom, filming.place_zoom))
            moves = m.offsets(filming.sign_frames, rng.uniform(*filming.strength))
            track = [place] * STILL_LEAD + [{p: place[p] + moves[p][t] for p in PARAMETERS}
                                            for t in range(filming.sign_frames)]
            frames = np.stack([_warp(canvas, p) for p in track])
            lm = landmarks.detect(frames, FPS, f"probe {m.gloss}")
            found[m.gloss].append(float(lm.body_found[STILL_LEAD:].mean()))
            pose = pose_features.signer_inputs(frames, lm, f"probe {m.gloss}").pose.astype(np.float64)
            still = pose[STILL_LEAD - 1]
            jitter.append(np.abs(pose[1:STILL_LEAD - 1] - still).mean())
            moved[m.gloss].append(np.abs(pose[STILL_LEAD:] - still).mean())
            if m in SIGNS:
                seqs.append(pose[STILL_LEAD:].reshape(-1))
                labels.append(m.gloss)
                groups.append(r)
    x = np.stack(seqs)
    x = (x - x.mean(0)) / (x.std(0) + 1e-9)
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    d[np.equal.outer(groups, groups)] = np.inf          # neighbours from other renditions only
    labels = np.array(labels)
    hit = labels[d.argmin(1)] == labels
    noise = float(np.mean(jitter))
    return {"renditions": renditions, "nn_accuracy": float(hit.mean()),
            "nn_accuracy_per_sign": {g: float(hit[labels == g].mean()) for g in BY_GLOSS},
            "body_found": {g: float(np.mean(v)) for g, v in found.items()},
            "mediapipe_jitter": noise,
            "displacement": {g: float(np.mean(v)) / noise for g, v in moved.items()}}


# ---------------------------------------------------------------------------------------------- command line
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m signllava.visual_language", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    w = sub.add_parser("write", help="write the corpus: videos, captions, language.json")
    w.add_argument("out", type=Path)
    for split, default in (("train", 40), ("dev", 0), ("test", 4)):
        w.add_argument(f"--{split}", type=int, default=default, help=f"videos in the {split} split (default {default})")
    w.add_argument("--sentences", default="3:5", help="sentences per video, MIN:MAX (default 3:5)")
    w.add_argument("--seed", type=int, default=0)
    pr = sub.add_parser("probe", help="nearest-neighbour accuracy of the signs' pose sequences (MediaPipe, no training)")
    pr.add_argument("--renditions", type=int, default=3)
    pr.add_argument("--seed", type=int, default=0)
    sc = sub.add_parser("score", help="translate.py's subtitles of a split against the filmed sentences: BLEU, times")
    sc.add_argument("root", type=Path, help="the corpus folder (language.json)")
    sc.add_argument("subtitles", type=Path, help="translate.py's --out folder (<video>.json)")
    sc.add_argument("--split", default="test")
    sc.add_argument("--out", type=Path, help="write the whole score (every pair) as JSON here")
    args = p.parse_args(argv)
    if args.command == "score":
        return _score_command(args)
    if args.command == "probe":
        if args.renditions < 2:
            p.error("--renditions must be at least 2 (a neighbour comes from another rendition)")
        print(json.dumps(probe(args.renditions, args.seed), indent=1))
        return 0
    try:
        low, high = (int(v) for v in args.sentences.split(":"))
    except ValueError:
        p.error(f"--sentences {args.sentences!r}: expected MIN:MAX, e.g. 3:5")
    splits = {s: getattr(args, s) for s in ("train", "dev", "test") if getattr(args, s) > 0}
    if not 1 <= low <= high or any(n < 0 for n in (args.train, args.dev, args.test)) or not splits:
        p.error("--sentences needs 1 <= MIN <= MAX, and some split needs videos")
    record = write_corpus(args.out, splits, (low, high), args.seed)
    counts = {s: sum(r["split"] == s for r in record["videos"].values()) for s in splits}
    print(f"{args.out}: {counts} videos, {sum(len(r['sentences']) for r in record['videos'].values())} sentences; "
          f"held-out sentences never in train: {record['unseen_sentences']}")
    return 0


def _score_command(args) -> int:
    from signllava.errors import DataError, run_command

    def run() -> int:
        path = args.root / "language.json"
        if not path.is_file():
            raise DataError(f"{path}: not found (is {args.root} a corpus written by `write`?)")
        record = load_record(args.root)
        subtitles = {}
        for video, r in record["videos"].items():
            if r["split"] == args.split:
                f = args.subtitles / f"{video}.json"
                if not f.is_file():
                    raise DataError(f"{f}: no subtitles for held-out video {video!r} (translate.py --out {args.subtitles})")
                subtitles[video] = json.loads(f.read_text())["segments"]
        if not subtitles:
            raise DataError(f"{path}: no videos in split {args.split!r}")
        result = score_subtitles(record, subtitles, args.split)
        if args.out:
            write_atomic(args.out, json.dumps(result, indent=1))
        worst = result["worst_time_error"]
        print(f"{args.split}: BLEU {result['bleu']:.2f}, chrF {result['chrf']:.2f} over {result['sentences']} "
              f"sentences ({result['exact']} exact); segments: {result['paired']} paired, {result['missed']} missed, "
              f"{result['extra_segments']} extra, mean IoU {result['mean_iou']:.3f}, worst time error "
              + (f"{worst:.3f} s" if worst is not None else "-"))
        return 0
    return run_command(run)


if __name__ == "__main__":
    sys.exit(main())
