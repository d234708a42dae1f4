"""Picking the best model while training: dev translation scores at evaluation, O/best, rotation that keeps
it, exact best-tracking across a resume, the curves picture.

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q tests/test_best.py
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from signllava import checkpoint
from tests.kit import REPO, build_tiny_llm, run_script, script_env, train_args, write_tiny_dataset

STEPS, CLIPS, BEAMS = 8, 6, 2


def fake_checkpoint(out: Path, step: int) -> Path:
    tmp = checkpoint.begin(out, step)
    for name in (checkpoint.STATE_NAME, checkpoint.CONFIG_NAME, checkpoint.PROJECTORS_NAME):
        (tmp / name).write_text("{}")
    return tmp


def test_rotation_keeps_newest_and_best(tmp_path):
    """keep=1 with dev scores best at step 1: the newest and the best survive, O/best names the best."""
    for step, best in ((1, 1), (2, 1), (3, 1), (4, 4), (5, 4)):
        checkpoint.commit(fake_checkpoint(tmp_path, step), step, keep=1, best_step=best)
        if step == 3:
            assert [d.name for d in checkpoint.complete_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-3"]
            assert checkpoint.best_checkpoint(tmp_path).name == "checkpoint-1"
    # a new best frees the old one for rotation
    assert [d.name for d in checkpoint.complete_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-5"]
    assert checkpoint.resolve_checkpoint(tmp_path / "best").name == "checkpoint-4"
    assert checkpoint.resolve_checkpoint(tmp_path / "latest").name == "checkpoint-5"
    (tmp_path / "best").write_text("checkpoint-2\n")
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.resolve_checkpoint(tmp_path / "best")


def test_overwrite_clears_the_previous_run_and_nothing_else(tmp_path):
    """--overwrite_output_dir: no O/best, checkpoint or metrics line of the old run passes for the new run's."""
    for step in (2, 4):
        checkpoint.commit(fake_checkpoint(tmp_path, step), step, keep=0, best_step=2)
    for name in ("metrics.jsonl", "train_summary.json", "curves.png", "notes.txt"):
        (tmp_path / name).write_text("x")
    (tmp_path / "runs").mkdir()                                   # TensorBoard's, as trackers.json says
    (tmp_path / "trackers.json").write_text(json.dumps({"folders": ["runs"]}))
    (tmp_path / "wandb").mkdir()                                  # not made by our trackers: the user's
    (tmp_path / "demo_data").mkdir()
    gone = checkpoint.clear_run(tmp_path)
    assert set(gone) == {"latest", "best", "checkpoint-2", "checkpoint-4", "metrics.jsonl", "train_summary.json",
                         "curves.png", "runs", "trackers.json"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo_data", "notes.txt", "wandb"]
    assert checkpoint.latest_checkpoint(tmp_path) is None and checkpoint.clear_run(tmp_path) == []


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("best")
    data = write_tiny_dataset(root / "data")
    return {"root": root, "data": data, "llm": build_tiny_llm(root / "llm", data)}


def best_args(tiny, out: Path) -> list:
    return [*train_args(tiny["data"], tiny["llm"], out, STEPS), "--eval_steps", 2, "--save_steps", 100,
            "--save_total_limit", 1, "--eval_generate", CLIPS, "--eval_num_beams", BEAMS, "--metric_for_best", "chrf"]


def dev_rows(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "dev_loss" in r}          # a resumed run's later record wins


@pytest.fixture(scope="module")
def run(tiny):
    out = tiny["root"] / "run"
    res = run_script("pretrain.py", *best_args(tiny, out))
    return out, res.stderr


def test_best_checkpoint_is_the_highest_logged_score_and_survives_rotation(run):
    out, log = run
    rows = dev_rows(out)
    assert sorted(rows) == [2, 4, 6, 8] and all({"dev_bleu", "dev_chrf"} <= set(r) for r in rows.values())
    best_step = max(rows, key=lambda s: (rows[s]["dev_chrf"], -s))             # the first of equal scores
    assert (out / "best").read_text().strip() == f"checkpoint-{best_step}"
    kept = {d.name for d in checkpoint.complete_checkpoints(out)}
    assert kept == {f"checkpoint-{best_step}", f"checkpoint-{STEPS}"}          # keep=1: the newest and the best
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["best"] == {"metric": "chrf", "step": best_step, "score": rows[best_step]["dev_chrf"],
                               "checkpoint": str(out / f"checkpoint-{best_step}")}
    assert (out / "curves.png").stat().st_size > 10_000
    assert f"evaluation translates {CLIPS} of 22 dev clips" in log


def test_generate_on_best_reproduces_the_logged_scores(run, tiny, tmp_path):
    out, log = run
    # the flags the training log names as the ones that repeat its evaluation
    flags = re.search(r"generate\.py (--limit \d+ --num_beams \d+ --max_new_tokens \d+) repeats it", log).group(1).split()
    best_step = int((out / "best").read_text().strip().split("-")[1])
    run_script("generate.py", "--checkpoint", out / "best", "--data_dir", tiny["data"], "--output", tmp_path / "o.json",
               "--metrics_out", tmp_path / "m.json", "--num_workers", 0, *flags)
    met = json.loads((tmp_path / "m.json").read_text())
    assert met["n"] == CLIPS and met["context"] == "none"
    assert met["bleu"] == pytest.approx(dev_rows(out)[best_step]["dev_bleu"], abs=1e-9)
    assert met["chrf"] == pytest.approx(dev_rows(out)[best_step]["dev_chrf"], abs=1e-9)
    # the whole suite the evaluation logs is generate.py's: BLEU-1..3, ROUGE-L, multi-reference, the intervals
    from training import EVAL_SCALARS
    row = dev_rows(out)[best_step]
    assert {f"dev_{k}" for k in EVAL_SCALARS} <= set(row)
    for k in EVAL_SCALARS:
        assert met[k] == pytest.approx(row[f"dev_{k}"], abs=1e-9), k
    assert met["ci95"]["bleu"]["pm"] == pytest.approx(row["dev_bleu_ci95"], abs=1e-9)
    best_scores = json.loads((out / "train_summary.json").read_text())["best_dev_scores"]
    assert best_scores["step"] == best_step and best_scores["rouge_l_signature"] == met["rouge_l_signature"]
    assert "evaluation scores: BLEU-1" in log and met["multiref_signature"] in log


def test_resume_keeps_best_tracking_exact(run, tiny):
    """Killed right after the first save (a new best), resumed: the same evaluations, the same best, O/best."""
    out, _ = run
    out2 = tiny["root"] / "resumed"
    res = run_script("pretrain.py", *best_args(tiny, out2), env=script_env(SIGNLLAVA_FAULT="after_save:2"), check=False)
    assert res.returncode != 0 and checkpoint.latest_checkpoint(out2).name == "checkpoint-2"
    run_script("pretrain.py", *best_args(tiny, out2), "--resume")
    a, b = dev_rows(out), dev_rows(out2)
    assert b == a
    assert (out2 / "best").read_text() == (out / "best").read_text()
    sa, sb = (json.loads((o / "train_summary.json").read_text()) for o in (out, out2))
    assert sa["best"]["score"] == sb["best"]["score"] and sa["best"]["step"] == sb["best"]["step"]


def test_metric_for_best_needs_translation(tiny, tmp_path):
    res = run_script("pretrain.py", *train_args(tiny["data"], tiny["llm"], tmp_path / "x", 1), "--eval_generate", 0,
                     "--metric_for_best", "bleu", check=False)
    assert res.returncode == 2 and "--metric_for_best bleu needs translation" in res.stderr


def test_curves_command_on_a_run_dir(run, tmp_path):
    """The curves of any run directory, also one still being written (a half line at the end)."""
    from signllava.curves import draw_curves, read_series
    out, _ = run
    live = tmp_path / "live"
    live.mkdir()
    (live / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text() + '{"step": 9, "lo')
    series = read_series(live / "metrics.jsonl")
    assert sorted(series["dev_bleu"]) == [2, 4, 6, 8] and max(series["loss"]) == STEPS     # steps as keys
    assert draw_curves(live).stat().st_size > 10_000
    res = subprocess.run([sys.executable, "-m", "signllava.curves", str(out), "--out", str(tmp_path / "c.png")],
                         cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == str(tmp_path / "c.png") and (tmp_path / "c.png").is_file()
