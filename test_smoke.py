"""Stage 1 end to end on CPU: `python test_smoke.py` or `pytest test_smoke.py`.

Tiny dataset (three modalities at odd dims, several shards, text-ordered clip names, clips missing from
one modality) and a tiny Llama; stage 1 under ZeRO-2 through the deepspeed launcher and under ZeRO-3;
the checkpoint holds only trainable weights and reloads exactly; exact resume after SIGKILL; a kill
in the middle of a save leaves the previous checkpoint in charge; prompt ids and label mask; errors.
"""
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.kit import build_tiny_llm, run_script, script_env, train_args, write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    data = write_tiny_dataset(root / "data")
    llm = build_tiny_llm(root / "llm", data)
    return root, data, llm


def load_tok(llm):
    from model import load_tokenizer
    return load_tokenizer(str(llm))[0]


# ------------------------------------------------------------------------------------------ prompt
def test_prompt_ids_and_label_mask(tiny):
    from signllava.prompts import PromptBuilder, SYSTEM_PROMPT, TRANSLATE, special_ids
    _, _, llm = tiny
    tok = load_tok(llm)
    ids = special_ids(tok)
    start, end = ids["markers"]
    b = PromptBuilder(tok, ids["markers"], ids["pad"])
    input_ids, labels, seg = b.build([3, 2], TRANSLATE, "the cat runs")
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]
    tid = tok.convert_tokens_to_ids
    head = lambda role: [tid("<|start_header_id|>"), *enc(role), tid("<|end_header_id|>"), *enc("\n\n")]
    expected = ([tid("<|begin_of_text|>")] + head("system") + enc(SYSTEM_PROMPT) + [tid("<|eot_id|>")]
                + head("user") + [start, ids["pad"], ids["pad"], ids["pad"], end, start, ids["pad"], ids["pad"], end]
                + enc("\n" + TRANSLATE) + [tid("<|eot_id|>")] + head("assistant"))
    answer = enc("the cat runs") + [tid("<|eot_id|>")]
    assert input_ids.tolist() == expected + answer
    assert labels.tolist() == [-100] * len(expected) + answer          # loss on answer + end of turn only
    assert seg.tolist().count(0) == 3 and seg.tolist().count(1) == 2
    assert all(input_ids[seg == 0] == ids["pad"])
    # the generation prompt is exactly the training prompt up to the assistant header
    gen_ids, gen_labels, _ = b.build([3, 2], TRANSLATE, None)
    assert gen_ids.tolist() == expected and set(gen_labels.tolist()) == {-100}


def test_dataset_reads_layout(tiny):
    from data import DataOptions, SignDataset
    from signllava.prompts import PromptBuilder, special_ids
    _, data, llm = tiny
    tok = load_tok(llm)
    ids = special_ids(tok)
    ds = SignDataset(data, "train", PromptBuilder(tok, ids["markers"], ids["pad"]), DataOptions(), train=True)
    assert ds.modalities == ["mae", "dino", "pose"]                      # splice order, subset of four
    assert ds.dims == {"mae": 12, "dino": 9, "pose": 6}                  # read from the data
    assert len(ds) == 4 * 11 - 2                                         # two clips lack pose
    assert ds.annotation.videos["trainvid0"][:3] == ["trainvid0_0", "trainvid0_1", "trainvid0_2"]  # natural order
    item = ds[0]
    assert [len(f) for f in item["features"]] == [int((item["segments"] == k).sum()) for k in range(3)]


