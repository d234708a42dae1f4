"""The visual sign language (signllava/visual_language.py): its grammar, its filming and its corpus, read back
through extract.py's caption reader; and the whole chain on it: filmed videos -> extract.py -> both stages ->
translate.py --segments auto on held-out videos, scored for BLEU and segment times."""
from __future__ import annotations

import json

import numpy as np
import pytest

from signllava import visual_language as vl
from signllava.clip_sources import from_captions, video_files
from signllava.video_io import read_clip

SMALL = vl.Filming(size=96, sign_frames=4, rest_frames=(vl.REST_MIN, vl.REST_MIN + 2), lead_frames=6)


# ------------------------------------------------------------------------------------------ the language
def test_grammar_words_and_signs():
    assert len({s.gloss for s in vl.SIGNS}) == len({s.word for s in vl.SIGNS}) == len(vl.SIGNS) == 13
    assert sorted(g for slot in vl.GRAMMAR.values() for g in slot) == sorted(vl.BY_GLOSS)   # every sign has a slot
    sentences = vl.all_sentences()
    assert len(sentences) == len(set(sentences)) == 3 * 2 + 3 * 3 * 3 + 3 * 3 * 3 * 2
    assert all(2 <= len(s) <= 4 for s in sentences)
    assert vl.english(("CAT", "CHASE", "BALL", "TODAY")) == "cats chase balls today"
    # Every sign changes the body's shape (a tilt, stretch or lean): a shift or zoom alone is invisible to pose.
    shape = {"angle", "stretch_x", "stretch_y", "shear"}
    assert all({p for p, _ in s.motion} <= shape and s.motion for s in vl.SIGNS)
    assert len({s.motion for s in vl.SIGNS}) == len(vl.SIGNS)


def test_film_moves_during_signs_and_rests_between_sentences():
    rng = np.random.default_rng(3)
    frames, placed = vl.film_video([("DOG", "RUN"), ("BIRD", "SEE", "FISH", "OFTEN")], rng, SMALL)
    assert frames.dtype == np.uint8 and frames.shape[1:] == (96, 96, 3)
    first, second = placed
    assert first.text == "dogs run" and second.text == "birds see fish often"
    assert first.end_frame - first.start_frame == 2 * SMALL.sign_frames
    assert second.start_frame - first.end_frame >= vl.REST_MIN
    assert first.sign_starts == [first.start_frame, first.start_frame + SMALL.sign_frames]
    rest = frames[0]
    inside = np.zeros(len(frames), bool)
    for s in placed:
        inside[s.start_frame:s.end_frame] = True
    # Rest is exact stillness; every frame of a sentence moves the person off it.
    assert all(np.array_equal(f, rest) for f in frames[~inside])
    moved = [np.abs(f.astype(int) - rest).mean() for f in frames[inside]]
    assert min(moved) > 2.0, moved
    assert len(frames) == second.end_frame + SMALL.lead_frames


def test_corpus_is_deterministic_and_its_captions_are_the_sentences(tmp_path):
    rec = vl.write_corpus(tmp_path / "a", {"train": 2, "test": 1}, (2, 3), seed=7, filming=SMALL)
    vl.write_corpus(tmp_path / "b", {"train": 2, "test": 1}, (2, 3), seed=7, filming=SMALL)
    vl.write_corpus(tmp_path / "c", {"train": 2, "test": 1}, (2, 3), seed=8, filming=SMALL)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["language.json", "test/captions/test000.vtt", "test/videos/test000.mp4",
                                       "train/captions/train000.vtt", "train/captions/train001.vtt",
                                       "train/videos/train000.mp4", "train/videos/train001.mp4"]
    # The same seed: the same text, and videos that decode to the very frames filmed (lossless).
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files
               if f.suffix != ".mp4")
    filmed = vl.film_video([("DOG", "RUN")], np.random.default_rng(1), SMALL)[0]
    assert np.array_equal(filmed, vl.film_video([("DOG", "RUN")], np.random.default_rng(1), SMALL)[0])
    for f in files:
        if f.suffix == ".mp4":
            a, b = (read_clip(tmp_path / d / f, None, None, str(f), 60).frames for d in "ab")
            assert np.array_equal(a, b)
    assert (tmp_path / "a" / "language.json").read_text() != (tmp_path / "c" / "language.json").read_text()
    assert vl.load_record(tmp_path / "a") == json.loads(json.dumps(rec))
    # extract.py's caption reader gives back each sentence's text and times, and the clip holds its frames.
    clips, faults = from_captions(tmp_path / "a" / "train" / "captions", video_files(tmp_path / "a" / "train" / "videos"))
    assert faults == []
    for video, specs in clips.items():
        want = rec["videos"][video]["sentences"]
        assert [(c.start, c.end, c.text) for c in specs] == [(*s["caption"], s["text"]) for s in want]
        for c, s in zip(specs, want):     # a caption holds its sentence and at most 5 rest frames either side
            assert 0 <= s["start"] - c.start <= 5 / vl.FPS + 1e-9 and 0 <= c.end - s["end"] <= 5 / vl.FPS + 1e-9
        clip = read_clip(specs[0].file, specs[0].start, specs[0].end, video, 60)
        assert len(clip.frames) == round((specs[0].end - specs[0].start) * vl.FPS)


