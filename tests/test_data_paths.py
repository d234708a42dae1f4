"""Data files named explicitly (--annotation_file, --features; signllava/data_paths.py) read the same clips as
today's layout, through the loader, the index cache and the checker; the errors that need only file names come
before the distributed start-up, in one usage line and one error line; -h shows defaults; the task mix is logged
when a split cannot carry its weighted tasks."""
import logging
import os
import shutil
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest

from data import DataOptions, SignDataset
from signllava.data_paths import DataPaths, data_problems
from signllava.datacheck import check_dataset
from signllava.layout import FeatureStore
from signllava.prompts import PromptBuilder, special_ids
from signllava.shard_index import cache_path
from tests.kit import REPO, write_tiny_dataset

RUN = "finetune/run-7"          # a sub-folder like the original's sign2vec/finetune/<run>/


def to_original_layout(data: Path, root: Path) -> Path:
    """The same files moved where an original config names them: annotations as h2s.annotations.<split>.json,
    mae's metadata and shards under mae/finetune/run-7/, pose's and dino's where they were."""
    shutil.copytree(data, root)
    for ann in root.glob("annotation.*.json"):
        ann.rename(root / ann.name.replace("annotation.", "h2s.annotations."))
    (root / "mae" / RUN).mkdir(parents=True)
    for f in list((root / "mae").glob("*.*")):
        f.rename(root / "mae" / RUN / f.name)
    return root


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("paths")
    default = write_tiny_dataset(root / "default")
    original = to_original_layout(default, root / "original")
    paths = DataPaths.from_specs(original, "h2s.annotations.{split}.json", f"mae=mae/{RUN}/metadata_mae.{{split}}.json")
    return default, original, paths


@pytest.fixture(scope="module")
def builder(tok):
    ids = special_ids(tok)
    return PromptBuilder(tok, ids["markers"], ids["pad"])


def test_spec_forms():
    p = DataPaths.from_specs("/d", "train=a.json,dev=/abs/b.json", "sign2vec=x/m.{split}.json,pose.dev=p.json")
    assert p.annotation("train") == Path("/d/a.json") and p.annotation("dev") == Path("/abs/b.json")
    assert p.annotation("test") == Path("/d/annotation.test.json")                    # not named: the default
    assert p.explicit_metadata("train") == {"sign2vec": Path("/d/x/m.train.json")}
    assert p.explicit_metadata("dev") == {"sign2vec": Path("/d/x/m.dev.json"), "pose": Path("/d/p.json")}
    assert DataPaths.from_specs("/d", "one.json").annotation("dev") == Path("/d/one.json")   # every split
    for bad, words in [("pose.val=p.json", "after the dot comes a split"), ("pose", "is not NAME=PATH"),
                       ("a b=p.json", "is not a modality name"), ("pose=a.json,pose=b.json", "given twice")]:
        with pytest.raises(ValueError, match=words):
            DataPaths.from_specs("/d", None, bad)


def test_explicit_paths_read_the_same_clips_and_cache_beside_the_metadata(layouts, builder, monkeypatch):
    default, original, paths = layouts
    for split in ("train", "dev"):
        a = SignDataset(default, split, builder, DataOptions(), train=split == "train")
        b = SignDataset(paths, split, builder, DataOptions(), train=split == "train")
        assert a.modalities == b.modalities == ["mae", "dino", "pose"]
        assert a.items == b.items and np.array_equal(a.frames, b.frames) and len(a) > 0
        assert b.stores["mae"].metadata == original / "mae" / RUN / f"metadata_mae.{split}.json"
        v, c, _ = a.items[3]
        assert all(np.array_equal(x, y) for x, y in zip(a.read_features(v, c), b.read_features(v, c)))
    assert cache_path(original / "mae" / RUN / "metadata_mae.train.json").is_file()     # the cache: beside it
    walks = []
    monkeypatch.setattr(FeatureStore, "_walk", lambda self: walks.append(self.modality))
    SignDataset(paths, "train", builder, DataOptions(), train=True)
    assert walks == []                                                                # read from the caches
    with pytest.raises(Exception, match="annotation.train.json: file not found"):
        SignDataset(original, "train", builder, DataOptions(), train=True)            # the default layout: absent


def test_checker_on_explicit_paths(layouts, capsys):
    default, original, paths = layouts
    assert check_dataset(default, None, None) == 0
    expected = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("train:", "dev:", "test:"))]
    assert check_dataset(paths, None, None) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith(("train:", "dev:", "test:"))] == expected
    assert "mae" in out and "FAULT" not in out
    assert check_dataset(paths, ["dev"], ["mae"]) == 0                                # --modalities with --features
    capsys.readouterr()
    broken = DataPaths.from_specs(original, "h2s.annotations.{split}.json", "mae=mae/nowhere.{split}.json")
    assert check_dataset(broken, ["train"], None) == 1
    assert f"FAULT: {original / 'mae' / 'nowhere.train.json'}: file not found" in capsys.readouterr().out


