"""The browser demo (signllava/app.py) checked as a person uses it: the app runs as its own process on a real
checkpoint (extract.py on films of the astronaut photo -> pretrain.py with the tiny LLM and a context window),
headless Chromium opens the page, uploads a held-out video and clicks Translate; what the page then shows -- the
table of segments, the subtitle track of the <video> and the cues the browser parsed from it, the timings --
must be what VideoTranslator.translate_video gives for the same file in this process. A bad upload must be a
message on the page, and the page must load nothing from anywhere but the app (tests/app_kit.py drives it).

SIGNLLAVA_APP_SCREENSHOT=docs/app.png also writes the page's screenshot there (with this test's barely trained
model the subtitles are not sentences: `python -m tests.app_kit` makes one from a trained checkpoint).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from tests.app_kit import (app_server, chrome, missing_browser, resource_hosts, save_screenshot, subtitle_track,
                           table_rows, translate_in_page, wait_for)
from tests.kit import REPO
from tests.video_kit import film_astronaut, trained_video_run

SEGMENTS = "fixed:0.6"        # a 1.2 s video -> two segments, so the second one has context
GENERATION = {"num_beams": 2, "max_new_tokens": 8}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """Stage 1 with a context window on two extracted films (the run test_translate.py translates too)."""
    return trained_video_run(tmp_path_factory)["run"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    from signllava.video_io import write_video
    root = tmp_path_factory.mktemp("uploads")
    not_a_video = root / "notes.mp4"
    not_a_video.write_text("these are not video frames\n")
    return {"signer": write_video(root / "signer.mp4", film_astronaut(12, seed=3), fps=10),
            "empty_room": write_video(root / "empty_room.mp4", np.full((8, 240, 320, 3), 90, np.uint8), fps=10),
            "not_a_video": not_a_video}


@pytest.fixture(scope="module")
def translator(checkpoint):
    from signllava.video_translate import VideoTranslator
    return VideoTranslator(checkpoint, segments=SEGMENTS, **GENERATION)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    if missing_browser():
        pytest.skip(f"{missing_browser()}; the demo's browser test is skipped")
    flags = ["--segments", SEGMENTS] + [x for k, v in GENERATION.items() for x in (f"--{k}", v)]
    with app_server(checkpoint, tmp_path_factory.mktemp("server"), *flags) as url:
        yield url


@pytest.fixture(scope="module")
def browser(server):
    with chrome() as page:
        yield page


def test_page_shows_the_translation_of_an_upload(server, browser, translator, videos, tmp_path):
    from signllava.subtitles import cue_text, vtt_text
    want = translator.translate_video(videos["signer"])
    assert len(want.segments) == 2 and want.skipped == [] and want.segments[1].context, want.to_json()

    status = translate_in_page(browser, server, videos["signer"])
    assert status.startswith(f"2 segments from {want.duration:.1f} s of video") and "real-time factor" in status

    # innerText collapses runs of white space: the barely trained model's words may hold any.
    shown = lambda text: " ".join(text.split())  # noqa: E731
    rows = wait_for(browser, lambda p: table_rows(p, "segments"))
    assert [r[2:] for r in rows] == [[shown(s.text), shown(" | ".join(s.context))] for s in want.segments]
    assert np.allclose([[float(r[0]), float(r[1])] for r in rows], [[s.start, s.end] for s in want.segments],
                       atol=0.005)
    timings = wait_for(browser, lambda p: table_rows(p, "timings"))
    assert [r[0] for r in timings] == list(want.seconds) + [f"features: {k}" for k in want.stage_seconds]

    track = wait_for(browser, subtitle_track)
    assert track["kind"] == "captions" and track["text"] == vtt_text(want.segments)
    assert [c[2] for c in track["cues"]] == [cue_text(s.text) for s in want.segments]
    assert np.allclose([c[:2] for c in track["cues"]], [[s.start, s.end] for s in want.segments], atol=0.001)

    # Nothing but the app itself: no analytics, no fonts or scripts from elsewhere.
    assert resource_hosts(browser) == {urlsplit(server).netloc}

    shot = tmp_path / "app.png"
    save_screenshot(browser, shot, (want.segments[0].start + want.segments[0].end) / 2)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("SIGNLLAVA_APP_SCREENSHOT"):
        shutil.copyfile(shot, REPO / os.environ["SIGNLLAVA_APP_SCREENSHOT"])


def test_a_file_that_is_not_a_video_is_a_message_on_the_page(server, browser, videos):
    status = translate_in_page(browser, server, videos["not_a_video"])
    assert status.startswith("Could not translate notes.mp4: ") and "Traceback" not in status, status
    assert "/notes.mp4" not in status, "the server's upload folder is not the visitor's business"
    assert table_rows(browser, "segments") == [] and subtitle_track(browser) is None


def test_each_refusal_is_one_line_for_the_page(translator, videos, tmp_path):
    from signllava.app import Demo
    demo = Demo(translator, SEGMENTS)
    signer, empty = str(videos["signer"]), str(videos["empty_room"])
    bad_captions = tmp_path / "uploads" / "mine.vtt"
    bad_captions.parent.mkdir()
    bad_captions.write_text("this is not WebVTT\n")
    cases = {"no video": (None, "fixed", 0.6, None), "no window": (signer, "fixed", 0, None),
             "no captions": (signer, "captions", 0.6, None), "no person": (empty, "fixed", 0.6, None),
             "no signing": (empty, "auto", 0.6, None), "bad captions": (signer, "captions", 0.6, str(bad_captions))}
    messages = {}
    for case, request in cases.items():
        video, rows, status, timings, files = demo.translate(*request)
        assert rows == [], case
        assert "\n" not in status and "Traceback" not in status and str(Path(empty).parent) not in status, status
        assert str(bad_captions.parent) not in status, status           # the upload folder stays the server's
        messages[case] = status
    assert messages["no video"] == "**Upload a video or record one with the webcam first.**"
    assert "window length in seconds > 0" in messages["no window"]
    assert "need a caption file" in messages["no captions"]
    assert "mine.vtt" in messages["bad captions"], messages["bad captions"]
    assert messages["no person"].startswith("**Nothing in empty_room.mp4 could be translated:** ")
    assert "no person found" in messages["no person"]
    assert messages["no signing"].startswith("**No signing found in empty_room.mp4** (auto segments)")


def test_bad_checkpoint_and_flags_are_one_line(tmp_path, capsys):
    from signllava.app import main
    assert main(["--checkpoint", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing" in err and len(err.strip().splitlines()) == 1, err
    with pytest.raises(SystemExit) as stop:
        main(["--checkpoint", str(tmp_path), "--segments", "fixed:-1"], prog="python -m signllava.app")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "python -m signllava.app: error: argument --segments: " in err
    assert "'fixed:-1'" in err and "Traceback" not in err
