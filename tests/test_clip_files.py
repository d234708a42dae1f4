"""The clip sources' files as users have them: caption files with no usable caption, How2Sign's unquoted TSV,
a spreadsheet's BOM, videos with dots in their names, WebVTT's character references; and a run in which no
clip survives. Mostly signllava/clip_sources.py called directly; extract.py runs on a few tiny frames, pose only."""
from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest

from signllava.clip_sources import from_captions, from_segments, read_captions, video_files
from signllava.errors import DataError
from signllava.extract_store import ExtractionStore, plan_shards
from signllava.subtitles import srt_text, vtt_text
from signllava.video_io import write_video
from signllava.video_translate import SubtitleSegment, VideoTranslator
from tests.kit import run_script, script_env
from tests.video_kit import film_astronaut

CUE = "WEBVTT\n\n00:00:00.000 --> 00:00:00.500\n{}\n"


def videos(folder: Path, *stems: str, frames: int = 6) -> dict[str, Path]:
    """Tiny real videos (the astronaut, 10 fps); only their names matter to the caption matching."""
    for k, stem in enumerate(stems):
        write_video(folder / f"{stem}.mp4", film_astronaut(frames, seed=k % 4), fps=10)
    return video_files(folder)


def captions(folder: Path, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def extract(*args, check=True):
    return run_script("extract.py", *map(str, args), "--split", "train", "--modalities", "pose", "--workers", 0,
                      check=check, env=script_env(OMP_NUM_THREADS=1))


# -------------------------------------------------------------------- caption files without a clip; runs without one
def test_caption_file_without_a_usable_caption_is_one_fault_and_no_video(tmp_path):
    files = videos(tmp_path / "v", "good", "bare", "flat")
    caps = captions(tmp_path / "c", {"good.vtt": CUE.format("hello"), "bare.vtt": "WEBVTT\n",
                                     "flat.vtt": "WEBVTT\n\n00:00:01.000 --> 00:00:01.000\nno length\n"})
    clips, faults = from_captions(caps, files)
    assert sorted(clips) == ["good"] and [c.text for c in clips["good"]] == ["hello"]
    assert sorted(faults) == [f"{caps / 'bare.vtt'}, video 'bare': caption file has no usable caption (none with text)",
                              f"{caps / 'flat.vtt'}, video 'flat': caption file has no usable caption "
                              "(1 end at or before their start)"]


def test_extract_skips_the_video_without_captions_and_writes_the_rest(tmp_path):
    videos(tmp_path / "v", "a", "b")
    caps = captions(tmp_path / "c", {"a.vtt": CUE.format("hello a"), "b.vtt": "WEBVTT\n"})
    out = tmp_path / "D"
    res = extract("--videos", tmp_path / "v", "--captions", caps, "--out", out)
    summary = json.loads((out / "extraction_summary.train.json").read_text())
    assert (summary["clips_written"], summary["clips_skipped"]) == (1, 1)
    assert [s["reason"] for s in summary["skipped"]] == [
        f"{caps / 'b.vtt'}, video 'b': caption file has no usable caption (none with text)"]
    assert any("skipped:" in line and "b.vtt, video 'b'" in line for line in res.stderr.splitlines())
    assert json.loads((out / "pose" / "metadata_pose.train.json").read_text()) == {"a": 0}
    assert list(json.loads((out / "annotation.train.json").read_text())) == ["a"]
    assert not (out / ".extract").exists()
    assert run_script("data.py", "--data_dir", out).returncode == 0


def test_extract_with_no_clip_written_is_an_error_and_leaves_nothing(tmp_path):
    videos(tmp_path / "v", "a")
    caps = captions(tmp_path / "c", {"a.vtt": "WEBVTT\n\n00:00:10.000 --> 00:00:11.000\npast the end\n"})
    out = tmp_path / "D"
    res = extract("--videos", tmp_path / "v", "--captions", caps, "--out", out, check=False)
    last = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert last.startswith(f"error: {out}: no clip of split 'train' could be extracted, all 1 skipped (the first: ")
    assert "a.mp4, video 'a', clip 'a_0'" in last and last.endswith("nothing written")
    assert sorted(p.name for p in out.iterdir()) == ["extraction.json"]     # no shard, metadata or work folder


def test_no_clip_written_is_judged_over_every_ranks_videos(tmp_path):
    """Two ranks: the rank that finishes last writes the split, over all ranks' videos. One rank whose clips
    all failed is not an error while the other's were written; every rank's failing is."""
    import extract as ex
    clips = {"v0": ["v0_0"], "v1": ["v1_0"]}
    args = Namespace(out=tmp_path, split="train", annotation=None)
    for written in ({"v1"}, set()):
        store = ExtractionStore(tmp_path, "train", ["pose"], plan_shards(clips, 1))    # shard k: rank k % 2
        store.start(resume=False)
        for video in clips:
            ok = video in written
            features = {f"{video}_0": {"pose": np.zeros((2, 208), np.float16)}} if ok else {}
            failed = [] if ok else [{"clip": f"{video}_0", "reason": f"{video}: bad"}]
            store.write_video(video, features, {"clip_order": [f"{video}_0"] if ok else [], "frames": 2 * ok,
                                                "failed": failed, "seconds": {}, "feature_frames": {}})
        for shard in store.shards:
            store.assemble_shard(shard)
        summary = ex.summarise(args, store, [], clips, 2, 0.0)
        if written:
            ex.finish_split(args, store, summary, {"v1": {"clip_order": ["v1_0"], "v1_0": {}}})
            assert json.loads(store.metadata("pose").read_text()) == {"v1": 1}
            store.metadata("pose").unlink()
            store.summary_file().unlink()
        else:
            with pytest.raises(DataError, match=r"all 2 skipped \(the first: v0: bad\); nothing written"):
                ex.finish_split(args, store, summary, {})
            assert not store.shard_file("pose", 0).exists() and not store.work.exists()


# ---------------------------------------------------------------------------------------------------- segment tables
HEADER = "VIDEO_NAME\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE\n"


def test_tab_separated_segments_are_not_quoted(tmp_path):
    tsv = tmp_path / "seg.tsv"
    tsv.write_text(HEADER + 'v\tv_0\t0.0\t1.0\t"Unclosed quote starts here\n'
                   "v\tv_1\t1.0\t2.0\tnext row\n" 'v\tv_2\t2.0\t2.9\t"Hi," she said.\n')
    clips, faults = from_segments(tsv, {"v": tmp_path / "v.mp4"})
    assert faults == [] and [(c.clip, c.text) for c in clips["v"]] == [
        ("v_0", '"Unclosed quote starts here'), ("v_1", "next row"), ("v_2", '"Hi," she said.')]
    # Comma-separated tables keep CSV's quoting: a sentence with a comma is quoted there.
    csv = tmp_path / "seg.csv"
    csv.write_text('VIDEO_NAME,SENTENCE_NAME,START,END,SENTENCE\n'
                   'v,v_0,0,1,"Hi, there"\nv,v_1,1,2,"""Hi,"" she said."\n')
    clips, _ = from_segments(csv, {"v": tmp_path / "v.mp4"})
    assert [c.text for c in clips["v"]] == ["Hi, there", '"Hi," she said.']


def test_segments_with_a_byte_order_mark(tmp_path):
    for name, sep in (("bom.csv", ","), ("bom.tsv", "\t")):
        table = tmp_path / name
        table.write_text(HEADER.replace("\t", sep) + sep.join(["v", "v_0", "0.0", "1.0", "hello"]) + "\n",
                         encoding="utf-8-sig")
        clips, faults = from_segments(table, {"v": tmp_path / "v.mp4"})
        assert faults == [] and [(c.video, c.clip, c.text) for c in clips["v"]] == [("v", "v_0", "hello")]


# ----------------------------------------------------------------------------------- videos with dots in their names
def test_caption_files_of_videos_with_dots_in_their_names(tmp_path):
    files = videos(tmp_path / "v", "talk.2024.01", "talk.2024.02", "plain", "deaf.club", "talk.2024")
    caps = captions(tmp_path / "c", {"talk.2024.01.vtt": CUE.format("one"), "talk.2024.02.en.vtt": CUE.format("two"),
                                     "plain.en-US.srt": "1\n00:00:00,000 --> 00:00:00,500\nthree\n",
                                     "deaf.club.ase.vtt": CUE.format("four"), "other.2024.vtt": CUE.format("none")})
    clips, faults = from_captions(caps, files)
    assert {v: [c.text for c in cs] for v, cs in clips.items()} == {
        "talk.2024.01": ["one"], "talk.2024.02": ["two"], "plain": ["three"], "deaf.club": ["four"]}
    assert clips["talk.2024.02"][0].clip == "talk.2024.02_0"
    assert faults == [f"{caps / 'other.2024.vtt'}, video 'other.2024': caption file has no video in --videos"]


def test_two_caption_files_for_one_video_are_refused_naming_both(tmp_path):
    files = videos(tmp_path / "v", "talk")
    caps = captions(tmp_path / "c", {"talk.vtt": CUE.format("a"), "talk.en.vtt": CUE.format("b")})
    with pytest.raises(DataError, match=r"talk.vtt: a second caption file for video 'talk' \(also talk.en.vtt\)"):
        from_captions(caps, files)


def test_translate_finds_its_own_caption_file_and_reports_its_own_fault(tmp_path):
    files = videos(tmp_path / "v", "talk.2024.01", "bare", "nothing")
    caps = captions(tmp_path / "c", {"plain.vtt": CUE.format("no such video"), "junk.vtt": "not a caption file\n",
                                     "talk.2024.01.en.vtt": CUE.format("hello"), "bare.vtt": "WEBVTT\n"})
    assert VideoTranslator._caption_cues(files["talk.2024.01"], caps) == [(0.0, 0.5, "hello")]
    with pytest.raises(DataError) as err:
        VideoTranslator._caption_cues(files["nothing"], caps)
    assert str(err.value) == (f"{files['nothing']}: no caption file for it in {caps} "
                              "(--captions: nothing.vtt, nothing.<language>.vtt or nothing.srt)")
    with pytest.raises(DataError) as err:
        VideoTranslator._caption_cues(files["bare"], caps)
    assert str(err.value) == (f"{caps / 'bare.vtt'}, video 'bare': caption file has no usable caption (none with "
                              "text); nothing to translate (--segments captions)")
    with pytest.raises(DataError, match=r"bare.vtt, video 'bare': caption file has no usable caption"):
        VideoTranslator._caption_cues(files["bare"], caps / "bare.vtt")       # a file given, not a folder


def test_translate_names_both_videos_of_one_name(tmp_path):
    from translate import video_paths
    a, b = videos(tmp_path / "a", "talk")["talk"], videos(tmp_path / "b", "talk")["talk"]
    with pytest.raises(DataError) as err:
        video_paths([a, b])
    assert str(err.value) == (f"{a} and {b}: two videos named 'talk'; their subtitles would overwrite each other; "
                              "translate them apart")


# ------------------------------------------------------------------------------------- WebVTT's character references
def test_webvtt_character_references_are_decoded_once(tmp_path):
    caps = captions(tmp_path, {"e.vtt": "WEBVTT\n\n00:00.000 --> 00:01.000\n<i>Tom</i> &amp; Jerry &lt;3 &amp;lt;\n",
                               "e.srt": "1\n00:00:00,000 --> 00:00:01,000\n<i>Tom</i> &amp; Jerry\n"})
    assert read_captions(caps / "e.vtt") == [(0.0, 1.0, "Tom & Jerry <3 &lt;")]
    assert read_captions(caps / "e.srt") == [(0.0, 1.0, "Tom &amp; Jerry")]      # SRT is plain text


# SRT has no escape at all, so a tag-shaped `<b>` in it is a tag to players and to webvtt-py alike: VTT only.
@pytest.mark.parametrize("fmt,extra", [("vtt", ["a<b>c &lt; d"]), ("srt", [])])
def test_translate_subtitles_read_back_as_written(tmp_path, fmt, extra):
    texts = ["Tom & Jerry <3", "&amp; 'quoted' \"too\"", "x > y & y < z", *extra]
    segments = [SubtitleSegment(i, i + 0.5, t, []) for i, t in enumerate(texts)]
    path = tmp_path / f"out.{fmt}"
    path.write_text((vtt_text if fmt == "vtt" else srt_text)(segments), encoding="utf-8")
    assert [t for _, _, t in read_captions(path)] == texts
