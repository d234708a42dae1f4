"""A hostile or careless user (issue 25): nothing the user owns is destroyed, one run per output folder, huge
or broken inputs cost what they should and end in one line. Each test reproduces one probe at small scale.

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q tests/test_hostile.py
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from tests.kit import REPO, script_env, write_tiny_dataset


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (names relative to it) -> sha256 of its bytes: to prove nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(stderr: str) -> str:
    """The last line, which must be the house's `error: ...`, with no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") or ": error: " in line, line
    return line


@contextlib.contextmanager
def full_disk_after(n_bytes: int):
    """A file size limit stands in for a full disk: in this process, a write taking a file past `n_bytes` fails
    with EFBIG, as writes fail with ENOSPC on a full disk (the soft limit only: it is put back after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)      # else the kernel's signal ends the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


# ------------------------------------------------------------------------------ outputs: checked first, atomic
def scored_output(path: Path) -> Path:
    path.write_text(json.dumps({"v": {"clip_order": ["c1", "c2"],
                                      "c1": {"translation": "the cat eats", "hypothesis": "the cat eats"},
                                      "c2": {"translation": "a dog runs", "hypothesis": "a dog"}}}))
    return path


@pytest.mark.parametrize("flag", ["--output", "--report", "--metrics_out"])
def test_generate_checks_every_output_path_before_any_work(tmp_path, monkeypatch, capsys, flag):
    import generate
    monkeypatch.setattr(generate, "run", lambda args: pytest.fail("generation started"))
    (tmp_path / "a_file").write_text("mine")
    bad = {"--output": tmp_path, "--report": tmp_path / "a_file" / "r.html", "--metrics_out": tmp_path}[flag]
    argv = ["--checkpoint", tmp_path, "--data_dir", tmp_path, "--output", tmp_path / "o.json", flag, bad]
    with pytest.raises(SystemExit) as e:
        generate.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag} {bad}" in err and ("is a directory" in err or "is not a directory" in err), err
    assert (tmp_path / "a_file").read_text() == "mine"


def test_score_only_on_a_full_disk_keeps_the_hypotheses(tmp_path, capsys):
    """In place, a full disk left OUT.json truncated; now its rewrite fails whole, OUT.json stays byte-identical
    and no temporary is left."""
    import generate
    out = scored_output(tmp_path / "out.json")
    before = snapshot(tmp_path)
    with full_disk_after(100):
        code = generate.main(["--score_only", str(out)])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and f"{out}: not written (File too large" in err and "as it was" in err, err
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------ export never deletes
@pytest.fixture(scope="module")
def stage2_run(tmp_path_factory) -> Path:
    """A real (untrained) stage-2 run of one checkpoint: tiny Llama, LoRA r4, a pose projector."""
    import torch
    from model import SignConfig, assemble, load_tokenizer, save_projectors
    from signllava import checkpoint
    from tests.kit import build_tiny_llm, write_tiny_dataset
    root = tmp_path_factory.mktemp("export")
    data = write_tiny_dataset(root / "data", dims={"pose": 6}, videos_per_split={"train": 1}, clips_per_video=3)
    llm = str(build_tiny_llm(root / "llm", data))
    tok, added = load_tokenizer(llm)
    cfg = SignConfig(base_model=llm, tokenizer=llm, modalities=["pose"], dims={"pose": 6},
                     projector_types={"pose": "linear"}, stage=2, added_tokens=added, chat_template=tok.chat_template,
                     lora={"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear"},
                     modality_embeddings=True)
    model = assemble(cfg, tok, torch.device("cpu"), torch.float32, adapter="new")
    run = root / "run"
    ck = checkpoint.begin(run, 1)
    save_projectors(model.projector_state(), ck)
    model.llm.save_pretrained(str(ck / "adapter"))
    cfg.save(ck)
    checkpoint.write_state(ck, {"step": 1})
    checkpoint.commit(ck, 1, keep=0)
    return run


def export_cli(capsys, *argv) -> tuple[int, str]:
    import export
    code = export.main([str(a) for a in argv])
    return code, capsys.readouterr().err


def hidden_siblings(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_export_refuses_what_it_must_not_replace_before_merging(stage2_run, tmp_path, capsys, monkeypatch):
    import export
    monkeypatch.setattr(export, "load_llm", lambda *a, **k: pytest.fail("the merge started"))
    mine = tmp_path / "mine"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "thesis.txt").write_text("years of work")
    (mine / "config.json").write_text("{}")
    (tmp_path / "a_file").write_text("mine too")
    (tmp_path / "link").symlink_to(mine)
    before, run_before = snapshot(tmp_path), snapshot(stage2_run)
    cases = [(mine, "not empty and not an earlier export"), (tmp_path / "a_file", "exists and is not a directory"),
             (tmp_path / "link", "is a symbolic link"), (tmp_path / "a_file" / "sub", "is not a directory")]
    for out, why in cases:
        code, err = export_cli(capsys, "--checkpoint", stage2_run, "--output_dir", out)
        assert code == 2 and why in one_line(err), err
    # The stage-2 run itself, or a folder holding it: refused even with --overwrite.
    for out in (stage2_run, stage2_run.parent):
        code, err = export_cli(capsys, "--checkpoint", stage2_run, "--output_dir", out, "--overwrite")
        assert code == 2 and "holds or lies inside the checkpoint being exported" in one_line(err), err
    assert snapshot(tmp_path) == before and snapshot(stage2_run) == run_before
    assert hidden_siblings(tmp_path) == [] and hidden_siblings(stage2_run.parent) == []


def test_export_checks_its_metrics_files_before_merging(stage2_run, tmp_path, capsys, monkeypatch):
    """--metrics that is not a metrics JSON, or that scores another checkpoint, is one line before the merge: the
    card lists only the exported model's own scores."""
    import export
    monkeypatch.setattr(export, "load_llm", lambda *a, **k: pytest.fail("the merge started"))
    (tmp_path / "junk.json").write_text("not json")
    (tmp_path / "output.json").write_text(json.dumps({"v": {"clip_order": []}}))          # an --output, not metrics
    (tmp_path / "other.json").write_text(json.dumps({"bleu": 40.0, "checkpoint": str(tmp_path / "checkpoint-9")}))
    for name, why in (("junk.json", "not a metrics JSON of generate.py"), ("output.json", "no corpus BLEU in it"),
                      ("other.json", "not the checkpoint exported")):
        code, err = export_cli(capsys, "--checkpoint", stage2_run, "--output_dir", tmp_path / "out", "--metrics",
                               tmp_path / name)
        assert code == 2 and f"--metrics {tmp_path / name}: " in one_line(err) and why in err, err
    assert not (tmp_path / "out").exists() and hidden_siblings(tmp_path) == []


