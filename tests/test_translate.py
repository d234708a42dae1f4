"""translate.py: videos of a real person (the astronaut photo, the real MediaPipe, tiny random encoders of the
real architectures) extracted by extract.py, a stage-1 run trained with a context window on them, then
translate.py on the same videos: the checkpoint carries the extraction record, a segment's features are the
dataset's features of the clip with those times, the texts are the Translator's with the model's own
earlier outputs as context, the subtitle files are well formed, and every bad input is one line."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import webvtt

from signllava.subtitles import srt_text, timestamp, vtt_text
from signllava.video_translate import SubtitleSegment
from tests.kit import run_script, script_env
from tests.test_extract import features
from tests.video_kit import trained_video_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two filmed videos extracted (all four streams) and stage 1 trained on them with context window 2."""
    return trained_video_run(tmp_path_factory)


def translate(*args, check=True):
    return run_script("translate.py", "--num_beams", 2, "--max_new_tokens", 6, *args, check=check,
                      env=script_env(OMP_NUM_THREADS=1))


def translate_here(capsys, *args) -> tuple[int, str]:
    """translate.py's main in this process (no interpreter start, models loaded once per call): (status,
    the last line it printed to stderr)."""
    import translate as script
    try:
        status = script.main([str(a) for a in ("--num_beams", 2, "--max_new_tokens", 6, *args)])
    except SystemExit as e:                   # argparse's usage errors
        status = e.code
    err = capsys.readouterr().err.strip().splitlines()
    return status, err[-1] if err else ""


def test_subtitle_files_are_well_formed():
    segs = [SubtitleSegment(0.0, 1.25, "hello  there", []), SubtitleSegment(61.5, 3723.004, "a --> b\n\nc", []),
            SubtitleSegment(4000, 4001, "   ", []), SubtitleSegment(4002, 4003, "R&D <b>", [])]
    assert timestamp(3723.0045) == "01:02:03.004" and timestamp(-1) == "00:00:00.000"
    vtt = vtt_text(segs)
    cues = webvtt.from_string(vtt)
    assert [(c.start, c.end, c.raw_text) for c in cues] == [("00:00:00.000", "00:00:01.250", "hello there"),
                                                             ("00:01:01.500", "01:02:03.004", "a -&gt; b c"),
                                                             ("01:06:42.000", "01:06:43.000", "R&amp;D &lt;b&gt;")]
    srt = srt_text(segs)
    assert srt.startswith("1\n00:00:00,000 --> 00:00:01,250\nhello there\n") and "\n2\n00:01:01,500 --> " in srt
    assert "\n3\n01:06:42,000 --> 01:06:43,000\nR&D" in srt and "\n4\n" not in srt   # no words, no cue


def test_checkpoint_carries_the_datasets_extraction_record(trained):
    cfg = json.loads((trained["run"] / (trained["run"] / "latest").read_text().strip() / "config.json").read_text())
    record = json.loads((trained["data"] / "extraction.json").read_text())
    assert cfg["extraction"] == {k: record[k] for k in ("settings", "models", "software")}


def test_caption_segments_translate_with_the_models_own_context(trained, tmp_path):
    """Segments from the caption file: each one's features equal the dataset's for that clip, and the text of
    each is what the Translator gives those features with the earlier outputs as context."""
    from generate import Translator
    from signllava.video_translate import VideoTranslator
    out = tmp_path / "subs"
    translate(trained["videos"] / "yt0.mp4", "--checkpoint", trained["run"], "--segments", "captions",
              "--captions", trained["captions"], "--out", out)
    result = json.loads((out / "yt0.json").read_text())
    assert [(s["start"], s["end"]) for s in result["segments"]] == [(0.3, 0.9), (1.1, 1.7), (1.9, 2.5)]
    assert result["skipped"] == [] and result["real_time_factor"] > 0
    assert set(result["stage_seconds"]) >= {"decode", "landmarks", "crops", "mae", "dino", "sign2vec"}
    cues = webvtt.read(str(out / "yt0.vtt"))
    assert [c.text for c in cues] == [s["text"] for s in result["segments"] if s["text"]]
    assert (out / "yt0.srt").read_text().startswith("1\n00:00:00,300 --> 00:00:00,900\n")

    # The same features as extract.py wrote for those clips ...
    vt = VideoTranslator(trained["run"], device="cpu", segments="captions", num_beams=2)
    ranges = [(s["start"], s["end"]) for s in result["segments"]]
    made, skipped, _ = vt.segment_features(trained["videos"] / "yt0.mp4", ranges)
    stored = features(trained["data"])
    assert not skipped
    for k, (_, feats) in enumerate(made):
        for m, a in feats.items():
            np.testing.assert_allclose(a.astype(np.float32), stored[(m, "yt0", f"yt0_{k}")].astype(np.float32),
                                       atol=2e-3, err_msg=f"{m} of segment {k}")
    # ... and each text is the Translator's with the outputs before it as the context (window 2).
    tr = Translator.from_checkpoint(trained["run"], "cpu")
    earlier = []
    for seg, (_, feats) in zip(result["segments"], made, strict=True):
        assert seg["context"] == [c for c in earlier[-2:] if c.strip()]
        assert seg["text"] == tr.translate(feats, context=earlier, num_beams=2, max_new_tokens=6)
        earlier.append(seg["text"])


