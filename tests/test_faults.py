"""Faults in the middle of a run, each injected through SIGNLLAVA_FAULT: a non-finite loss (the step is
skipped and counted; too many in a row stop the run), an out-of-memory batch, a save the disk refuses.
Each ends in one line (no traceback) with the last complete checkpoint untouched, and --resume then
gives exactly the weights of an uninterrupted run."""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from tests.kit import build_tiny_llm, run_script, script_env, train_args, write_tiny_dataset

STEPS = 6
COMMON = ("--save_steps", 2, "--max_bad_steps", 2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """-> run(name, *extra, fault=None, check=True): a 6-step stage-1 run saving every 2 steps."""
    root = tmp_path_factory.mktemp("faults")
    data = write_tiny_dataset(root / "data")
    llm = build_tiny_llm(root / "llm", data)

    def go(name, *extra, fault=None, check=True):
        env = script_env(SIGNLLAVA_FAULT=fault) if fault else None
        out = root / name
        return out, run_script("pretrain.py", *train_args(data, llm, out, STEPS, *COMMON, *extra), env=env, check=check)
    return go


def weights(ck: Path) -> dict:
    return load_file(str(ck / "projectors.safetensors"))


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close(a: dict, b: dict) -> bool:
    """As the exact-resume tests of test_smoke.py compare a resumed run with an uninterrupted one."""
    return a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def one_line_error(res) -> str:
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error: "), err
    return err


def assert_stopped_at_checkpoint_2(out: Path):
    """Only the last complete checkpoint before the fault is there, `latest` names it, nothing half-written."""
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]


@pytest.fixture(scope="module")
def reference(run):
    out, _ = run("ref")
    return weights(out / f"checkpoint-{STEPS}")


def test_out_of_memory_then_failed_save_then_exact_resume(run, reference):
    # An out-of-memory batch at step 3: one line naming its clips, tokens and the flags that fit it.
    out, res = run("oom_save", fault="oom:3", check=False)
    err = one_line_error(res)
    assert "step 3: out of GPU memory on a batch of 4 clips" in err and " tokens (trainvid" in err, err
    assert "--max_tokens_per_batch" in err and "--gradient_checkpointing" in err, err
    assert_stopped_at_checkpoint_2(out)
    # --resume, and this time the disk refuses checkpoint-4 half-way: its .tmp goes, checkpoint-2 stays latest.
    _, res = run("oom_save", "--resume", fault="save_error:4", check=False)
    err = one_line_error(res)
    assert "checkpoint-4: the save failed (No space left on device" in err and "checkpoint-2 stays" in err, err
    assert_stopped_at_checkpoint_2(out)
    # --resume once more: the weights of the uninterrupted run, exactly.
    run("oom_save", "--resume")
    assert close(weights(out / f"checkpoint-{STEPS}"), reference)


def test_non_finite_losses_in_a_row_stop_the_run_then_exact_resume(run, reference):
    out, res = run("nan_stop", fault="nan_loss:3,nan_loss:4", check=False)
    err = one_line_error(res)
    assert "step 4: non-finite loss, 2 steps in a row (--max_bad_steps 2)" in err and "clips: trainvid" in err, err
    assert_stopped_at_checkpoint_2(out)
    assert "step 3 skipped: non-finite loss (1 in a row, 1 in all)" in res.stderr
    run("nan_stop", "--resume")
    assert close(weights(out / f"checkpoint-{STEPS}"), reference)


def test_non_finite_loss_skips_the_update_and_resume_keeps_the_count(run):
    """A lone NaN step changes nothing (checkpoint-3 == checkpoint-2), is counted in metrics.jsonl and the
    checkpoint, and training goes on; a kill and --resume after it give the uninterrupted run's weights."""
    every = ("--save_steps", 1, "--save_total_limit", 0)
    out, _ = run("nan_skip", *every, fault="nan_loss:3")
    assert same(weights(out / "checkpoint-3"), weights(out / "checkpoint-2"))
    assert not same(weights(out / "checkpoint-4"), weights(out / "checkpoint-3"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 3, "skipped_steps": 1, "bad_in_a_row": 1} in rows
    assert not any("loss" in r for r in rows if r["step"] == 3)
    assert json.loads((out / "train_summary.json").read_text())["skipped_steps"] == 1

    killed, res = run("nan_kill", *every, fault="nan_loss:3,after_save:4", check=False)
    assert res.returncode == -9
    assert json.loads((killed / "checkpoint-4" / "trainer_state.json").read_text())["skipped_steps"] == 1
    run("nan_kill", *every, "--resume")
    assert close(weights(killed / f"checkpoint-{STEPS}"), weights(out / f"checkpoint-{STEPS}"))
    assert json.loads((killed / "train_summary.json").read_text())["skipped_steps"] == 1


def test_overflow_scan_skipped_only_where_the_gradient_norm_decides():
    """ZeRO-1/2's per-tensor inf/NaN scan is dropped only while DeepSpeed computes the global gradient norm,
    whose check catches the same steps (the NaN tests above run with the scan dropped)."""
    from training import skip_per_tensor_overflow_scan

    class Zero2:                     # the parts of DeepSpeed's stage_1_and_2 optimizer the decision reads
        compute_grad_norm = True
        scanned = 0

        def check_overflow(self, partition_gradients=True):
            self.scanned += 1

        def has_overflow_partitioned_grads_serial(self):
            return None
    opt = Zero2()
    assert skip_per_tensor_overflow_scan(opt)
    opt.check_overflow()
    assert opt.scanned == 0
    no_norm = Zero2()
    no_norm.compute_grad_norm = False
    assert not skip_per_tensor_overflow_scan(no_norm)
    no_norm.check_overflow()
    assert no_norm.scanned == 1
    assert not skip_per_tensor_overflow_scan(object())          # another optimizer: left alone



def test_a_loader_workers_data_error_is_its_own_one_line(capsys):
    """A DataError raised in a DataLoader worker (a NaN in a clip) reaches the main process re-raised by torch with
    the worker's whole traceback as its message; the command still prints the error's own line."""
    from torch._utils import ExceptionWrapper
    from signllava.errors import DataError, run_command
    said = "f.h5, video 'v', clip 'c': 1 non-finite values (NaN/Inf)"

    def body():
        try:
            raise DataError(said)
        except DataError:
            wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
        wrapped.reraise()

    assert run_command(body) == 2
    assert capsys.readouterr().err == f"error: {said}\n"



def test_rank_zeros_error_is_raised_everywhere_as_its_one_line(tmp_path):
    """raise_everywhere's multi-rank path (broadcast of rank 0's error) on a one-process gloo group: rank 0's
    DataError, re-raised by a loader worker with its traceback, comes back as the same type with its own line."""
    import torch.distributed as dist
    from torch._utils import ExceptionWrapper
    from signllava.errors import DataError
    from training import raise_everywhere
    said = "f.h5, video 'v', clip 'c': 1 non-finite values (NaN/Inf)"
    try:
        raise DataError(said)
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    try:
        wrapped.reraise()
    except DataError as e:
        failure = e
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(DataError) as raised:
            raise_everywhere(failure, world=2)          # the broadcast branch, whatever the group's size
        assert str(raised.value) == said
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