# ------------------------------------------------------------------------------------------ stage 1
def module_keys(ckpt: Path) -> list[str]:
    states = torch.load(ckpt / "deepspeed" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
    return list(states["module"])


def test_stage1_zero2_launcher_checkpoint_and_reload(tiny):
    root, data, llm = tiny
    out = root / "s1z2"
    run_script("pretrain.py", *train_args(data, llm, out, 6, "--save_steps", 3, "--profile_steps", "4:6"),
               launcher=True)
    assert (out / "latest").read_text().strip() == "checkpoint-6"
    # --profile_steps: steps 5 and 6 recorded (host only on a CPU), the projectors' matmuls among the operators
    prof = json.loads((out / "profile" / "summary.json").read_text())
    assert prof["steps"] == 2 and prof["wall_s_per_step"] > 0 and "device_busy_fraction" not in prof
    assert "aten::mm" in (out / "profile" / "ops.txt").read_text()
    assert json.loads((out / "profile" / "trace.json").read_text())["traceEvents"]
    from signllava.step_profiler import covered          # device busy time: overlapping kernels count once
    assert covered([(0, 4), (2, 6), (10, 11), (3, 5)]) == 7 and covered([]) == 0
    ck = out / "checkpoint-6"
    # Only trainable tensors are saved: projectors and the two marker rows, never a frozen LLM weight.
    for keys in (module_keys(ck), list(load_file(str(ck / "projectors.safetensors")))):
        assert keys and all(k.startswith(("projectors.", "marker_embed.")) for k in keys), keys
    assert sorted({k.split(".")[1] for k in module_keys(ck) if k.startswith("projectors.")}) == ["dino", "mae", "pose"]
    # The portable files rebuild the model without any of the original flags, exactly.
    from model import SignConfig, assemble, load_tokenizer, read_projector_file
    cfg = SignConfig.load(ck)
    tok, _ = load_tokenizer(cfg.tokenizer)
    model = assemble(cfg, tok, torch.device("cpu"), torch.float32)
    saved = read_projector_file(ck / "projectors.safetensors")
    before = {k: v.clone() for k, v in model.projector_state().items()}
    model.load_projector_state(saved, "test")
    for k, v in model.projector_state().items():
        assert torch.equal(v, saved[k]), k
    assert any(not torch.equal(before[k], saved[k]) for k in saved)    # training moved them
    losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert len(losses) == 6


def test_stage1_zero3(tiny):
    root, data, llm = tiny
    out = root / "s1z3"
    run_script("pretrain.py", *train_args(data, llm, out, 3, "--save_steps", 3, zero=3))
    saved = load_file(str(out / "checkpoint-3" / "projectors.safetensors"))
    assert saved["projectors.mae.0.weight"].shape == (64, 12)            # gathered, not ZeRO-3 placeholders
    assert saved["marker_embed.weight"].shape == (2, 64)


def test_loss_falls_on_fixed_batch(tiny):
    from data import Collator, DataOptions, SignDataset
    from model import SignConfig, assemble
    from signllava.prompts import PromptBuilder, special_ids
    _, data, llm = tiny
    tok = load_tok(llm)
    ids = special_ids(tok)
    ds = SignDataset(data, "train", PromptBuilder(tok, ids["markers"], ids["pad"]), DataOptions(), train=True)
    cfg = SignConfig(str(llm), str(llm), ds.modalities, ds.dims, {m: "mlp2x_gelu" for m in ds.modalities})
    torch.manual_seed(0)
    model = assemble(cfg, tok, torch.device("cpu"), torch.float32)
    batch = Collator(ids["pad"])([ds[i] for i in range(6)])
    batch.pop("meta")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(30):
        loss, n = model(**batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append((loss / n).item())
    # Only projectors and two marker rows learn in front of a random frozen LLM whose logits are nearly
    # flat (about ln |vocab|): the fall is steady but modest. Frozen projectors would give a flat line.
    assert losses[-1] < losses[0] - 0.1 and losses[-1] == min(losses), losses
    assert all(not p.requires_grad for p in model.llm.parameters())     # the LLM stays frozen


# ------------------------------------------------------------------------------------------ crash safety
def final_projectors(out: Path) -> dict:
    return load_file(str(out / "checkpoint-8" / "projectors.safetensors"))


def test_exact_resume_after_sigkill_and_kill_during_save(tiny):
    root, data, llm = tiny
    common = ("--save_steps", 2, "--num_workers", 1)
    ref = root / "resume_ref"
    run_script("pretrain.py", *train_args(data, llm, ref, 8, *common))

    # SIGKILL right after checkpoint-4 is complete, then --resume.
    out = root / "resume_kill"
    res = run_script("pretrain.py", *train_args(data, llm, out, 8, *common), env=script_env(SIGNLLAVA_FAULT="after_save:4"), check=False)
    assert res.returncode == -9 and (out / "latest").read_text().strip() == "checkpoint-4"
    assert not (out / "checkpoint-6").exists()
    run_script("pretrain.py", *train_args(data, llm, out, 8, *common, "--resume"))
    a, b = final_projectors(ref), final_projectors(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5

    # SIGKILL in the middle of saving checkpoint-6: it must not count; checkpoint-4 stays in charge.
    out = root / "resume_midsave"
    res = run_script("pretrain.py", *train_args(data, llm, out, 8, *common), env=script_env(SIGNLLAVA_FAULT="mid_save:6"), check=False)
    assert res.returncode == -9
    assert (out / "checkpoint-6.tmp").is_dir() and not (out / "checkpoint-6").exists()
    from signllava.checkpoint import latest_checkpoint, resolve_checkpoint
    assert latest_checkpoint(out).name == "checkpoint-4" and resolve_checkpoint(out).name == "checkpoint-4"
    with pytest.raises(Exception, match="incomplete"):
        resolve_checkpoint(out / "checkpoint-6.tmp")
    res = run_script("pretrain.py", *train_args(data, llm, out, 8, *common, "--resume"))
    assert f"removed {out / 'checkpoint-6.tmp'}, left by an interrupted save" in res.stderr
    b = final_projectors(out)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_exact_resume_under_token_budget(tiny):
    """--max_tokens_per_batch: epochs of different lengths (seed 48, budget 600, no grouping: 11, 10, 10
    steps), SIGKILL after checkpoint-22 (epoch 2, one step in; dividing by epoch 0's 11 steps would put it at
    the start of epoch 2), then --resume must give the weights of the uninterrupted 30-step run."""
    from data import DataOptions, SignDataset
    from signllava.prompts import PromptBuilder, special_ids
    from training import EpochPlans, prompt_tokens
    root, data, llm = tiny
    tok = load_tok(llm)
    ids = special_ids(tok)
    builder = PromptBuilder(tok, ids["markers"], ids["pad"])
    ds = SignDataset(data, "train", builder, DataOptions(), train=True)
    plans = EpochPlans(np.asarray([ds.length(i) for i in range(len(ds))]), 4, 48, False, 600, 1,
                       prompt_tokens(builder, len(ds.modalities)))
    assert [plans.steps(e) for e in range(3)] == [11, 10, 10] and plans.locate(22) == (2, 1)

    # Padded (--no_packing): a padded budget makes epochs of different step counts; a packed one is regular.
    common = ("--max_tokens_per_batch", 600, "--no_group_by_length", "--seed", 48, "--save_steps", 11,
              "--min_lr_ratio", 0.5, "--no_packing")
    ref, out = root / "budget_ref", root / "budget_kill"
    run_script("pretrain.py", *train_args(data, llm, ref, 30, *common))
    res = run_script("pretrain.py", *train_args(data, llm, out, 30, *common), env=script_env(SIGNLLAVA_FAULT="after_save:22"),
                     check=False)
    assert res.returncode == -9 and (out / "latest").read_text().strip() == "checkpoint-22"
    run_script("pretrain.py", *train_args(data, llm, out, 30, *common, "--resume"))
    a = load_file(str(ref / "checkpoint-30" / "projectors.safetensors"))
    b = load_file(str(out / "checkpoint-30" / "projectors.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    # The flag is part of the data position: resuming without it (a fixed-batch plan) is refused.
    res = run_script("pretrain.py", *train_args(data, llm, out, 40, "--seed", 48, "--resume", "--no_packing"), check=False)
    assert res.returncode == 2 and "token budget 600" in res.stderr and "Traceback" not in res.stderr
    # So is packing under a budget: it counts tokens differently, so it plans other batches.
    res = run_script("pretrain.py", *train_args(data, llm, out, 40, *common[:-1], "--resume"), check=False)
    assert res.returncode == 2 and "padded token budget 600" in res.stderr and "packed token budget 600" in res.stderr
    # A learning rate or a modality set other than the run's: the checkpoint's optimizer and modules would
    # silently win (DeepSpeed loads its param groups over the flags'), so each is refused in one line.
    for flags, said in ((("--learning_rate", 0.05), "--learning_rate 0.05 (the run: 0.003)"),
                        (("--modalities", "mae"), "modalities ['mae'] (the run: ")):
        res = run_script("pretrain.py", *train_args(data, llm, out, 40, *common, "--resume", *flags), check=False)
        err = res.stderr.strip().splitlines()[-1]
        assert res.returncode == 2 and err.startswith("error: ") and said in err and "Traceback" not in res.stderr, err


def test_packed_and_padded_training_give_the_same_run(tiny):
    """Training's default (packed rows) and --no_packing: the same batches, the same losses and weights."""
    root, data, llm = tiny
    runs = {}
    for name, extra in (("packed", ()), ("padded", ("--no_packing",))):
        out = root / f"pack_{name}"
        run_script("pretrain.py", *train_args(data, llm, out, 4, "--save_steps", 4, *extra))
        losses = [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
        runs[name] = losses, load_file(str(out / "checkpoint-4" / "projectors.safetensors"))
    assert len(runs["packed"][0]) == 4 and runs["packed"][0] == pytest.approx(runs["padded"][0], rel=1e-5)
    a, b = runs["packed"][1], runs["padded"][1]
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_unseen_layout_trains_with_only_data_dir(tiny):
    """Odd dims, a subset of modalities, shards, text-ordered names, missing clips: nothing but --data_dir
    (and where to write); the embedded LLM and tokenizer are built from this data's sentences."""
    root, data, _ = tiny
    out = root / "only_data_dir"
    res = run_script("pretrain.py", "--data_dir", data, "--output_dir", out, "--max_steps", 2, "--num_workers", 0)
    assert "2 of 44 clips have no pose features" in res.stderr and "sorted naturally" in res.stderr
    cfg = json.loads((out / "checkpoint-2" / "config.json").read_text())
    assert cfg["dims"] == {"mae": 12, "dino": 9, "pose": 6} and cfg["base_model"] == "../base_model"


# ------------------------------------------------------------------------------------------ errors
def test_resume_refuses_code_in_deepspeed_state(tiny, tmp_path):
    """DeepSpeed reads its own optimizer-state file on --resume; one carrying an object whose unpickling
    runs a command is refused (one line naming the file and the callable) and the command never runs."""
    import shutil
    from signllava import safe_load
    from tests.kit import Payload
    root, data, llm = tiny
    s1 = root / "s1z2"
    if not (s1 / "latest").exists():
        run_script("pretrain.py", *train_args(data, llm, s1, 2, "--save_steps", 2))
    out = tmp_path / "run"
    shutil.copytree(s1, out)
    ck = out / (out / "latest").read_text().strip()
    optim = ck / "deepspeed" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    marker = tmp_path / "pwned"
    torch.save({**safe_load.load(optim, allow=safe_load.deepspeed_types()), "extra": Payload(marker)}, optim)
    # Whoever can plant the file can rewrite the size manifest too: what must stop it is the unpickler.
    from signllava.checkpoint import write_manifest
    write_manifest(ck)
    res = run_script("pretrain.py", *train_args(data, llm, out, 99, "--resume"), check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-3000:]
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith(f"error: {optim}: needs posix.system") and "refused" in err, err
    assert not marker.exists()


def test_dims_mismatch_is_one_clear_line(tiny):
    root, data, llm = tiny
    other = write_tiny_dataset(root / "otherdims", dims={"mae": 7, "dino": 9, "pose": 6})
    s1 = root / "s1z2"
    if not (s1 / "latest").exists():
        run_script("pretrain.py", *train_args(data, llm, s1, 2, "--save_steps", 2))
    res = run_script("finetune.py", "--projector", s1, *train_args(other, llm, root / "ft_bad", 2), check=False)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("error:") and "mae: data 7 vs checkpoint 12" in err, res.stderr[-2000:]
    assert "Traceback" not in res.stderr


def flag_error(script, *argv, capsys) -> str:
    """The usage error a stage script's flag check gives, in process (no model is loaded before it)."""
    module = __import__(script)
    with pytest.raises(SystemExit) as stop:
        module.main([str(a) for a in argv])
    assert stop.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_activation_memory_budget_flag_errors(tmp_path, capsys):
    assert "--activation_memory_budget needs --compile_layers" in flag_error(
        "pretrain", "--output_dir", tmp_path, "--activation_memory_budget", "0.5", capsys=capsys)
    assert "with --lora_dropout above 0" in flag_error(      # LoRA dropout is 0.05 by default
        "finetune", "--projector", tmp_path, "--activation_memory_budget", "0.5", "--compile_layers", capsys=capsys)
    assert "must be in [0, 1]" in flag_error(
        "pretrain", "--output_dir", tmp_path, "--activation_memory_budget", "2", capsys=capsys)


def test_bad_flags_are_argparse_errors(tiny):
    root, data, llm = tiny
    res = run_script("pretrain.py", "--output_dir", root / "x", "--data_dir", root / "nope", check=False)
    assert res.returncode == 2 and "no such directory" in res.stderr and "Traceback" not in res.stderr
    # every flag problem in one usage line
    res = run_script("pretrain.py", "--output_dir", root / "x", "--task_weights", "translate=1", "--profile_steps",
                     "5:5", "--compile_layers", "--gradient_checkpointing", check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    for problem in ("unknown task 'translate'", "--profile_steps 5:5: needs 0 <= A < B",
                    "--compile_layers with --gradient_checkpointing: not supported"):
        assert problem in res.stderr.strip().splitlines()[-1], problem
    # refused before OUTPUT_DIR is touched (--overwrite_output_dir would clear a previous run there)
    res = run_script("pretrain.py", *train_args(data, llm, root / "z3c", 1, "--compile_layers", zero=3), check=False)
    err = res.stderr.strip().splitlines()[-1]
    assert res.returncode == 2 and err.startswith("error: --compile_layers: not with ZeRO-3"), res.stderr[-2000:]
    assert not (root / "z3c").exists()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q", *sys.argv[1:]]))