def test_location_problems_from_file_names(layouts):
    default, original, paths = layouts
    assert data_problems(default, None, None, ["train", "dev"]) == []
    assert data_problems(original, "h2s.annotations.{split}.json", f"mae=mae/{RUN}/metadata_mae.{{split}}.json",
                         ["train"]) == []
    [ann, meta] = data_problems(REPO, None, None, ["train"])                 # the repository root as --data_dir
    assert ann == (f"--data_dir {REPO}: no annotation file for split 'train' ({REPO / 'annotation.train.json'} not "
                   "found; name another with --annotation_file)")
    assert "no modality folder has a metadata file *.train.json" in meta and "--features NAME=PATH" in meta
    [missing] = data_problems(original, "h2s.annotations.{split}.json", "mae=mae/x.{split}.json", ["train"])
    assert missing == f"--features mae: {original / 'mae' / 'x.train.json'} not found (split 'train')"
    assert data_problems(original, None, "pose", ["train"]) == ["--features: 'pose' is not NAME=PATH"]


def flag_error(main, argv, capsys) -> list[str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err.strip().splitlines()


def test_errors_before_the_distributed_start_one_usage_line(layouts, tmp_path, capsys, monkeypatch):
    import finetune
    import generate
    import pretrain
    import training
    default, original, _ = layouts

    def never(*_):
        raise AssertionError("distributed start-up reached")
    monkeypatch.setattr(training, "init_distributed", never)
    usage, err = flag_error(pretrain.main, ["--data_dir", str(REPO), "--output_dir", str(tmp_path / "o")], capsys)
    assert usage.startswith("usage: ") and usage.endswith(" [options] (-h lists them)")      # one line, then the error
    assert "no annotation file for split 'train'" in err and str(REPO / "annotation.train.json") in err
    (tmp_path / "file").write_text("x")
    usage, err = flag_error(pretrain.main, ["--data_dir", str(default), "--output_dir", str(tmp_path / "file")], capsys)
    assert err.endswith(f"--output_dir {tmp_path / 'file'}: a file, not a directory")
    from signllava.checkpoint import complete_checkpoints
    from tests.test_hostile import fake_checkpoint       # a complete checkpoint: files and manifest
    held = tmp_path / "held"
    fake_checkpoint(held, 3)
    assert complete_checkpoints(held)
    _, err = flag_error(pretrain.main, ["--data_dir", str(default), "--output_dir", str(held)], capsys)
    assert err.endswith(f"--output_dir {held}: already holds checkpoints; pass --resume to continue or "
                        "--overwrite_output_dir to start afresh")
    _, err = flag_error(finetune.main, ["--projector", str(tmp_path / "none"), "--data_dir", str(default)], capsys)
    assert err.endswith(f"--projector {tmp_path / 'none'}: no such file or directory")
    _, err = flag_error(pretrain.main, ["--features", "mae=x.json", "--output_dir", str(tmp_path / "o")], capsys)
    assert "--features needs --data_dir" in err
    _, err = flag_error(generate.main, ["--checkpoint", str(tmp_path), "--data_dir", str(original), "--output",
                                        str(tmp_path / "g.json"), "--split", "dev"], capsys)
    assert "no annotation file for split 'dev'" in err                  # before the checkpoint's model loads


def test_help_shows_every_default(capsys):
    import finetune
    import generate
    import pretrain
    for mod in (pretrain, finetune, generate):
        p = mod.parser()
        bare = [a.option_strings[0] for a in p._actions if a.option_strings and not a.help]
        assert bare == [], f"{mod.__name__}: flags without help {bare}"
        text = p.format_help()
        assert "(default: " in text
    text = " ".join(pretrain.parser().format_help().split())
    assert "peak learning rate after the warmup (default: 0.001)" in text
    assert "--deepspeed_config DEEPSPEED_CONFIG DeepSpeed JSON" in text and "ds_config_zero2.json)" in text
    assert "--save_steps SAVE_STEPS a checkpoint every N optimizer steps (and at the end) (default: 500)" in text


def test_task_mix_logged_when_a_split_has_no_keywords(tmp_path, builder, caplog):
    import json
    data = write_tiny_dataset(tmp_path / "d", videos_per_split={"train": 2, "dev": 1})
    ann_path = data / "annotation.train.json"
    ann = json.loads(ann_path.read_text())
    for vd in ann.values():                 # the original's mock data: no keywords at all
        for clip in vd["clip_order"]:
            del vd[clip]["keywords"]
    ann_path.write_text(json.dumps(ann))
    weights = {"translation": 0.7, "one_word_present": 0.1, "multi_word_present": 0.1, "is_reversed": 0.1}
    ds = SignDataset(data, "train", builder, DataOptions(task_weights=weights), train=True)
    with caplog.at_level(logging.INFO, logger="signllava"):
        ds.log_task_mix()
    [rec] = [r for r in caplog.records if "task weights" in r.getMessage()]
    msg = rec.getMessage()
    assert rec.levelno == logging.WARNING, msg
    n = len(ds)
    assert f"of {n} clips (0 with keywords, vocabulary of 0 words) these can carry one_word_present 0, " \
           f"multi_word_present 0, is_reversed {n}" in msg
    assert ("the mix becomes translation 0.900, one_word_present 0.000, multi_word_present 0.000, "
            "is_reversed 0.100") in msg
    assert "one_word_present, multi_word_present: no clip can carry it" in msg
    drawn = [ds[(i, 0)]["task"] for i in range(n)]                    # what the samples really are
    assert set(drawn) <= {"translation", "is_reversed"}
    caplog.clear()
    dev = SignDataset(data, "dev", builder, DataOptions(task_weights=weights), train=False)   # keywords kept there
    with caplog.at_level(logging.INFO, logger="signllava"):
        dev.log_task_mix()
    [rec] = [r for r in caplog.records if "task weights" in r.getMessage()]
    assert rec.levelno == logging.INFO and f"one_word_present {len(dev)}" in rec.getMessage()