def test_export_replaces_an_earlier_export_and_a_folder_only_when_told(stage2_run, tmp_path, capsys):
    from signllava.checkpoint import resolve_checkpoint
    out = tmp_path / "merged"
    for _ in range(2):                            # the second replaces the first without being asked
        code, err = export_cli(capsys, "--checkpoint", stage2_run, "--output_dir", out, "--dtype", "fp32")
        assert code == 0, err
        assert {p.name for p in out.iterdir()} == {"config.json", "projectors.safetensors", "model", "README.md"}
    assert resolve_checkpoint(out) == out
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "old.txt").write_text("to go")
    code, err = export_cli(capsys, "--checkpoint", stage2_run, "--output_dir", mine, "--dtype", "fp32", "--overwrite")
    assert code == 0, err
    assert {p.name for p in mine.iterdir()} == {"config.json", "projectors.safetensors", "model", "README.md"}
    assert hidden_siblings(tmp_path) == []


# ------------------------------------------------------------------------------ one run per folder, manifests
def fake_checkpoint(out: Path, step: int, commit: bool = True) -> Path:
    from signllava import checkpoint
    tmp = checkpoint.begin(out, step)
    for name in (checkpoint.STATE_NAME, checkpoint.CONFIG_NAME, checkpoint.PROJECTORS_NAME):
        (tmp / name).write_text('{"step": %d}' % step)
    (tmp / "deepspeed").mkdir()
    (tmp / "deepspeed" / "optim_states.pt").write_bytes(b"x" * 1000)
    return checkpoint.commit(tmp, step, keep=0) if commit else tmp


HOLD = ("import sys; from pathlib import Path; from signllava.run_lock import hold; lock = hold(Path(sys.argv[1])); "
        "print('held', flush=True); sys.stdin.read()")