def test_fixed_windows_cover_the_video(trained, tmp_path, capsys):
    status, err = translate_here(capsys, trained["videos"] / "yt1.mp4", "--checkpoint", trained["run"],
                                 "--segments", "fixed:1", "--out", tmp_path)
    result = json.loads((tmp_path / "yt1.json").read_text())
    assert status == 0 and [(s["start"], s["end"]) for s in result["segments"]] == [(0.0, 1.0), (1.0, 2.0), (2.0, 3.0)]
    assert result["duration"] == 3.0


def test_bad_inputs_are_one_line(trained, tmp_path, capsys, caplog):
    run, video = trained["run"], trained["videos"] / "yt1.mp4"
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00not a video" * 50)
    status, err = translate_here(capsys, broken, "--checkpoint", run, "--segments", "fixed:1", "--out", tmp_path)
    assert status == 2 and err == "error: 1 of 1 videos could not be translated (see above)"
    assert f"{broken}: unreadable video" in caplog.text

    # An encoder moved away (the recorded place is gone): the error names the checkpoint and the flag; --mae at
    # its new place works, with a warning. The shared run is only read: a copy's record says where MAE was.
    from signllava.checkpoint import write_manifest
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    ckpt = moved / (moved / "latest").read_text().strip()
    cfg = json.loads((ckpt / "config.json").read_text())
    mae = cfg["extraction"]["models"]["mae"]["source"]
    cfg["extraction"]["models"]["mae"]["source"] = str(tmp_path / "gone")
    (ckpt / "config.json").write_text(json.dumps(cfg))
    write_manifest(ckpt)
    status, err = translate_here(capsys, video, "--checkpoint", moved, "--segments", "fixed:1", "--out", tmp_path)
    assert status == 2 and err.startswith(f"error: {ckpt}") and "cannot be loaded" in err and "--mae" in err, err
    caplog.clear()
    status, _ = translate_here(capsys, video, "--checkpoint", moved, "--segments", "fixed:1", "--out", tmp_path,
                               "--mae", mae)
    assert status == 0 and "otherwise than the training data was (models.mae.source), as asked" in caplog.text

    for flags, want in ((["--segments", "sometimes"], "--segments must be auto, captions or fixed:S"),
                        (["--segments", "fixed:0"], "--segments must be"),
                        (["--segments", "captions"], "--segments captions and --captions go together"),
                        (["--num_beams", "0"], "--num_beams must be >= 1")):
        status, err = translate_here(capsys, video, "--checkpoint", run, *flags)
        assert status == 2 and want in err, (flags, err)


def test_checkpoint_without_a_record_says_what_to_pass(trained, tmp_path, capsys):
    """A checkpoint trained on features made elsewhere carries no record: one line asking for --extraction;
    given the dataset's extraction.json, it translates."""
    from signllava.checkpoint import write_manifest
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    ckpt = run / (run / "latest").read_text().strip()
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "extraction": None}))
    write_manifest(ckpt)
    video = trained["videos"] / "yt1.mp4"
    status, err = translate_here(capsys, video, "--checkpoint", run, "--segments", "fixed:1", "--out", tmp_path)
    assert status == 2 and "records no extraction" in err and "--extraction" in err, err
    status, _ = translate_here(capsys, video, "--checkpoint", run, "--segments", "fixed:1", "--out", tmp_path,
                               "--extraction", trained["data"] / "extraction.json")
    assert status == 0 and len(json.loads((tmp_path / "yt1.json").read_text())["segments"]) == 3


def test_recorded_encoder_settings_come_back():
    """The record gives back the encoders, colour order, dtype and resize that made the features."""
    from signllava.extraction_record import BGR, encoder_choice
    record = {"settings": {"modalities": ["mae", "dino"], "channel_order": BGR, "dtype": "bfloat16"},
              "models": {"mae": {"source": "m", "preprocessing": {"resize": "torch bilinear, antialiased to 224x224"}},
                         "dino_face": {"source": "f", "preprocessing": {"resize": "PIL bilinear to 224x224"}},
                         "dino_hand": {"source": "h"}, "sign2vec": {"source": "s", "layer": 3}}}
    c = encoder_choice(record, "cpu", 8, models={"dino_hand": "moved"})
    assert (c.mae, c.dino_face, c.dino_hand, c.sign2vec, c.sign2vec_layer) == ("m", "f", "moved", "s", 3)
    assert (c.channel_order, c.dtype, c.resize, c.batch_size) == ("bgr", "bfloat16", "torch", 8)
    record["models"]["mae"]["preprocessing"]["resize"] = "PIL bilinear to 224x224"
    assert encoder_choice(record, "cpu", 8, dtype="float32").resize == "pil"
