"""--report_to: a short stage-1 run sends its scalars to TensorBoard, W&B (offline mode) and Trackio (local store)
at once, each read back from its own files; no network.

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q tests/test_trackers.py
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from signllava.trackers import Trackers, parse_report_to
from tests.kit import build_tiny_llm, run_script, script_env, train_args, write_tiny_dataset

STEPS = 3


def wandb_history(run_dir) -> list[dict]:
    """The history rows of an offline W&B run, read from its .wandb file with wandb's own record reader."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore
    (log,) = run_dir.glob("run-*.wandb")
    store = datastore.DataStore()
    store.open_for_scan(str(log))
    rows = []
    while (data := store.scan_data()) is not None:
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        if rec.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return rows


def trackio_logs(trackio_dir, project: str, run: str) -> list[dict]:
    """The run's rows in Trackio's local store (its module reads TRACKIO_DIR once, at import: a fresh process)."""
    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage; "
            "print(json.dumps(SQLiteStorage.get_logs(sys.argv[1], sys.argv[2])))")
    res = subprocess.run([sys.executable, "-c", code, project, run], capture_output=True, text=True, check=True,
                         env=script_env(TRACKIO_DIR=str(trackio_dir)))
    return json.loads(res.stdout.strip().splitlines()[-1])


def tensorboard_scalars(runs_dir) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(runs_dir))
    acc.Reload()
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def test_every_tracker_receives_the_training_scalars(tmp_path):
    data = write_tiny_dataset(tmp_path / "data")
    llm = build_tiny_llm(tmp_path / "llm", data)
    out = tmp_path / "run"
    env = script_env(WANDB_MODE="offline", WANDB_DIR=str(tmp_path / "wandb-home"), WANDB_CONFIG_DIR=str(tmp_path / "wcfg"),
                     WANDB_CACHE_DIR=str(tmp_path / "wcache"), WANDB_ERROR_REPORTING="false", WANDB_SILENT="true",
                     TRACKIO_DIR=str(tmp_path / "trackio"))
    run_script("pretrain.py", *train_args(data, llm, out, STEPS), "--report_to", "tensorboard,wandb,trackio",
               "--run_name", "tiny-run", "--tracker_project", "tests", env=env)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r["loss"] for r in rows if "loss" in r}
    dev = {r["step"]: r["dev_loss"] for r in rows if "dev_loss" in r}
    assert sorted(train) == [1, 2, 3] and list(dev) == [STEPS]
    tb = tensorboard_scalars(out / "runs")
    assert tb["train/loss"] == pytest.approx(train) and tb["dev/dev_loss"] == pytest.approx(dev)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    hist = wandb_history(run_dir / "")
    assert {h["_step"]: h["train/loss"] for h in hist if "train/loss" in h} == pytest.approx(train)
    assert {h["_step"]: h["dev/dev_loss"] for h in hist if "dev/dev_loss" in h} == pytest.approx(dev)
    assert json.loads((out / "trackers.json").read_text())["wandb_id"] in run_dir.name
    logs = trackio_logs(tmp_path / "trackio", "tests", "tiny-run")
    assert {r["step"]: r["train/loss"] for r in logs if "train/loss" in r} == pytest.approx(train)
    assert {r["step"]: r["dev/dev_loss"] for r in logs if "dev/dev_loss" in r} == pytest.approx(dev)
    assert {r["step"]: r["train/lr"] for r in logs if "train/lr" in r}.keys() == train.keys()


def test_report_to_names_and_none(tmp_path, capsys):
    assert parse_report_to("trackio, tensorboard") == ["tensorboard", "trackio"]
    assert parse_report_to("none") == [] and parse_report_to("") == []
    with pytest.raises(ValueError, match="unknown mlflow"):
        parse_report_to("tensorboard,mlflow")
    t = Trackers([], tmp_path, "r", "p", {}, resume=False)          # none: nothing is written
    t.log({"step": 1, "loss": 1.0})
    t.close()
    assert list(tmp_path.iterdir()) == []
    import pretrain
    with pytest.raises(SystemExit) as exit_:                  # argparse's one-line usage error, before any work
        pretrain.main(["--output_dir", str(tmp_path / "x"), "--report_to", "tensorboard,mlflow"])
    assert exit_.value.code == 2 and "--report_to tensorboard,mlflow: unknown mlflow" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_overwrite_clears_only_the_tracker_folders_our_runs_made(tmp_path):
    """--overwrite_output_dir (checkpoint.clear_run) removes a runs/ that our TensorBoard writer made, and never a
    runs/ or wandb/ that was the user's before the first run (a hostile probe lost its own experiments so)."""
    from signllava import checkpoint
    theirs, ours = tmp_path / "theirs", tmp_path / "ours"
    for d in ("runs/exp1", "wandb"):
        (theirs / d).mkdir(parents=True)
    (theirs / "runs" / "exp1" / "model.bin").write_text("precious")
    (theirs / "wandb" / "keep.txt").write_text("mine")
    for out in (theirs, ours):
        out.mkdir(exist_ok=True)
        Trackers(["tensorboard"], out, "r", "p", {}, resume=False).close()
        (out / "metrics.jsonl").write_text("{}\n")
    assert json.loads((ours / "trackers.json").read_text())["folders"] == ["runs"]
    assert not (theirs / "trackers.json").exists()           # nothing made: nothing claimed
    assert set(checkpoint.clear_run(theirs)) == {"metrics.jsonl"}
    assert (theirs / "runs" / "exp1" / "model.bin").read_text() == "precious" and (theirs / "wandb" / "keep.txt").exists()
    assert set(checkpoint.clear_run(ours)) == {"metrics.jsonl", "runs", "trackers.json"} and not (ours / "runs").exists()