def test_a_second_run_on_a_folder_in_use_is_refused_and_touches_nothing(tmp_path, caplog):
    """The probe: a second `--resume` while the first was saving removed the first one's checkpoint-4.tmp."""
    from signllava.errors import RunError
    from signllava.run_lock import hold
    from tests.kit import train_args
    out = tmp_path / "run"
    fake_checkpoint(out, 2)
    fake_checkpoint(out, 4, commit=False)                # the first run's save, in progress
    holder = subprocess.Popen([sys.executable, "-c", HOLD, out], cwd=REPO, env=script_env(), text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(out)
        with pytest.raises(RunError, match=f"another run is using this output folder \\(pid {holder.pid} on "):
            hold(out)
        write_tiny_dataset(tmp_path / "data")            # a real dataset: the flags pass their checks
        res = subprocess.run([sys.executable, REPO / "pretrain.py", *map(str, train_args(tmp_path / "data",
                              tmp_path / "llm", out, 6, "--resume"))], cwd=REPO, env=script_env(),
                             capture_output=True, text=True, timeout=300)
        assert res.returncode == 2 and f"(pid {holder.pid} on " in one_line(res.stderr), res.stderr[-3000:]
        assert snapshot(out) == before and (out / "checkpoint-4.tmp").is_dir()
    finally:
        holder.kill()
        holder.wait()
    # The holder was killed: its lock is free, recognised as stale and taken over.
    caplog.set_level("INFO", logger="signllava")
    hold(out).release()
    assert f"taken over from pid {holder.pid} on" in caplog.text


def test_a_checkpoint_is_complete_only_while_its_manifest_agrees(tmp_path):
    import shutil
    from signllava import checkpoint
    out = tmp_path / "run"
    for step in (2, 4):
        fake_checkpoint(out, step)
    # The probe's incomplete checkpoint renamed into place by another process: no manifest, so invisible.
    os.replace(fake_checkpoint(out, 6, commit=False), out / "checkpoint-6")
    (out / "latest").unlink()
    assert [d.name for d in checkpoint.complete_checkpoints(out)] == ["checkpoint-2", "checkpoint-4"]
    assert checkpoint.latest_checkpoint(out).name == "checkpoint-4"
    # A file truncated or gone after the save: that checkpoint no longer counts.
    with open(out / "checkpoint-4" / "deepspeed" / "optim_states.pt", "r+b") as f:
        f.truncate(10)
    shutil.rmtree(out / "checkpoint-2" / "deepspeed")
    assert checkpoint.complete_checkpoints(out) == [] and checkpoint.latest_checkpoint(out) is None
    with pytest.raises(checkpoint.CheckpointError, match="deepspeed/optim_states.pt has 10 bytes, its manifest says 1000"):
        checkpoint.resolve_checkpoint(out / "checkpoint-4")


# ------------------------------------------------------------------------------ latest / best stay inside the run
@pytest.mark.parametrize("pointer", ["latest", "best"])
def test_pointers_name_only_a_complete_checkpoint_of_their_own_run(tmp_path, pointer):
    from signllava import checkpoint
    run, other = tmp_path / "run", tmp_path / "other_run"
    for step in (2, 4):
        fake_checkpoint(run, step)
    fake_checkpoint(other, 7)
    read = checkpoint.latest_checkpoint if pointer == "latest" else checkpoint.best_checkpoint
    bad = {"../other_run/checkpoint-7": "not a checkpoint of this run", str(other / "checkpoint-7"): "not a checkpoint",
           "checkpoint-9": "no such directory", "checkpoint-2/../../other_run/checkpoint-7": "not a checkpoint",
           "checkpoint-4 x" * 40: "not a checkpoint"}
    for text, why in bad.items():
        (run / pointer).write_text(text + "\n")
        for call in (lambda: read(run), lambda: checkpoint.resolve_checkpoint(run / pointer)):
            with pytest.raises(checkpoint.CheckpointError, match=why) as e:
                call()
            assert "\n" not in str(e.value) and len(str(e.value)) < 300
    (run / pointer).write_bytes(b"\xff\xfe")
    with pytest.raises(checkpoint.CheckpointError, match="unreadable"):
        read(run)
    (run / pointer).write_text("checkpoint-2\n")
    assert read(run).name == "checkpoint-2"


def test_resume_through_a_latest_out_of_the_run_is_refused_and_deletes_nothing(tmp_path):
    """The probe: `latest` holding ../other_run/checkpoint-7 resumed the other run, whose rotation then deleted
    this run's newer checkpoint. Now the run stops at its start, before anything of OUTPUT_DIR is touched."""
    import argparse
    from signllava.checkpoint import CheckpointError
    from training import prepare_output
    run = tmp_path / "run"
    fake_checkpoint(run, 4)
    fake_checkpoint(tmp_path / "other_run", 7)
    (run / "latest").write_text("../other_run/checkpoint-7\n")
    (run / "checkpoint-5.tmp").mkdir()             # what an interrupted save left: not removed before the refusal
    before = snapshot(tmp_path)
    with pytest.raises(CheckpointError, match="names '../other_run/checkpoint-7', not a checkpoint of this run"):
        prepare_output(argparse.Namespace(resume=True, overwrite_output_dir=False), run)
    after = snapshot(tmp_path)
    assert after.pop("run/run.lock") and after == before and (run / "checkpoint-5.tmp").is_dir()


# ------------------------------------------------------------------------------ reads bounded by the frame cap
HUGE = 2_000_000          # frames of the planted clip: 24 MB as float16 [T, 6] if read whole


@pytest.fixture(scope="module")
def builder(tok):
    from signllava.prompts import PromptBuilder, special_ids
    ids = special_ids(tok)
    return PromptBuilder(tok, ids["markers"], ids["pad"])


def plant_clip(data: Path, frames: int, dim: int = 6, split: str = "train", modality: str = "pose") -> tuple[str, str]:
    """Replace one clip of the tiny dataset by a [frames, dim] gzip-chunked array with no chunk written: a tiny
    file that reads as zeros, like the probe's 316 KB shard holding a (2,000,000, 768) clip."""
    import h5py
    ann = json.loads((data / f"annotation.{split}.json").read_text())
    video = sorted(ann)[0]
    clip = ann[video]["clip_order"][0]
    shard = json.loads((data / modality / f"metadata_{modality}.{split}.json").read_text())[video]
    path = data / modality / f"{modality}.{split}.{shard}.h5"
    with h5py.File(path, "a") as h:
        del h[video][clip]
        h[video].create_dataset(clip, shape=(frames, dim), dtype="f2", chunks=(4096, dim), compression="gzip")
    assert path.stat().st_size < 1 << 20
    return video, clip


def peak_bytes(fn) -> int:
    import tracemalloc
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_max_frames_reads_only_the_frames_it_keeps(tmp_path, builder, monkeypatch):
    from data import DataOptions, SignDataset
    from signllava.errors import DataError
    from tests.kit import write_tiny_dataset
    data = write_tiny_dataset(tmp_path / "d", dims={"pose": 6}, videos_per_split={"train": 1}, clips_per_video=3,
                              missing={})
    video, clip = plant_clip(data, HUGE)
    def read_capped(mode: str) -> int:
        ds = SignDataset(data, "train", builder, DataOptions(max_frames={"*": 8}, frame_cap=mode), train=True)
        i = next(k for k, (v, c, _) in enumerate(ds.items) if (v, c) == (video, clip))
        item = {}
        peak = peak_bytes(lambda: item.update(ds[i]))
        assert item["features"][0].shape == (8, 6)
        return peak
    assert read_capped("stride") < 2 << 20 and read_capped("truncate") < 2 << 20       # whole: 24 MB and more
    # Uncapped (or pooled, which reads every frame), such a clip is refused by name from the index.
    for opts in (DataOptions(), DataOptions(max_frames={"*": 8}, frame_cap="pool")):
        with pytest.raises(DataError, match=f"video '{video}', clip '{clip}': 2,000,000 pose frames, beyond any "
                                            f"plausible clip"):
            SignDataset(data, "train", builder, opts, train=True)
    # Pool over a long clip that is let through reads it in blocks (here 1 MB), never whole.
    monkeypatch.setattr("data.PLAUSIBLE_FRAMES", 10 * HUGE)
    monkeypatch.setattr("signllava.frames.READ_BYTES", 1 << 20)
    assert read_capped("pool") < 8 << 20


def test_checker_flags_absurd_lengths_and_index_overflow_without_reading_them(tmp_path, builder, capsys):
    from data import DataOptions, SignDataset
    from signllava.datacheck import check_dataset
    from signllava.errors import DataError
    from tests.kit import write_tiny_dataset
    data = write_tiny_dataset(tmp_path / "d", dims={"pose": 6}, videos_per_split={"train": 1, "dev": 1},
                              clips_per_video=3, missing={})
    video, clip = plant_clip(data, HUGE)
    dev_video, dev_clip = plant_clip(data, 3_000_000_000, split="dev")     # beyond the index's int32 counts
    assert check_dataset(data, None, None) == 1
    out = capsys.readouterr().out
    assert f"clip '{clip}': 2,000,000 frames, beyond any plausible clip" in out, out
    assert f"clip '{dev_clip}': 3,000,000,000 frames, beyond any plausible clip" in out, out
    with pytest.raises(DataError, match=f"clip '{dev_clip}': 3,000,000,000 frames, more than any clip can have"):
        SignDataset(data, "dev", builder, DataOptions(max_frames={"*": 8}), train=False)


# ------------------------------------------------------------------------------ config files: bounded
def config_error(tmp_path, capsys, name: str, text: str | bytes) -> str:
    import argparse
    from signllava.config import add_config_arg, parse_args
    p = argparse.ArgumentParser(prog="pretrain.py")
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--frame_cap", choices=["stride", "pool"])
    add_config_arg(p)
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(SystemExit) as e:
        parse_args(p, ["--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err) < 1000 and err.strip().splitlines()[-1].startswith("pretrain.py: error: "), err[:1000]
    return err.strip().splitlines()[-1]          # argparse's usage, then one line


def nested_aliases(levels: int, width: int = 9) -> str:
    """One flag's value of `levels` nested anchors, each level `width` aliases of the one below: width**levels
    leaves in a file of a few hundred bytes (the probe's 421-byte file: a 351 MB error line)."""
    value = "&a0 [" + ", ".join(["1"] * width) + "]"
    for k in range(1, levels):
        value = f"&a{k} [{value}, " + ", ".join([f"*a{k - 1}"] * (width - 1)) + "]"
    return f"learning_rate: {value}\n"


def test_config_values_in_messages_are_cut_and_files_are_capped(tmp_path, capsys):
    bomb = nested_aliases(6)                                       # 531,441 values
    assert len(bomb) < 500
    err = config_error(tmp_path, capsys, "bomb.yaml", bomb)
    assert "expands to more than 10,000 values" in err, err
    err = config_error(tmp_path, capsys, "small.yaml", nested_aliases(3))      # 729 values: under the cap
    assert "learning_rate: expected a single value, got [[[...], [...]," in err, err
    err = config_error(tmp_path, capsys, "choice.yaml", "frame_cap: " + "x" * 5000 + "\n")
    assert "frame_cap: 'xxxx" in err and "is not one of stride, pool" in err, err
    err = config_error(tmp_path, capsys, "keys.yaml", "".join(f"k{i}{'y' * 300}: 1\n" for i in range(50)))
    assert "unknown key(s)" in err and "and 45 more" in err, err
    err = config_error(tmp_path, capsys, "huge.yaml", "# padding\n" * 120_000)
    assert "larger than 1 MiB" in err, err
    err = config_error(tmp_path, capsys, "deep.yaml", "learning_rate: " + "[" * 50_000 + "]" * 50_000 + "\n")
    assert "cannot read it" in err, err


# ------------------------------------------------------------------------------ one line, never a traceback
def test_bad_shard_names_and_lone_surrogates_are_faults_listed_and_one_line_errors(tmp_path, builder, capsys):
    from data import DataOptions, SignDataset
    from signllava.datacheck import check_dataset
    from signllava.errors import DataError
    from tests.kit import write_tiny_dataset
    data = write_tiny_dataset(tmp_path / "d", dims={"pose": 6}, videos_per_split={"train": 3, "dev": 1},
                              clips_per_video=3, missing={})
    meta = data / "pose" / "metadata_pose.train.json"
    shards = json.loads(meta.read_text())
    shards.update(trainvid0="../x", trainvid1="a/b")
    meta.write_text(json.dumps(shards))
    ann_path = data / "annotation.dev.json"
    ann = json.loads(ann_path.read_text())
    ann["devvid0"]["devvid0_1"]["translation"] = "the cat \ud800"         # json.dumps writes it as \\ud800
    ann["devvid0"]["devvid0_2"]["paraphrases"] = ["\udcff"]
    ann_path.write_text(json.dumps(ann))
    assert check_dataset(data, None, None) == 1
    out = capsys.readouterr().out
    for video, shard in (("trainvid0", "../x"), ("trainvid1", "a/b")):
        assert f"video '{video}': malformed metadata (shard '{shard}' is not a plain name" in out, out
    assert "clip 'devvid0_1': translation not valid Unicode" in out and "clip 'devvid0_2': paraphrases not" in out, out
    with pytest.raises(DataError, match="video 'trainvid0': malformed metadata \\(shard '../x' is not a plain name"):
        SignDataset(data, "train", builder, DataOptions(), train=True)
    with pytest.raises(DataError, match="clip 'devvid0_1': translation not valid Unicode"):
        SignDataset(data, "dev", builder, DataOptions(), train=False)


def test_index_cache_with_a_field_of_the_wrong_shape_is_rebuilt(tmp_path, builder, caplog):
    import numpy as np
    from data import DataOptions, SignDataset
    from signllava.shard_index import cache_path
    from tests.kit import write_tiny_dataset
    data = write_tiny_dataset(tmp_path / "d", dims={"pose": 6}, videos_per_split={"train": 2}, clips_per_video=3)
    first = SignDataset(data, "train", builder, DataOptions(), train=True)
    cache = cache_path(first.stores["pose"].metadata)
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["format"] = np.array([1, 1])
    with open(cache, "wb") as f:
        np.savez(f, **arrays)
    caplog.set_level("WARNING", logger="signllava")
    again = SignDataset(data, "train", builder, DataOptions(), train=True)
    assert "unreadable index cache" in caplog.text and np.array_equal(again.frames, first.frames)


def test_output_dir_that_is_a_file_is_a_usage_error(tmp_path, capsys):
    import pretrain
    (tmp_path / "out").write_text("mine")
    (tmp_path / "data").mkdir()
    for out in (tmp_path / "out", tmp_path / "out" / "run"):
        with pytest.raises(SystemExit) as e:
            pretrain.main(["--data_dir", str(tmp_path / "data"), "--output_dir", str(out)])
        assert e.value.code == 2
        assert f"--output_dir {out}: " in capsys.readouterr().err.strip().splitlines()[-1]
    assert (tmp_path / "out").read_text() == "mine"


BAD_CONFIGS = {"no base model": ({"base_model": None}, "no 'base_model'"),
               "modalities 5": ({"modalities": 5}, "modalities 5: expected a list of distinct modality names"),
               "bits 8": ({"bits": 8}, "bits 8: expected 4 or 16"),
               "unknown projector": ({"projector_types": {"pose": "mlp2x_relu"}}, "projector_types {'pose': 'mlp2x_relu'}"),
               "dims as text": ({"dims": {"pose": "6"}}, "dims {'pose': '6'}: expected a positive feature dim"),
               "a list": (None, "not a Sign LLaVA config (format 'list')")}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_checkpoint_config_of_wrong_shape_is_one_line(tmp_path, capsys, case):
    import generate
    from model import SignConfig
    change, why = BAD_CONFIGS[case]
    ck = tmp_path / "ck"
    ck.mkdir()
    SignConfig(base_model="x", tokenizer="x", modalities=["pose"], dims={"pose": 6},
               projector_types={"pose": "linear"}).save(ck)
    raw = json.loads((ck / "config.json").read_text())
    raw = [raw] if change is None else {k: v for k, v in {**raw, **change}.items() if v is not None}
    (ck / "config.json").write_text(json.dumps(raw))
    (ck / "projectors.safetensors").write_bytes(b"")
    data = write_tiny_dataset(tmp_path / "data")
    code = generate.main(["--checkpoint", str(ck), "--data_dir", str(data), "--output", str(tmp_path / "o.json")])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and f"{ck / 'config.json'}: " in err and why in err, err


BAD_OUTPUTS = {"a list": ([{"v": {"clip_order": []}}], "not an output of generate.py"),
               "a number as hypothesis": ({"v": {"clip_order": ["c"], "c": {"translation": "a", "hypothesis": 5}}},
                                          "video 'v' clip 'c': hypothesis is 5, not text"),
               "no translation": ({"v": {"clip_order": ["c"], "c": {"hypothesis": "a"}}},
                                  "video 'v' clip 'c': translation is None, not text"),
               "a list in clip_order": ({"v": {"clip_order": [["c"]], "c": {}}}, "clip ['c']: named in clip_order but"),
               "a lone surrogate": ({"v": {"clip_order": ["c"], "c": {"translation": "a", "hypothesis": "\ud800"}}},
                                    "hypothesis is '\\ud800', not text"),
               "no clip": ({"v": {"clip_order": []}}, "holds no clip"),
               "a clip twice": ({"v": {"clip_order": ["c", "c"], "c": {"translation": "a", "hypothesis": "a"}}},
                                "video 'v' clip 'c': listed twice in clip_order")}


@pytest.mark.parametrize("case", sorted(BAD_OUTPUTS))
def test_score_only_on_a_malformed_output_is_one_line_and_leaves_it(tmp_path, capsys, case):
    import generate
    content, why = BAD_OUTPUTS[case]
    path = tmp_path / "out.json"
    path.write_text(json.dumps(content))
    before = snapshot(tmp_path)
    code = generate.main(["--score_only", str(path)])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and f"--score_only {path}: " in err and why in err, err
    assert snapshot(tmp_path) == before


def test_score_only_keeps_only_how_this_very_output_was_generated(tmp_path, capsys):
    """--score_only with --metrics_out on an earlier metrics file: only its generation settings are kept, and only
    when it describes this output; its interval (and any score not recomputed) never outlives the scores."""
    import generate
    out = tmp_path / "out.json"
    out.write_text(json.dumps({"v": {"clip_order": ["c", "d"], "c": {"translation": "a red cat", "hypothesis": ""},
                                     "d": {"translation": "the dog runs", "hypothesis": ""}}}))
    stale = {"bleu": 97.4, "ci95": {"bleu": {"mean": 97.45, "pm": 4.23}}, "bleurt": 0.9, "n": 20,
             "checkpoint": "/runs/s2/checkpoint-300", "num_beams": 5}
    metrics = tmp_path / "m.json"
    for described, kept in ((str(tmp_path / "another.json"), False), (str(out), True)):
        metrics.write_text(json.dumps({**stale, "output": described}))
        assert generate.main(["--score_only", str(out), "--metrics_out", str(metrics), "--bootstrap", "0"]) == 0
        m = json.loads(metrics.read_text())
        assert m["n"] == 2 and m["bleu"] == 0 and "ci95" not in m and "bleurt" not in m, m
        assert m["output"] == str(out.resolve())
        assert ("checkpoint" in m and m["num_beams"] == 5) is kept, m
    assert "μ" not in capsys.readouterr().out                                 # no interval printed either


def test_a_full_disk_while_the_embedded_base_model_is_written_is_one_line_and_leaves_nothing(tmp_path):
    """The tiny Llama's weights (megabytes) meet a disk that takes 300 kB: one line, no base_model, no temporary."""
    from pretrain import write_embedded_base
    from signllava.errors import RunError
    from tests.kit import write_tiny_dataset
    data = write_tiny_dataset(tmp_path / "d", dims={"pose": 6}, videos_per_split={"train": 2}, clips_per_video=3)
    out = tmp_path / "run"
    out.mkdir()
    with pytest.raises(RunError) as e, full_disk_after(300_000):
        write_embedded_base(out / "base_model", data / "annotation.train.json", seed=0)
    err = str(e.value)
    assert f"{out / 'base_model'}: the embedded base model could not be written (" in err and "File too large" in err
    assert "\n" not in err and list(out.iterdir()) == []


# ------------------------------------------------------------------------------ weights that cannot be right
@pytest.mark.parametrize("kind", ["int64", "bool", "nan", "inf"])
def test_non_float_or_non_finite_weights_are_refused_naming_file_and_tensor(tmp_path, kind):
    import torch
    from safetensors.torch import save_file
    from model import read_projector_file
    from signllava.errors import CheckpointError
    bad = {"int64": torch.ones(4, 3, dtype=torch.int64), "bool": torch.ones(4, 3, dtype=torch.bool),
           "nan": torch.tensor([[0.5, float("nan"), 1.0]]), "inf": torch.tensor([float("-inf"), 1.0])}[kind]
    path = tmp_path / "projectors.safetensors"
    save_file({"projectors.pose.bias": torch.zeros(3), "projectors.pose.weight": bad}, str(path))
    why = "trained weights are floating point" if kind in ("int64", "bool") else "1 non-finite values"
    with pytest.raises(CheckpointError, match=f"{path}: tensor 'projectors.pose.weight' .*{why}"):
        read_projector_file(path)


def test_generate_with_nan_projectors_is_one_line_not_empty_hypotheses(stage2_run, tmp_path, capsys):
    """The probe: NaN projector weights gave an empty hypothesis for every clip and exit status 0."""
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    import generate
    run = tmp_path / "run"
    shutil.copytree(stage2_run, run)
    weights = run / "checkpoint-1" / "projectors.safetensors"
    state = load_file(str(weights))
    state["projectors.pose.weight"][0, 0] = float("nan")
    save_file(state, str(weights))                        # same size: its manifest still agrees
    out = tmp_path / "o.json"
    code = generate.main(["--checkpoint", str(run), "--data_dir", str(stage2_run.parent / "data"), "--split", "train",
                          "--output", str(out), "--num_workers", "0", "--num_beams", "1", "--max_new_tokens", "2"])
    err = one_line(capsys.readouterr().err)
    assert code == 2 and f"{weights}: tensor 'projectors.pose.weight' holds 1 non-finite values" in err, err
    assert not out.exists()


# ------------------------------------------------------------------------------ the index cache is not fooled
def test_index_cache_sees_a_same_size_rewrite_an_edit_and_a_forged_cache(tmp_path, builder, caplog):
    import h5py
    import numpy as np
    from data import DataOptions, SignDataset
    from signllava.errors import DataError
    from signllava.shard_index import ClipIndex, cache_path, fingerprint, save_cache
    from tests.kit import write_tiny_dataset
    data = write_tiny_dataset(tmp_path / "d", dims={"pose": 6}, videos_per_split={"train": 1}, clips_per_video=3,
                              missing={})
    shard = data / "pose" / "pose.train.0.h5"
    with h5py.File(shard, "a") as h:                   # a clip whose length lives in its header only
        del h["trainvid0"]["trainvid0_1"]
        h["trainvid0"].create_dataset("trainvid0_1", shape=(10, 6), maxshape=(None, 6), chunks=(4, 6), dtype="f2")

    def frames_of(clip="trainvid0_1"):
        ds = SignDataset(data, "train", builder, DataOptions(), train=True)
        return ds, int(ds.frames[[c for _, c, _ in ds.items].index(clip), 0])
    assert frames_of()[1] == 10
    # Rewritten to the same size with its modification time put back: the status-change time still moved.
    st = shard.stat()
    with h5py.File(shard, "a") as h:
        h["trainvid0"]["trainvid0_1"].resize((12, 6))
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (shard.stat().st_size, shard.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert frames_of()[1] == 12
    # The cache edited to claim another count, its key kept: its digest no longer agrees.
    cache = cache_path(data / "pose" / "metadata_pose.train.json")
    with np.load(cache) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["frames"] = arrays["frames"] + 1
    with open(cache, "wb") as f:
        np.savez(f, **arrays)
    caplog.set_level("WARNING", logger="signllava")
    assert frames_of()[1] == 12 and "does not match its digest" in caplog.text
    # A cache forged whole, digest and all: what the loader reads is checked against it, and it goes.
    meta = data / "pose" / "metadata_pose.train.json"
    good = ClipIndex(arrays["keys"], arrays["frames"] - 1)
    save_cache(cache, fingerprint(meta, [shard]), ClipIndex(good.keys, good.frames + 5))
    ds, claimed = frames_of()
    assert claimed == 17
    with pytest.raises(DataError, match="clip 'trainvid0_1': 12 frames in the shard, 17 in the index: the shard "
                                        "changed after it was indexed"):
        ds[[c for _, c, _ in ds.items].index("trainvid0_1")]
    assert not cache.exists() and frames_of()[1] == 12


def test_make_demo_replaces_an_earlier_demo_and_refuses_a_folder_of_the_users(tmp_path, capsys):
    import data as data_cli
    from signllava.demo import write_demo
    small = dict(n_train_videos=2, n_dev_videos=1, n_test_videos=1)
    demo = write_demo(tmp_path / "demo", **small)
    first = snapshot(demo)
    write_demo(demo, seed=1, **small)                              # an earlier demo: replaced whole
    assert snapshot(demo).keys() == first.keys() and snapshot(demo) != first
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "annotation.train.json").write_text("my own annotations")
    (mine / "thesis.txt").write_text("years of work")
    before = snapshot(tmp_path)
    assert data_cli.main(["--make_demo", str(mine)]) == 2
    assert "not empty and not an earlier demo" in one_line(capsys.readouterr().err)
    assert snapshot(tmp_path) == before and hidden_siblings(tmp_path) == []
