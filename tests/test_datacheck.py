"""Tests of the data checker (datacheck.py, run as `python data.py --data_dir D`).

Each fault test builds a tiny valid dataset, breaks exactly one thing and checks that exactly one
FAULT line names the right file, video and clip. Most run `check_dataset` in-process; the exit status
and the absence of a traceback are checked through the real CLI in a subprocess, once on a valid
dataset and once on a dataset holding every fault at the same time (which also shows that the checker
keeps going after a fault).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent.parent     # the repository root: data.py runs from there

from signllava.datacheck import check_dataset  # noqa: E402

SHARDS = {"train": 2, "dev": 2, "test": 1}
DIMS = {"mae": 8, "pose": 6, "dino": 4}
N_VIDEOS = {"train": 3, "dev": 2, "test": 2}
N_CLIPS = {"train": 8, "dev": 5, "test": 5}      # 2 + 3 + 3, 2 + 3, 2 + 3


def videos(split):
    return [f"v{split}{i}" for i in range(N_VIDEOS[split])]


def clips(video):
    i = int(video[-1])
    return [f"{video}_c{k}" for k in range(2 + (i > 0))]


def shard_of(split, video):
    return int(video[-1]) % SHARDS[split]


def write_json(path, obj):
    path.write_text(json.dumps(obj, indent=1), encoding="utf-8")


def make_tiny(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for m in DIMS:
        (root / m).mkdir(parents=True)
    for split in SHARDS:
        ann = {}
        for v in videos(split):
            ann[v] = {"clip_order": clips(v)}
            for c in clips(v):
                ann[v][c] = {"translation": f"words of {c}", "paraphrases": ["<none>"], "keywords": ["words"]}
        write_json(root / f"annotation.{split}.json", ann)
        for m, d in DIMS.items():
            meta = {v: shard_of(split, v) for v in videos(split)}
            write_json(root / m / f"metadata_{m}.{split}.json", meta)
            for s in range(SHARDS[split]):
                with h5py.File(root / m / f"{m}.{split}.{s}.h5", "w") as h:
                    for v in videos(split):
                        if shard_of(split, v) != s:
                            continue
                        g = h.create_group(v)
                        for k, c in enumerate(clips(v)):
                            g.create_dataset(c, data=rng.standard_normal((3 + k, d)).astype(np.float16))
    return root


def h5_file(root, m, split, video):
    return root / m / f"{m}.{split}.{shard_of(split, video)}.h5"


def put_clip(root, m, split, video, clip, arr):
    with h5py.File(h5_file(root, m, split, video), "a") as h:
        g = h[video]
        if clip in g:
            del g[clip]
        if arr is not None:
            g.create_dataset(clip, data=arr)


def edit_json(path, fn):
    obj = json.loads(path.read_text())
    fn(obj)
    write_json(path, obj)


def run_check(root, capsys, splits=None, modalities=None):
    rc = check_dataset(root, splits, modalities)
    out, err = capsys.readouterr()
    return rc, out, err


def fault_lines(out):
    return [ln for ln in out.splitlines() if ln.startswith("FAULT: ")]


# ------------------------------------------------------------------------------------------ breakers
# Each breaks one thing and returns what its single FAULT line must name: (file name, video, clip).
# The targets are disjoint, so ALL can be applied to one dataset at once (test_cli_every_fault).
def bad_annotation_json(root):
    (root / "annotation.test.json").write_text('{"vtest0": {"clip_order": [', encoding="utf-8")
    return "annotation.test.json", None, None


def annotation_without_clip_order(root):
    edit_json(root / "annotation.dev.json", lambda a: a.__setitem__("vdev1", {"clips": []}))
    return "annotation.dev.json", "vdev1", None


def bad_metadata_json(root):
    (root / "pose" / "metadata_pose.dev.json").write_text("{vdev0: 0}", encoding="utf-8")
    return "metadata_pose.dev.json", None, None


def bad_metadata_entry(root):
    edit_json(root / "pose" / "metadata_pose.train.json", lambda m: m.__setitem__("vtrain1", [1]))
    return "metadata_pose.train.json", "vtrain1", None


def shard_missing(root):
    (root / "mae" / "mae.dev.1.h5").unlink()
    return "mae.dev.1.h5", "vdev1", None


def shard_truncated(root):
    p = root / "dino" / "dino.train.0.h5"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return "dino.train.0.h5", None, None


def video_in_wrong_shard(root):
    edit_json(root / "mae" / "metadata_mae.train.json", lambda m: m.__setitem__("vtrain1", 0))
    return "mae.train.0.h5", "vtrain1", None


def clip_order_without_annotation(root):
    edit_json(root / "annotation.train.json", lambda a: a["vtrain0"]["clip_order"].append("vtrain0_ghost"))
    return "annotation.train.json", "vtrain0", "vtrain0_ghost"


def empty_translation(root):
    edit_json(root / "annotation.train.json", lambda a: a["vtrain2"]["vtrain2_c1"].__setitem__("translation", "  "))
    return "annotation.train.json", "vtrain2", "vtrain2_c1"


def nan_in_clip(root):
    arr = np.ones((5, 6), np.float16)
    arr[3, 2] = np.nan
    put_clip(root, "pose", "train", "vtrain0", "vtrain0_c1", arr)
    return "pose.train.0.h5", "vtrain0", "vtrain0_c1"


def zero_frames(root):
    put_clip(root, "mae", "train", "vtrain2", "vtrain2_c0", np.zeros((0, 8), np.float16))
    return "mae.train.0.h5", "vtrain2", "vtrain2_c0"


def wrong_rank(root):
    put_clip(root, "dino", "dev", "vdev0", "vdev0_c1", np.zeros((5,), np.float16))
    return "dino.dev.0.h5", "vdev0", "vdev0_c1"


def wrong_dim(root):
    put_clip(root, "pose", "test", "vtest0", "vtest0_c0", np.zeros((4, 7), np.float16))
    return "pose.test.0.h5", "vtest0", "vtest0_c0"


BREAKERS = [bad_annotation_json, annotation_without_clip_order, bad_metadata_json, bad_metadata_entry,
            shard_missing, shard_truncated, video_in_wrong_shard, clip_order_without_annotation,
            empty_translation, nan_in_clip, zero_frames, wrong_rank, wrong_dim]


# Variants that would collide with the targets above; in-process only.
def bad_annotation_structure(root):
    write_json(root / "annotation.dev.json", ["vdev0", "vdev1"])
    return "annotation.dev.json", None, None


def bad_metadata_structure(root):
    write_json(root / "dino" / "metadata_dino.test.json", [0, 0])
    return "metadata_dino.test.json", None, None


def garbage_shard(root):
    (root / "pose" / "pose.dev.0.h5").write_bytes(b"this is not an hdf5 file\n" * 40)
    return "pose.dev.0.h5", None, None


def empty_shard_file(root):
    (root / "mae" / "mae.test.0.h5").write_bytes(b"")
    return "mae.test.0.h5", None, None


def inf_in_clip(root):
    arr = np.ones((4, 4), np.float16)
    arr[0, 0] = -np.inf
    put_clip(root, "dino", "test", "vtest1", "vtest1_c2", arr)
    return "dino.test.0.h5", "vtest1", "vtest1_c2"


def wrong_rank_3d(root):
    put_clip(root, "mae", "dev", "vdev1", "vdev1_c0", np.zeros((3, 8, 1), np.float16))
    return "mae.dev.1.h5", "vdev1", "vdev1_c0"


def integer_dtype(root):
    put_clip(root, "pose", "dev", "vdev1", "vdev1_c2", np.zeros((3, 6), np.int32))
    return "pose.dev.1.h5", "vdev1", "vdev1_c2"


def dim_differs_between_splits(root):
    for v in videos("dev"):
        for c in clips(v):
            put_clip(root, "mae", "dev", v, c, np.zeros((3, 9), np.float16))
    return "metadata_mae.dev.json", None, None


VARIANTS = [bad_annotation_structure, bad_metadata_structure, garbage_shard, empty_shard_file, inf_in_clip,
            wrong_rank_3d, integer_dtype, dim_differs_between_splits]


def assert_names(line, expected):
    name, video, clip = expected
    assert name in line, line
    if video is not None:
        assert f"video {video!r}" in line, line
    if clip is not None:
        assert f"clip {clip!r}" in line, line


@pytest.mark.parametrize("breaker", BREAKERS + VARIANTS, ids=lambda b: b.__name__)
def test_single_fault(tmp_path, capsys, breaker):
    root = make_tiny(tmp_path / "d")
    expected = breaker(root)
    rc, out, err = run_check(root, capsys)
    assert rc == 1
    faults = fault_lines(out)
    assert len(faults) == 1, out
    assert_names(faults[0], expected)
    assert "FAILED: 1 fault" in out
    assert "Traceback" not in out + err


def test_finite_check_reads_in_chunks(tmp_path, capsys, monkeypatch):
    from signllava import datacheck
    monkeypatch.setattr(datacheck, "CHUNK_BYTES", 24)     # two frames of dim 6 float16 per read
    root = make_tiny(tmp_path / "d")
    arr = np.ones((7, 6), np.float16)
    arr[4, 1] = np.inf
    arr[6, :2] = np.nan
    put_clip(root, "pose", "dev", "vdev0", "vdev0_c0", arr)
    rc, out, _ = run_check(root, capsys, splits=["dev"])
    assert rc == 1
    (line,) = fault_lines(out)
    assert "pose.dev.0.h5, video 'vdev0', clip 'vdev0_c0': 3 non-finite values (NaN/Inf), first at frame 4" in line


# ------------------------------------------------------------------------------------------ valid data
def test_valid_dataset_in_process(tmp_path, capsys):
    root = make_tiny(tmp_path / "d")
    rc, out, err = run_check(root, capsys)
    assert rc == 0, out
    assert "FAULT" not in out and "WARNING" not in out
    assert "train: 8 clips in 3 videos; 8 with features in all of 3 modalities" in out
    assert "dev: 5 clips in 2 videos" in out and "test: 5 clips in 2 videos" in out
    lines = out.splitlines()
    # modality rows: name, dim, frames min / median / max, arrays
    assert any(ln.split()[:2] == ["mae", "8"] for ln in lines)
    assert any(ln.split()[:2] == ["pose", "6"] for ln in lines)
    assert any(ln.split()[:7] == ["dino", "4", "3", "/", "4", "/", "5"] for ln in lines), out
    assert out.strip().splitlines()[-1] == "OK: 3 splits, 18 clips checked (54 arrays)"


def test_cli_valid_dataset(tmp_path):
    root = make_tiny(tmp_path / "d")
    r = cli(root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "train: 8 clips in 3 videos" in r.stdout
    assert "OK: 3 splits, 18 clips checked" in r.stdout
    assert "Traceback" not in r.stdout + r.stderr


def cli(root, *args):
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "data.py", "--data_dir", str(root), *args], cwd=HERE, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_every_fault(tmp_path):
    """Every fault at once through the real CLI: exit 1, one line each, no traceback."""
    root = make_tiny(tmp_path / "d")
    expected = [b(root) for b in BREAKERS]
    r = cli(root)
    assert r.returncode == 1
    assert "Traceback" not in r.stdout + r.stderr
    faults = fault_lines(r.stdout)
    for exp in expected:
        assert any(_matches(ln, exp) for ln in faults), (exp, r.stdout)
    assert len(faults) == len(expected), r.stdout
    assert f"FAILED: {len(expected)} faults" in r.stdout


def _matches(line, expected):
    try:
        assert_names(line, expected)
        return True
    except AssertionError:
        return False


# ------------------------------------------------------------------------------------------ warnings
def test_clip_missing_from_one_modality_is_a_warning(tmp_path, capsys):
    root = make_tiny(tmp_path / "d")
    put_clip(root, "pose", "train", "vtrain1", "vtrain1_c2", None)
    rc, out, _ = run_check(root, capsys)
    assert rc == 0, out
    assert not fault_lines(out)
    warn = [ln for ln in out.splitlines() if ln.startswith("WARNING: ")]
    assert len(warn) == 1, out
    assert "1 of 8 annotated clips have no pose features" in warn[0]
    assert "video 'vtrain1' clip 'vtrain1_c2'" in warn[0]
    assert "train: 8 clips in 3 videos; 7 with features in all of 3 modalities" in out
    assert "OK: 3 splits" in out and "1 warning" in out


def test_video_missing_from_one_metadata_is_a_warning(tmp_path, capsys):
    root = make_tiny(tmp_path / "d")
    edit_json(root / "dino" / "metadata_dino.dev.json", lambda m: m.pop("vdev0"))
    rc, out, _ = run_check(root, capsys)
    assert rc == 0, out
    assert "2 of 5 annotated clips have no dino features" in out


def test_no_clip_with_all_modalities_is_a_fault(tmp_path, capsys):
    root = make_tiny(tmp_path / "d")
    write_json(root / "dino" / "metadata_dino.dev.json", {})
    rc, out, _ = run_check(root, capsys)
    assert rc == 1
    assert "5 of 5 annotated clips have no dino features" in out
    faults = fault_lines(out)
    assert len(faults) == 1 and "split 'dev' has no clip with features in all of" in faults[0], out


def test_bad_unannotated_clip_is_a_warning(tmp_path, capsys):
    root = make_tiny(tmp_path / "d")
    put_clip(root, "mae", "train", "vtrain0", "vtrain0_extra", np.full((3, 8), np.nan, np.float16))
    rc, out, _ = run_check(root, capsys)
    assert rc == 0, out
    assert "WARNING: " in out and "vtrain0_extra" in out and "not annotated" in out


# ------------------------------------------------------------------------------------------ selection
def test_modality_without_metadata_for_a_split(tmp_path, capsys):
    root = make_tiny(tmp_path / "d")
    (root / "extra").mkdir()
    write_json(root / "extra" / "metadata_extra.train.json", {"vtrain0": 0})
    with h5py.File(root / "extra" / "extra.train.0.h5", "w") as h:
        for c in clips("vtrain0"):
            h.create_dataset(f"vtrain0/{c}", data=np.zeros((2, 3), np.float16))
    # Discovered by default: not a fault that dev/test lack it (a warning says so).
    rc, out, _ = run_check(root, capsys)
    assert rc == 0, out
    assert "modality extra has no metadata file for split dev, test" in out
    # Asked for explicitly: a fault for each split lacking it.
    rc, out, _ = run_check(root, capsys, modalities=["mae", "extra"])
    assert rc == 1
    faults = fault_lines(out)
    assert len(faults) == 2 and all("extra" in f for f in faults), out
    assert "split 'dev'" in faults[0] and "split 'test'" in faults[1]
    rc, out, _ = run_check(root, capsys, splits=["train"], modalities=["mae", "extra"])
    assert rc == 0, out
    assert "dev:" not in out and "OK: 1 split, 8 clips checked" in out


def test_split_selection_and_missing_inputs(tmp_path, capsys):
    root = make_tiny(tmp_path / "d")
    (root / "annotation.test.json").unlink()
    rc, out, _ = run_check(root, capsys)                      # default: the splits that are present
    assert rc == 0 and "OK: 2 splits" in out, out
    rc, out, _ = run_check(root, capsys, splits=["test"])      # asked for: missing annotation is a fault
    assert rc == 1 and "annotation.test.json: file not found" in fault_lines(out)[0], out
    rc, out, _ = run_check(root, capsys, modalities=["nope"])
    assert rc == 1 and "nope: modality folder not found" in out
    rc, out, _ = run_check(tmp_path / "absent", capsys)
    assert rc == 1 and "data directory not found" in out



def test_paraphrases_or_keywords_as_one_string_are_one_item_and_a_number_is_a_fault(tmp_path):
    """A paraphrase written as a string, not a list, was iterated into single letters (multi-reference BLEU
    against 21 "references" a clip, training targets of one letter); it is one paraphrase. NaN (pandas' empty
    cell) is none; a number is a fault naming the clip."""
    from signllava.errors import DataError
    from signllava.layout import load_annotation
    path = tmp_path / "annotation.dev.json"
    clip = {"translation": "a cat sees the hat", "paraphrases": "a cat is seeing the hat", "keywords": "cat"}
    path.write_text(json.dumps({"v": {"clip_order": ["c", "d"], "c": clip,
                                      "d": {**clip, "paraphrases": float("nan"), "keywords": None}}}))
    ann = load_annotation(path)
    assert ann.clips[("v", "c")].paraphrases == ["a cat is seeing the hat"] and ann.clips[("v", "c")].keywords == ["cat"]
    assert ann.clips[("v", "d")].paraphrases == [] and ann.clips[("v", "d")].keywords == []
    path.write_text(json.dumps({"v": {"clip_order": ["c"], "c": {**clip, "paraphrases": 5}}}))
    with pytest.raises(DataError, match=r"clip 'c'.*paraphrases must be a list of strings, got 5"):
        load_annotation(path)