# ------------------------------------------------------------------------------------------ the whole chain
# Sized for the suite (about 4.5 minutes on two idle cores: extraction 110 s, stage 2 60 s, translation 60 s):
# 18 filmed training videos (~70 sentences, ~2600 frames for MediaPipe), 3 held-out ones (13 sentences); the
# pose stream (no model weights), standardised; 10 steps of stage 1 (the tiny random LLM is frozen there: its
# bounded logits let stage 1 change little) and 700 of stage 2 with LoRA on every linear layer and the output
# layer (at 350 the held-out BLEU was 73: the three subjects were still confused). demo.sh --video runs a
# larger corpus.
TRAIN_VIDEOS, HELD_OUT_VIDEOS, SEED = 18, 3, 0
STAGE1_STEPS, STAGE2_STEPS = 10, 700
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,lm_head"


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from tests.kit import build_tiny_llm, run_script, script_env, train_args
    root = tmp_path_factory.mktemp("video_language")
    corpus = root / "language"
    record = vl.write_corpus(corpus, {"train": TRAIN_VIDEOS, "test": HELD_OUT_VIDEOS}, seed=SEED)
    data = root / "D"
    run_script("extract.py", "--videos", corpus / "train" / "videos", "--captions", corpus / "train" / "captions",
               "--out", data, "--split", "train", "--modalities", "pose", "--workers", 2,
               env=script_env(OMP_NUM_THREADS=1))
    llm = build_tiny_llm(root / "llm", data)
    stage1, stage2 = root / "stage1", root / "stage2"
    # One thread: the tiny model gains nothing from two, and on a busy machine two OpenMP threads made a step
    # 25 times slower (3 samples/s against 86).
    env = script_env(OMP_NUM_THREADS=1)
    common = ("--batch_size", 8, "--weight_decay", 0, "--logging_steps", 50)
    run_script("pretrain.py", *train_args(data, llm, stage1, STAGE1_STEPS, "--standardize_features", *common), env=env)
    run_script("finetune.py", "--projector", stage1, *train_args(data, llm, stage2, STAGE2_STEPS, "--bits", 16,
                                                                 "--lora_targets", LORA_TARGETS, *common), env=env)
    subs = root / "subs"
    videos = sorted((corpus / "test" / "videos").glob("*.mp4"))
    res = run_script("translate.py", *videos, "--checkpoint", stage2, "--out", subs, "--segments", "auto",
                     "--workers", 2, env=env)
    subtitles = {v.stem: json.loads((subs / f"{v.stem}.json").read_text())["segments"] for v in videos}
    return {"record": record, "subtitles": subtitles, "log": res.stderr, "subs": subs, "corpus": corpus}


def test_held_out_videos_translate_from_automatic_segments(chain):
    """The held-out videos, segmented from their pose alone and translated by translate.py: every filmed sentence
    is found by one segment, each end within 0.3 s of the filmed one and the mean overlap (IoU) >= 0.8 (auto
    segments end a few frames after the motion, as MediaPipe's landmark smoothing and the segmenter's speed
    window lag it: 0.08-0.24 s late here), and the subtitles score BLEU >= 80 against the filmed sentences."""
    score = vl.score_subtitles(chain["record"], chain["subtitles"])
    report = "\n".join(f"{p['video']} {p['start_error']:+.2f} {p['end_error']:+.2f}  {p['reference']!r} -> "
                       f"{p['hypothesis']!r}" for p in score["pairs"])
    assert score["missed"] == 0 and score["extra_segments"] == 0, report
    assert score["worst_time_error"] <= 0.3 and score["mean_iou"] >= 0.8, report
    assert score["bleu"] >= 80, f"BLEU {score['bleu']:.1f}\n{report}"
    unseen = chain["record"]["unseen_sentences"]["test"]
    assert unseen > 0          # some held-out sentences were never seen in training, and they are scored too
    # The score command prints the same numbers.
    out = vl.main(["score", str(chain["corpus"]), str(chain["subs"])])
    assert out == 0
