"""Clips that miss a modality, modality dropout, frame caps and the --max_seq_len guard (issue 15).

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q tests/test_modalities.py
"""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from data import Collator, DataOptions, SignDataset, cap_frames, frame_limits, parse_max_frames
from signllava.errors import CheckpointError, DataError
from tests.kit import build_tiny_llm, run_script, train_args, write_tiny_dataset

N_TRAIN = 4 * 11            # write_tiny_dataset: 4 train videos of 11 clips; 2 of them lack pose


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from model import load_tokenizer
    from signllava.prompts import PromptBuilder, special_ids
    root = tmp_path_factory.mktemp("modalities")
    data = write_tiny_dataset(root / "data")
    llm = build_tiny_llm(root / "llm", data)
    tok, _ = load_tokenizer(str(llm))
    ids = special_ids(tok)
    return {"root": root, "data": data, "llm": llm, "tok": tok, "ids": ids,
            "builder": PromptBuilder(tok, ids["markers"], ids["pad"])}


def dataset(tiny, split="train", train=True, **opts) -> SignDataset:
    return SignDataset(tiny["data"], split, tiny["builder"], DataOptions(**opts), train=train)


# ------------------------------------------------------------------------------------ frame caps
def test_max_frames_parse_and_pool():
    assert parse_max_frames("300") == {"*": 300}
    assert parse_max_frames("mae=300,sign2vec=150") == {"mae": 300, "sign2vec": 150}
    assert frame_limits({"*": 5, "pose": 2}, ["mae", "pose"]) == {"mae": 5, "pose": 2}
    assert frame_limits(7, ["mae"]) == {"mae": 7}                        # a config of before per-modality caps
    with pytest.raises(DataError, match="dino"):
        frame_limits({"dino": 3}, ["mae", "pose"])
    with pytest.raises(ValueError, match="whole number"):
        parse_max_frames("mae=lots")
    arr = np.arange(10, dtype=np.float32)[:, None].repeat(2, 1)
    pooled = cap_frames(arr, 3, "pool")                                   # windows [0,3) [3,6) [6,10)
    np.testing.assert_allclose(pooled[:, 0], [1.0, 4.0, 7.5])
    np.testing.assert_array_equal(cap_frames(arr, 3, "truncate")[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(cap_frames(arr, 3, "stride")[:, 0], [0, 4, 9])


def test_per_modality_cap_in_the_dataset(tiny):
    ds = dataset(tiny, max_frames={"mae": 3}, frame_cap="pool")
    plain = dataset(tiny)
    for i in range(6):
        feats, raw = ds[i]["features"], plain[i]["features"]
        k = ds.modalities.index("mae")
        expect = cap_frames(raw[k], 3, "pool")
        np.testing.assert_allclose(feats[k].astype(np.float32), expect.astype(np.float32), atol=1e-3)
        others = [j for j in range(len(ds.modalities)) if j != k]
        assert all(len(feats[j]) == len(raw[j]) for j in others)          # only mae is capped
        assert ds.frame_tokens(i) == sum(len(f) + 2 for f in feats)


# ------------------------------------------------------------------------------------ missing modalities
def test_missing_modality_drop_or_absent(tiny, caplog):
    with caplog.at_level(logging.WARNING, logger="signllava"):
        dropped = dataset(tiny, missing_modality="drop")
        absent = dataset(tiny, missing_modality="absent")
    assert len(dropped) == N_TRAIN - 2 and len(absent) == N_TRAIN
    assert "2 of 44 clips have no pose features and are given the learned absent segment" in caplog.text
    holes = [i for i in range(len(absent)) if absent.absent_in(i)]
    assert len(holes) == 2
    sample = absent[holes[0]]
    assert sample["absent"] == ["pose"]
    k = absent.modalities.index("pose")
    assert (sample["segments"] == k).sum() == 1                          # one position: the absent row
    batch = Collator(tiny["ids"]["pad"])([absent[holes[0]], absent[0]])
    assert batch["absent_index"]["pose"].tolist() == [int(np.nonzero(sample["segments"] == k)[0][0])]
    assert len(batch["frame_index"]["pose"]) == len(absent[0]["features"][k])   # the other clip's pose frames


def test_clip_missing_every_modality_is_named(tiny):
    with pytest.raises(DataError, match=r"video 'trainvid\d' clip 'trainvid\d_3' has features in none of pose"):
        dataset(tiny, modalities=["pose"], missing_modality="absent")


def test_modality_dropout_is_deterministic_and_never_total(tiny):
    ds = dataset(tiny, modality_dropout=0.5, seed=3)
    again = dataset(tiny, modality_dropout=0.5, seed=3)
    plain = dataset(tiny, seed=3)
    drops = []
    for i in range(len(ds)):
        for epoch in (0, 1):
            a, b = ds[i, epoch], again[i, epoch]
            assert a["absent"] == b["absent"]                             # keyed on (seed, epoch, index)
            assert len(a["absent"]) < len(ds.modalities)                  # never all
            drops.append(len(a["absent"]))
            assert a["answer"] == plain[i, epoch]["answer"]               # the sample's other draws do not move
            for m, f in zip(a["modalities"], a["features"]):
                assert (len(f) == 0) == (m in a["absent"])
    rate = sum(drops) / (len(drops) * len(ds.modalities))
    assert 0.3 < rate < 0.5, rate            # 0.5, less the never-all rule
    assert [ds[i, 0]["absent"] for i in range(8)] != [ds[i, 1]["absent"] for i in range(8)]   # epochs differ
    dev = SignDataset(tiny["data"], "dev", tiny["builder"], DataOptions(modality_dropout=0.9), train=False)
    assert all(not dev[i]["absent"] for i in range(len(dev)))            # evaluation never drops


# ------------------------------------------------------------------------------------ the model's rows
def build_model(tiny, with_rows: bool):
    from model import SignConfig, assemble
    ds = dataset(tiny)
    cfg = SignConfig(str(tiny["llm"]), str(tiny["llm"]), ds.modalities, ds.dims, {m: "linear" for m in ds.modalities},
                     modality_embeddings=with_rows)
    torch.manual_seed(0)
    return assemble(cfg, tiny["tok"], torch.device("cpu"), torch.float32), cfg


def test_absent_and_modality_rows_in_embed(tiny):
    model, _ = build_model(tiny, True)
    rows = model.marker_embed
    with torch.no_grad():
        rows.modality.weight.normal_()
    ds = dataset(tiny, missing_modality="absent")
    hole = next(i for i in range(len(ds)) if ds.absent_in(i))
    batch = Collator(tiny["ids"]["pad"])([ds[hole], ds[0]])
    with torch.no_grad():
        emb = model.embed(batch["input_ids"], batch["features"], batch["frame_index"], batch["absent_index"]).flatten(0, 1)
        k = rows.index["pose"]
        torch.testing.assert_close(emb[batch["absent_index"]["pose"]][0], rows.absent.weight[k])
        m = rows.index["mae"]
        expect = model.projectors["mae"](batch["features"]["mae"].float()) + rows.modality.weight[m]
        torch.testing.assert_close(emb[batch["frame_index"]["mae"]], expect)
    keys = set(model.projector_state())
    assert {"marker_embed.weight", "marker_embed.modality.weight", "marker_embed.absent.weight"} <= keys


def test_checkpoint_of_before_modality_rows(tiny):
    """Today's format (no modality rows) still loads, and refuses a missing modality by name."""
    old, _ = build_model(tiny, False)
    state = old.projector_state()
    assert not any(k.startswith(("marker_embed.modality", "marker_embed.absent")) for k in state)
    again, _ = build_model(tiny, False)
    again.load_projector_state(state, "old checkpoint")
    ds = dataset(tiny, missing_modality="absent")
    hole = next(i for i in range(len(ds)) if ds.absent_in(i))
    batch = Collator(tiny["ids"]["pad"])([ds[hole]])
    with pytest.raises(CheckpointError, match="no learned absent rows.*'pose' is missing"):
        again.embed(batch["input_ids"], batch["features"], batch["frame_index"], batch["absent_index"])


def test_standardized_features_enter_the_projector_standardised(tiny):
    """--standardize_features: the split's statistics over every clip, a FeatureScale that makes them mean 0 /
    std 1 (a dimension constant in training only centred), saved and reloaded with the projectors."""
    from model import FeatureScale, SignConfig, assemble
    ds = dataset(tiny)
    stats = ds.feature_statistics()
    mae = np.concatenate([ds.stores["mae"].read(v, c) for v, c, _ in ds.items]).astype(np.float64)
    np.testing.assert_allclose(stats["mae"][0], mae.mean(0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(stats["mae"][1], mae.std(0), rtol=1e-6)
    cfg = SignConfig(str(tiny["llm"]), str(tiny["llm"]), ds.modalities, ds.dims, {m: "linear" for m in ds.modalities},
                     modality_embeddings=True, standardize_features=True)
    model = assemble(cfg, tiny["tok"], torch.device("cpu"), torch.float32)
    model.standardize_from(stats)
    scaled = model.projectors["mae"].standardize(torch.as_tensor(mae, dtype=torch.float32)).double()
    torch.testing.assert_close(scaled.mean(0), torch.zeros(mae.shape[1], dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(scaled.std(0, unbiased=False), torch.ones(mae.shape[1], dtype=torch.float64), atol=1e-4, rtol=0)
    keys = set(model.projector_state())
    assert {"projectors.mae.standardize.scale", "projectors.mae.standardize.shift", "projectors.mae.project.weight"} <= keys
    again = assemble(cfg, tiny["tok"], torch.device("cpu"), torch.float32)
    again.load_projector_state(model.projector_state(), "stage 1")
    torch.testing.assert_close(again.projectors["pose"].standardize.scale, model.projectors["pose"].standardize.scale)
    # A dimension that never varies is centred only; one that varies is scaled by 1 / std.
    fs = FeatureScale(3)
    fs.set_from(np.array([-1.0, 2.0, 0.5]), np.array([0.0, 0.5, 1e-4]))
    torch.testing.assert_close(fs.scale, torch.tensor([1.0, 2.0, 1.0]))
    torch.testing.assert_close(fs.shift, torch.tensor([1.0, -4.0, -0.5]))
    # Without the flag nothing is in front of the projector, and asking to standardise is refused.
    plain = assemble(SignConfig(str(tiny["llm"]), str(tiny["llm"]), ds.modalities, ds.dims,
                                {m: "linear" for m in ds.modalities}), tiny["tok"], torch.device("cpu"), torch.float32)
    assert not any(".standardize." in k for k in plain.projector_state())
    with pytest.raises(Exception, match="no FeatureScale"):
        plain.standardize_from(stats)


# ------------------------------------------------------------------------------------ --max_seq_len
def test_max_seq_len_caps_frames_or_skips(tiny, caplog):
    plain = dataset(tiny)
    lengths = [len(plain[i]["input_ids"]) for i in range(len(plain))]
    limit = int(np.median(lengths))
    capped = dataset(tiny, max_seq_len=limit, frame_cap="pool")
    for i in range(len(capped)):
        a, b = capped[i], plain[i]
        assert len(a["input_ids"]) <= limit
        assert (a["labels"][a["labels"] != -100] == b["labels"][b["labels"] != -100]).all()    # the answer whole
    longer = sum(n > limit for n in lengths)
    with caplog.at_level(logging.WARNING, logger="signllava"):
        skipped = dataset(tiny, max_seq_len=limit, long_samples="skip")
    assert len(skipped) == len(plain) - longer > 0
    assert f"{longer} clips are longer than --max_seq_len {limit} and are skipped" in caplog.text
    tight = dataset(tiny, max_seq_len=20)
    with pytest.raises(DataError, match="clip .* its text takes .* tokens; --max_seq_len 20 leaves no room"):
        tight[0]


# ------------------------------------------------------------------------------------ end to end
def test_train_with_absent_and_dropout_then_generate_from_one_modality(tiny, capsys):
    """pretrain.py with the flags; the checkpoint carries them; generate.py from mae alone."""
    out = tiny["root"] / "run"
    run_script("pretrain.py", *train_args(tiny["data"], tiny["llm"], out, 2, "--missing_modality", "absent",
                                          "--modality_dropout", "0.5", "--max_frames", "mae=3", "--frame_cap", "pool"))
    cfg = json.loads((out / "checkpoint-2" / "config.json").read_text())
    assert cfg["max_frames"] == {"mae": 3, "dino": 0, "pose": 0} and cfg["frame_cap"] == "pool"
    assert cfg["modality_embeddings"] is True and cfg["max_seq_len"] == 4096     # the tiny Llama's positions
    import generate
    common = ["--checkpoint", str(out), "--data_dir", str(tiny["data"]), "--split", "dev", "--num_workers", "0",
              "--device", "cpu"]
    assert generate.main([*common, "--modalities", "mae", "--output", str(out / "gen.json"), "--metrics_out",
                          str(out / "m.json"), "--num_beams", "1", "--max_new_tokens", "4", "--limit", "4"]) == 0
    assert json.loads((out / "m.json").read_text())["n"] == 4
    assert generate.main([*common, "--modalities", "sign2vec", "--output", str(out / "x.json")]) == 2
    assert "error: --modalities sign2vec: not trained by this checkpoint" in capsys.readouterr().err


def test_translator_fills_absent_rows(tiny):
    """Translator.make_item with a subset: every trained modality has a segment, the missing ones absent."""
    from generate import Translator
    model, cfg = build_model(tiny, True)
    tr = Translator(model, tiny["tok"], cfg, torch.device("cpu"))
    item = tr.make_item({"dino": np.ones((4, cfg.dims["dino"]), np.float32)}, "Translate.")
    assert item["modalities"] == cfg.modalities and item["absent"] == ["mae", "pose"]
    assert [(item["segments"] == k).sum() for k in range(3)] == [1, 4, 1]
    old, old_cfg = build_model(tiny, False)
    item = Translator(old, tiny["tok"], old_cfg, torch.device("cpu")).make_item(
        {"dino": np.ones((4, cfg.dims["dino"]), np.float32)}, "Translate.")
    assert item["modalities"] == ["dino"] and item["absent"] == []        # today's format: as it was trained
