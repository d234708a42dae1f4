"""extract.py end to end on videos of a real person (skimage's astronaut) through the real MediaPipe and tiny
random encoders of the real architectures: both dataset shapes, the checker, stage 1 and generation on the
output, two ranks and a killed-and-resumed run against one uninterrupted run, and every bad input."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from signllava import landmarks, pose_features
from signllava.clip_sources import from_captions, from_segments, video_files
from signllava.errors import DataError
from signllava.video_io import read_clip, write_video
from tests.kit import REPO, run_script, script_env, train_args
from tests.video_kit import film_astronaut, how2sign_clips, tiny_encoders, youtube_asl

MODALITIES = ("pose", "sign2vec", "dino", "mae")


def features(root: Path, split: str = "train", modalities=MODALITIES) -> dict:
    """Every array the dataset holds, by (modality, video, clip), read through the metadata as data.py does."""
    out = {}
    for m in modalities:
        meta = json.loads((root / m / f"metadata_{m}.{split}.json").read_text())
        for video, shard in meta.items():
            with h5py.File(root / m / f"{m}.{split}.{shard}.h5", "r") as h:
                for clip, ds in h[video].items():
                    out[(m, video, clip)] = ds[()]
    return out


def extract(*args, check=True, ranks=1):
    return run_script("extract.py", *args, "--workers", 1, launcher=ranks > 1, ranks=ranks, check=check,
                      env=script_env(OMP_NUM_THREADS=1))


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    root = tmp_path_factory.mktemp("extract")
    vids, caps = youtube_asl(root / "yt", videos=3)
    return {"root": root, "videos": vids, "captions": caps, "encoders": tiny_encoders(root / "enc")}


@pytest.fixture(scope="module")
def youtube(kit):
    out = kit["root"] / "D"
    res = extract("--videos", kit["videos"], "--captions", kit["captions"], "--out", out, "--split", "train",
                  "--videos_per_shard", 2, *kit["encoders"])
    return out, res


# ------------------------------------------------------------------------------------------ sources, decoding
def test_segments_csv_how2sign_columns(tmp_path):
    files = {"v1": tmp_path / "v1.mp4", "v2": tmp_path / "v2.mp4"}
    csv = tmp_path / "seg.csv"
    csv.write_text("VIDEO_ID\tVIDEO_NAME\tSENTENCE_ID\tSENTENCE_NAME\tSTART_REALIGNED\tEND_REALIGNED\tSENTENCE\n"
                   "x\tv1\t1\tv1_10\t5.0\t6.5\tLater one.\n"
                   "x\tv1\t2\tv1_2\t1.0\t2.0\tEarlier one.\n"
                   "x\tv3\t3\tv3_0\t1.0\t2.0\tNo file.\n"
                   "x\tv2\t4\tv2_0\t3.0\t2.0\tBackwards.\n")
    clips, faults = from_segments(csv, files)
    assert [c.clip for c in clips["v1"]] == ["v1_2", "v1_10"]               # time order, not file order
    assert (clips["v1"][0].start, clips["v1"][0].end, clips["v1"][0].text) == (1.0, 2.0, "Earlier one.")
    assert len(faults) == 2 and "v3" in faults[0] and "no video file" in faults[0]
    assert "v2_0" in faults[1] and "not after its start" in faults[1]
    csv.write_text("VIDEO_NAME,SENTENCE_NAME,START,END\nv1,a,1,2\n")
    with pytest.raises(DataError, match=r"seg.csv: no SENTENCE column"):
        from_segments(csv, files)
    csv.write_text("VIDEO_NAME,SENTENCE_NAME,START,END,SENTENCE\nv1,a,one,2,hi\n")
    with pytest.raises(DataError, match=r"seg.csv:2: start time 'one' is not a number"):
        from_segments(csv, files)


def test_captions_vtt_and_srt(kit, tmp_path):
    clips, faults = from_captions(kit["captions"], video_files(kit["videos"]))
    assert faults == [] and sorted(clips) == ["yt0", "yt1", "yt2"]
    starts = [c.start for c in clips["yt1"]]                     # the .srt one, listed backwards in its file
    assert starts == sorted(starts) and [c.clip for c in clips["yt1"]] == ["yt1_0", "yt1_1"]
    bad = tmp_path / "caps"
    bad.mkdir()
    (bad / "yt0.vtt").write_text("not a caption file\n")
    with pytest.raises(DataError, match=r"yt0.vtt: malformed caption file"):
        from_captions(bad, video_files(kit["videos"]))


def test_read_clip_ranges_and_faults(tmp_path):
    frames = np.zeros((20, 48, 64, 3), np.uint8)
    frames[:, :, :, 0] = (np.arange(20) * 12)[:, None, None]
    path = write_video(tmp_path / "ramp.mp4", frames, fps=10)
    clip = read_clip(path, 0.5, 1.0, "ramp", 60)
    assert len(clip.frames) == 5 and np.allclose(clip.times, [0.5, 0.6, 0.7, 0.8, 0.9])
    assert abs(int(clip.frames[0, 0, 0, 0]) - 60) <= 3                # frame 5, not a frame near the keyframe
    assert len(read_clip(path, None, None, "ramp", 60).frames) == 20
    with pytest.raises(DataError, match=r"ramp: clip ends at 3.000 s, past the video's last frame at 1.900 s"):
        read_clip(path, 1.0, 3.0, "ramp", 60)
    with pytest.raises(DataError, match=r"ramp: zero frames between 0.51 s and 0.52 s"):
        read_clip(path, 0.51, 0.52, "ramp", 60)
    with pytest.raises(DataError, match=r"ramp: clip longer than 1 s \(--max_clip_seconds\); refused, not cut"):
        read_clip(path, None, None, "ramp", 1)


# ------------------------------------------------------------------------------------------ end to end
def test_youtube_asl_dataset_passes_the_checker_and_trains(youtube, kit, tmp_path):
    out, res = youtube
    summary = json.loads((out / "extraction_summary.train.json").read_text())
    assert summary["clips_written"] == 6 and summary["clips_skipped"] == 0
    assert set(summary["seconds_per_stage"]) >= {"decode", "landmarks", "crops", "mae", "dino", "sign2vec"}
    ann = json.loads((out / "annotation.train.json").read_text())
    assert ann["yt0"]["clip_order"] == ["yt0_0", "yt0_1"]
    assert ann["yt0"]["yt0_0"] == {"translation": "the cat sees a dog", "paraphrases": [], "keywords": []}
    feats = features(out)
    assert {k[0] for k in feats} == set(MODALITIES) and len(feats) == 24
    assert all(a.dtype == np.float16 for a in feats.values())
    assert feats[("pose", "yt0", "yt0_0")].shape == (6, 208) and feats[("dino", "yt0", "yt0_0")].shape == (6, 192)
    record = json.loads((out / "extraction.json").read_text())
    assert record["settings"]["channel_order"] == "RGB" and set(record["models"]) == {
        "mae", "dino_face", "dino_hand", "sign2vec"}
    # The pose stream is the 208 numbers of the kept .pose landmarks (recomputable without MediaPipe).
    lm = landmarks.load_pose(out / "landmarks" / "train" / "yt0" / "yt0_0.pose")
    box = pose_features.signing_space(lm)
    want = pose_features.pose_features(pose_features.landmarks_in_crop(lm, box)).astype(np.float16)
    assert np.array_equal(feats[("pose", "yt0", "yt0_0")], want)
    assert run_script("data.py", "--data_dir", out).returncode == 0

    model = tmp_path / "llm"
    from tests.kit import build_tiny_llm
    build_tiny_llm(model, out)
    run = tmp_path / "run"
    run_script("pretrain.py", *train_args(out, model, run, 3, "--modalities", "pose,sign2vec,dino,mae"))
    gen = run_script("generate.py", "--checkpoint", run, "--data_dir", out, "--split", "train",
                     "--output", tmp_path / "hyp.json", "--num_beams", 1, "--max_new_tokens", 4, "--num_workers", 0)
    assert json.loads((tmp_path / "hyp.json").read_text()), gen.stdout


def test_how2sign_clip_folder(kit, tmp_path):
    clips, ann = how2sign_clips(tmp_path / "h2s", videos=2, clips=2, frames=5)
    out = tmp_path / "D"
    extract("--videos", clips, "--annotation", ann, "--out", out, "--split", "dev", "--modalities", "pose,mae",
            "--mae", kit["encoders"][1])
    assert json.loads((out / "annotation.dev.json").read_text()) == json.loads(ann.read_text())
    feats = features(out, "dev", ("pose", "mae"))
    assert sorted(k[2] for k in feats if k[0] == "mae") == ["vid0_0", "vid0_1", "vid1_0", "vid1_1"]
    assert run_script("data.py", "--data_dir", out, "--split", "dev").returncode == 0
    # A second split into the same dataset must be made the same way.
    res = extract("--videos", clips, "--annotation", ann, "--out", out, "--split", "test", "--modalities",
                  "pose,mae", "--mae", kit["encoders"][1], "--released_channel_order", check=False)
    assert res.returncode == 2 and "extraction.json: this dataset was extracted with other settings" in res.stderr
    assert "settings.channel_order" in res.stderr and "Traceback" not in res.stderr


def test_two_ranks_write_the_same_features(youtube, kit):
    out = kit["root"] / "D2"
    extract("--videos", kit["videos"], "--captions", kit["captions"], "--out", out, "--split", "train",
            "--videos_per_shard", 2, *kit["encoders"], ranks=2)
    one, two = features(youtube[0]), features(out)
    assert one.keys() == two.keys()
    assert all(np.array_equal(one[k], two[k]) for k in one)
    for m in MODALITIES:
        assert (out / m / f"metadata_{m}.train.json").read_text() == (youtube[0] / m / f"metadata_{m}.train.json").read_text()
    assert not (out / ".extract").exists()


def test_killed_run_resumes_to_the_same_features(youtube, kit):
    out = kit["root"] / "D3"
    cmd = [sys.executable, str(REPO / "extract.py"), "--videos", kit["videos"], "--captions", kit["captions"],
           "--out", out, "--split", "train", "--videos_per_shard", 2, "--workers", 0, *kit["encoders"]]
    proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=script_env(OMP_NUM_THREADS=1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / ".extract" / "train" / "v0.json"
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first.exists(), "the run ended before its first video was written"
    # Nothing of the killed run looks like a dataset.
    assert not any((out / m / f"metadata_{m}.train.json").exists() for m in MODALITIES)
    again = extract("--videos", kit["videos"], "--captions", kit["captions"], "--out", out, "--split", "train",
                    "--videos_per_shard", 2, *kit["encoders"], check=False)
    assert again.returncode == 2 and "--resume to continue it" in again.stderr
    extract("--videos", kit["videos"], "--captions", kit["captions"], "--out", out, "--split", "train",
            "--videos_per_shard", 2, "--resume", *kit["encoders"])
    one, resumed = features(youtube[0]), features(out)
    assert one.keys() == resumed.keys() and all(np.array_equal(one[k], resumed[k]) for k in one)
    done = extract("--videos", kit["videos"], "--captions", kit["captions"], "--out", out, "--split", "train",
                   "--resume", *kit["encoders"])
    assert "nothing to resume" in done.stderr


# ------------------------------------------------------------------------------------------ bad input
def test_every_bad_input_is_one_line_and_counted(kit, tmp_path):
    vids, caps = tmp_path / "videos", tmp_path / "captions"
    caps.mkdir()
    write_video(vids / "good.mp4", film_astronaut(12), fps=10)
    write_video(vids / "empty.mp4", np.full((12, 240, 320, 3), 90, np.uint8), fps=10)      # nobody in frame
    (vids / "junk.mp4").write_bytes(b"\0not a video" * 50)
    data = write_video(tmp_path / "full.mp4", film_astronaut(30), fps=10).read_bytes()
    (vids / "cut.mp4").write_bytes(data[:len(data) // 2])
    vtt = "WEBVTT\n\n00:00:00.100 --> 00:00:00.600\n{}\n"
    (caps / "good.vtt").write_text(vtt.format("fine") + "\n00:00:00.600 --> 00:00:05.000\nruns past the end\n")
    (caps / "empty.vtt").write_text(vtt.format("nobody"))
    (caps / "junk.vtt").write_text(vtt.format("unreadable"))
    (caps / "cut.vtt").write_text("WEBVTT\n\n00:00:02.000 --> 00:00:02.800\ntruncated file\n")
    (caps / "ghost.vtt").write_text(vtt.format("no such video"))
    out = tmp_path / "D"
    res = extract("--videos", vids, "--captions", caps, "--out", out, "--split", "train", "--modalities", "pose")
    summary = json.loads((out / "extraction_summary.train.json").read_text())
    reasons = sorted(s["reason"] for s in summary["skipped"])
    assert summary["clips_written"] == 1 and summary["clips_skipped"] == 5, reasons
    expect = ["ghost.vtt, video 'ghost': caption file has no video in --videos",
              "good.mp4, video 'good', clip 'good_1': clip ends at 5.000 s, past the video's last frame",
              "empty.mp4, video 'empty', clip 'empty_0': no person found",
              "junk.mp4, video 'junk', clip 'junk_0': unreadable video",
              "cut.mp4, video 'cut', clip 'cut_0': "]
    for want in expect:
        assert any(want in r for r in reasons), (want, reasons)
        assert any(want in line for line in res.stderr.splitlines() if "skipped:" in line), want
    assert all("\n" not in r for r in reasons)
    # Only the clip that worked is in the dataset, and the checker passes it.
    assert json.loads((out / "annotation.train.json").read_text())["good"]["clip_order"] == ["good_0"]
    assert run_script("data.py", "--data_dir", out).returncode == 0
    stop = extract("--videos", vids, "--captions", caps, "--out", tmp_path / "D2", "--split", "train",
                   "--modalities", "pose", "--on_error", "stop", check=False)
    assert stop.returncode == 2 and "Traceback" not in stop.stderr
    assert stop.stderr.strip().splitlines()[-1].startswith("error: ") and "(--on_error stop" in stop.stderr


def test_flag_errors_before_any_work(kit, tmp_path):
    res = extract("--videos", kit["videos"], "--captions", kit["captions"], "--out", tmp_path / "D", "--split",
                  "train", "--modalities", "pose,mae,hands", check=False)
    assert res.returncode == 2 and "unknown hands" in res.stderr and "needs --mae" in res.stderr
    res = extract("--videos", tmp_path / "nowhere", "--captions", kit["captions"], "--out", tmp_path / "D",
                  "--split", "train", "--modalities", "pose", check=False)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'nowhere'}: no such folder or list file (--videos)")
    res = extract("--videos", kit["videos"], "--captions", kit["captions"], "--out", tmp_path / "D", "--split",
                  "train", "--modalities", "mae", "--mae", tmp_path / "missing_model", check=False)
    assert res.returncode == 2 and "missing_model" in res.stderr.strip().splitlines()[-1]
    assert "Traceback" not in res.stderr
