"""The visual sign language (signllava/visual_language.py): its grammar, its filming and its corpus, read back
through extract.py's caption reader. (The chain trained on it to BLEU >= 80 is not in the suite yet.)"""
from __future__ import annotations

import json

import numpy as np

from signllava import visual_language as vl
from signllava.clip_sources import from_captions, video_files
from signllava.video_io import read_clip

SMALL = vl.Filming(size=96, sign_frames=4, rest_frames=(vl.REST_MIN, vl.REST_MIN + 2), lead_frames=3)


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
    # The same seed films the same frames and writes the same text (x264's bytes may vary from run to run).
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files
               if f.suffix != ".mp4")
    again = vl.film_video([("DOG", "RUN")], np.random.default_rng(1), SMALL)[0]
    assert np.array_equal(again, vl.film_video([("DOG", "RUN")], np.random.default_rng(1), SMALL)[0])
    assert (tmp_path / "a" / "language.json").read_text() != (tmp_path / "c" / "language.json").read_text()
    assert vl.load_record(tmp_path / "a") == json.loads(json.dumps(rec))
    # extract.py's caption reader gives back each sentence's text and times, and the clip holds its frames.
    clips, faults = from_captions(tmp_path / "a" / "train" / "captions", video_files(tmp_path / "a" / "train" / "videos"))
    assert faults == []
    for video, specs in clips.items():
        want = rec["videos"][video]["sentences"]
        assert [(c.start, c.end, c.text) for c in specs] == [(s["start"], s["end"], s["text"]) for s in want]
        clip = read_clip(specs[0].file, specs[0].start, specs[0].end, video, 60)
        assert len(clip.frames) == len(want[0]["glosses"]) * SMALL.sign_frames
