"""Coming from the original: its YAML configs (the sections and key names of its v2.5.1 and s2v_v2.5 files,
written here with this machine's paths) convert with every key accounted for, train both stages on data in the
original's own paths (mock data without keywords, as the original's generator writes it) and translate; the
Translator takes a string as one sentence of context; --projector given a stage-2 run or our DeepSpeed file says
what it does; an unknown key's error names the closest flag."""
import fnmatch
import json
import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import yaml

from signllava.migrate_config import MigrationError, migrate
from tests.kit import REPO, build_tiny_llm, run_script, script_env, write_tiny_dataset

RUN = "sign2vec/finetune/sign2vec-yasl-sc-sc-64-8-d1_layer-1"
ANNOTATIONS = {"train": "h2s.annotations.train.json", "dev": "h2s.annotations.dev.json"}
MODS = ("sign2vec", "mae", "dino", "pose")


def visual_features(enabled: dict[str, str], splits=("train", "dev")) -> dict:
    """The original's visual_features block: every modality listed, the enabled ones at the given folders."""
    return {m: {"enable_input": m in enabled,
                **{s: f"{enabled.get(m, m)}/metadata_{m}.{s}.json" for s in splits}} for m in MODS}


def projectors(types: dict[str, str] | None = None) -> dict:
    dims = {"sign2vec": 768, "mae": 768, "dino": 1152, "pose": 208}
    return {m: {"dim": d, "projector_type": (types or {}).get(m, "mlp2x_gelu")} for m, d in dims.items()}


def training_arguments(out: Path, **over) -> dict:
    """A TrainingArguments section with the keys every original training file has."""
    ta = {"output_dir": str(out), "bf16": True, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
          "resume_from_checkpoint": False, "do_train": True, "do_eval": True, "evaluation_strategy": "steps",
          "save_strategy": "steps", "eval_steps": 1000, "save_steps": 1000, "logging_steps": 1,
          "metric_for_best_model": "eval_loss", "load_best_model_at_end": True, "save_total_limit": 2,
          "weight_decay": 0.1, "warmup_ratio": 0, "dataloader_num_workers": 0, "num_train_epochs": 40,
          "learning_rate": 0.002, "gradient_checkpointing": False, "double_quant": True, "quant_type": "nf4",
          "bits": 16, "lora_enable": False, "lora_r": 64, "lora_alpha": 16, "lora_dropout": 0.05,
          "lora_weight_path": "", "lora_bias": "none", "group_by_modality_length": False, "seed": 42, "data_seed": 42}
    ta.update(over)
    return ta


def stage1_config(data: Path, llm: Path, out: Path, pose: bool = False) -> dict:
    """The s2v branch's TRUBA pretraining in v2.5.1's sections: sign2vec (the fine-tuned features of the s2v_v2.5
    path; with `pose`, pose too), multitask weights, no label_smoothing_factor (the original's default applies)."""
    enabled = {"sign2vec": RUN, **({"pose": "pose"} if pose else {})}
    return {
        "ModelArguments": {"model_name_or_path": str(llm), "version": "llava_sign_llama_3", "tune_mm_mlp_adapter": True,
                           "freeze_embed_tokens": True},
        "TrainingArguments": training_arguments(out, lr_scheduler_type="linear", warmup_steps=0),
        "SignDataArguments": {"use_paraphrases": False, "context_window_size": 0, "prelude_window_size": 0,
                              "data_dir": str(data),
                              "annotation_path": ANNOTATIONS,
                              "visual_features": visual_features(enabled)},
        "SignModelArguments": {"projectors": projectors({"pose": "linear"})},
        "SignMultiTaskArguments": {"translation": {"enable": True, "sample_weight": 0.7},
                                   "one_word_present": {"enable": True, "sample_weight": 0.1},
                                   "multi_word_present": {"enable": True, "sample_weight": 0.1, "max_num_words": 5},
                                   "is_reversed": {"enable": True, "sample_weight": 0.1}},
        "SignMultiTaskEvalArguments": {"translation": {"sample_weight": 1}, "one_word_present": {"sample_weight": 0},
                                       "multi_word_present": {"sample_weight": 0, "max_num_words": 5},
                                       "is_reversed": {"sample_weight": 0}},
    }


def stage2_config(data: Path, out: Path, projector: Path) -> dict:
    """s2v_v2.5's signllava/configs/truba/how2sign_finetune_s2v.yaml, in its sections and keys."""
    return {
        "ModelArguments": {"model_name_or_path": "meta-llama/Meta-Llama-3-8B-Instruct", "version": "llava_sign_llama_3",
                           "tune_mm_mlp_adapter": True},
        "TrainingArguments": training_arguments(out, model_max_length=2048, per_device_train_batch_size=2,
                                                per_device_eval_batch_size=1, eval_steps=300, save_steps=300,
                                                logging_steps=300, save_total_limit=5, num_train_epochs=80,
                                                learning_rate=0.00001, label_smoothing_factor=0.1,
                                                lr_scheduler_type="cosine", bits=4, lora_enable=True,
                                                dataloader_num_workers=4, gradient_checkpointing=True),
        "SignDataArguments": {"use_paraphrases": False, "context_window_size": 0, "prelude_window_size": 0,
                              "data_dir": str(data),
                              "annotation_path": ANNOTATIONS,
                              "visual_features": visual_features({"sign2vec": RUN})},
        "SignModelArguments": {"projectors": {"pretrained_projector_ckpt": str(projector), **projectors()}},
        "SignMultiTaskArguments": {"translation": {"enable": True, "sample_weight": 1},
                                   "one_word_present": {"enable": False, "sample_weight": 0},
                                   "multi_word_present": {"enable": False, "sample_weight": 0, "max_num_words": 5},
                                   "is_reversed": {"enable": False, "sample_weight": 0}},
    }


def generate_config(data: Path, run: Path, step: int) -> dict:
    """s2v_v2.5's truba/generate_multitask_s2v.yaml, in its sections and keys (dev data as its 'test' paths)."""
    return {
        "GenerateArguments": {"model_path": str(run), "checkpoint_num": step, "num_datapoints": -1,
                              "task": "translation", "generate_des": "h2s.generation.translation.dev.json",
                              "model_base": "meta-llama/Meta-Llama-3-8B-Instruct", "conv_mode": "llava_sign_llama_3",
                              "top_p": 1, "min_length": 1, "temperature": 0.1, "do_sample": False,
                              "skip_special_tokens": True, "num_beams": 2, "remove_invalid_values": True,
                              "max_new_tokens": 6, "do_verbose": True, "seed": 42, "bf16": True},
        "LoraArguments": {"bits": 16, "quant_type": "nf4", "double_quant": True, "lora_enable": False, "lora_r": 64,
                          "lora_alpha": 16, "lora_dropout": 0.05, "lora_weight_path": "", "lora_bias": "none"},
        "SignDataArguments": {"prepared_predicted_context": False, "on_the_fly_predicted_context": False,
                              "context_window_size": 0, "prelude_window_size": 0, "data_dir": str(data),
                              "annotation_path": str(data / "h2s.annotations.dev.json"),
                              "visual_features": {m: {"enable_input": m == "sign2vec",
                                                      "test": f"{RUN if m == 'sign2vec' else m}/metadata_{m}.dev.json"}
                                                  for m in MODS}},
        "SignModelArguments": {"projectors": projectors({m: "mlp1x_gelu" for m in MODS})},
        "SignMultiTaskArguments": {"multi_word_present": {"max_num_words": 5}},
    }


def leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        path = f"{prefix}.{k}" if prefix else str(k)
        out += leaves(v, path) if isinstance(v, dict) and v else [path]
    return out


def accounted(m, data: dict) -> list[str]:
    """Leaf keys of the original file that neither a flag's origin nor a dropped entry names (should be none)."""
    records = [o for origin in m.origins.values() for o in origin.split(" + ")]
    records += [key.split(":")[0] for key, _ in m.dropped]
    patterns = [r.replace("<m>", "*").replace("<task>", "*") for r in records]
    return [leaf for leaf in leaves(data) if not any(fnmatch.fnmatch(leaf, p) or leaf.startswith(p + ".")
                                                     for p in patterns)]


@pytest.fixture(scope="module")
def original(tmp_path_factory):
    """Tiny data in the original's paths: h2s.annotations.<split>.json without keywords, sign2vec's metadata and
    shards under sign2vec/finetune/<run>/, pose where today's layout has it; a tiny LLM."""
    root = tmp_path_factory.mktemp("original")
    data = write_tiny_dataset(root / "tmp", dims={"sign2vec": 10, "pose": 6}, videos_per_split={"train": 3, "dev": 1})
    llm = build_tiny_llm(root / "llm", data)
    for split in ("train", "dev"):
        ann = json.loads((data / f"annotation.{split}.json").read_text())
        for vd in ann.values():
            for clip in vd["clip_order"]:
                vd[clip].pop("keywords")
        (data / f"annotation.{split}.json").unlink()
        (data / f"h2s.annotations.{split}.json").write_text(json.dumps(ann))
    (data / RUN).mkdir(parents=True)
    for f in list((data / "sign2vec").glob("*.*")):
        f.rename(data / RUN / f.name)
    return root, data, llm


def test_every_key_translated_or_dropped_with_why(original, tmp_path):
    _, data, llm = original
    cfg = stage1_config(data, llm, tmp_path / "s1", pose=True)
    m = migrate(cfg, "s1.yaml")
    assert m.script == "pretrain.py" and accounted(m, cfg) == []
    v = m.values
    assert (v["modalities"], v["features"], v["annotation_file"]) == (
        "sign2vec,pose", f"sign2vec={RUN}/metadata_sign2vec.{{split}}.json", "h2s.annotations.{split}.json")
    assert v["task_weights"] == "translation=0.7,one_word_present=0.1,multi_word_present=0.1,is_reversed=0.1"
    assert (v["eval_task_weights"], v["projector_type"], v["lr_scheduler"], v["metric_for_best"]) == (
        "translation=1", "mlp2x_gelu,pose=linear", "linear", "dev_loss")
    assert (v["epochs"], v["batch_size"], v["learning_rate"], v["label_smoothing"]) == (40, 4, 0.002, 0.1)
    assert "max_seq_len" not in v and "lora_r" not in v and "bits" not in v
    why = dict(m.dropped)
    assert "only the two marker rows" in why["ModelArguments.freeze_embed_tokens: True"]
    assert "precision is automatic" in why["TrainingArguments.bf16: True"]
    assert "stage 1 has no LoRA" in why["TrainingArguments.lora_r: 64"]
    assert "modality disabled" in why["SignDataArguments.visual_features.mae"]
    notes = " ".join(m.notes)
    assert "dataclass default (0.1)" in notes and "truncated every spliced sequence at 512" in notes
    assert "this trainer's own default is dev BLEU" in notes
    m2 = migrate(stage2_config(data, tmp_path / "s2", tmp_path / "s1"), "s2.yaml")
    assert m2.script == "finetune.py" and accounted(m2, stage2_config(data, tmp_path / "s2", tmp_path / "s1")) == []
    assert (m2.values["bits"], m2.values["lora_r"], m2.values["projector"], m2.values["max_seq_len"]) == (
        4, 64, str(tmp_path / "s1"), 2048)
    assert "its frames capped to fit" in " ".join(m2.notes) and "losing the answer first" in " ".join(m2.notes)
    gen = generate_config(data, tmp_path / "s2", 2)
    m3 = migrate(gen, "g.yaml")
    assert m3.script == "generate.py" and accounted(m3, gen) == []
    assert (m3.values["checkpoint"], m3.values["split"], m3.values["features"], m3.values["context"]) == (
        str(tmp_path / "s2" / "checkpoint-2"), "test", f"sign2vec={RUN}/metadata_sign2vec.dev.json", "none")
    bad = stage1_config(data, llm, tmp_path)
    bad["TrainingArguments"]["lerning_rate"] = 1
    bad["SignDataArguments"]["visual_features"]["pose"]["enable"] = True
    with pytest.raises(MigrationError, match=r"TrainingArguments.lerning_rate \(closest: learning_rate\)"):
        migrate(bad, "bad.yaml")


def test_unknown_keys_name_the_closest_flag(tmp_path, capsys):
    import pretrain
    from signllava.config import parse_args
    flat = tmp_path / "flat.yaml"
    flat.write_text("num_train_epochs: 3\nlearning_rat: 1\ncontext_window_size: 1\nfoo: 2\n")
    with pytest.raises(SystemExit):
        parse_args(pretrain.parser(), ["--config", str(flat), "--output_dir", "o"])
    err = capsys.readouterr().err
    assert "num_train_epochs (the original's name; here: epochs;" in err and "migrate_config" in err
    assert "learning_rat (closest flag: learning_rate)" in err
    assert "context_window_size (the original's name; here: context_window;" in err
    assert ", foo (not flags of " in err                       # nothing close: no hint
    s2 = tmp_path / "s2.yaml"
    s2.write_text(yaml.safe_dump(stage2_config(tmp_path, tmp_path / "o", tmp_path)))
    with pytest.raises(SystemExit):
        parse_args(pretrain.parser(), ["--config", str(s2)])
    assert "the original's config for finetune.py" in capsys.readouterr().err


def small_config(tmp_path: Path) -> dict:
    """The least a training file has: an output folder and one enabled modality with its paths."""
    return {"TrainingArguments": {"output_dir": str(tmp_path / "o")},
            "SignDataArguments": {"visual_features": visual_features({"pose": "pose"})}}


def put(cfg: dict, path: str, value) -> dict:
    *parents, last = path.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return cfg


MALFORMED = [   # (dotted key, value, the error's words): each crashed a reader or was read as something else
    ("SignMultiTaskArguments.translation", 1.0,
     "SignMultiTaskArguments.translation must be a mapping, got a number 1.0"),
    ("SignMultiTaskArguments.translation.sample_weight", "0.5",
     "SignMultiTaskArguments.translation.sample_weight must be a number, got a string '0.5'"),
    ("SignMultiTaskArguments.translation.enable", "yes", "translation.enable must be true or false, got a string"),
    ("TrainingArguments.lr_scheduler_type", ["cosine"],
     "TrainingArguments.lr_scheduler_type must be a string, got a list ['cosine']"),
    ("TrainingArguments.label_smoothing_factor", None,       # the original set None (setattr), not its default 0.1
     "TrainingArguments.label_smoothing_factor must be a number, got null"),
    ("TrainingArguments.lora_enable", "false", "TrainingArguments.lora_enable must be true or false, got a string"),
    ("SignDataArguments.visual_features.pose", "pose/metadata_pose.{split}.json",
     "SignDataArguments.visual_features.pose must be a mapping, got a string 'pose/metadata_pose.{split}.json'"),
    ("SignDataArguments.visual_features.pose.enable_input", "true", "pose.enable_input must be true or false"),
    ("SignDataArguments.visual_features.pose.train", ["a", "b"], "pose.train must be a string, got a list"),
    ("SignDataArguments.annotation_path", {"train": 7}, "annotation_path.train must be a string, got an integer 7"),
    ("SignModelArguments.projectors.pose", "linear", "projectors.pose must be a mapping, got a string 'linear'"),
    ("SignModelArguments.projectors.pose.projector_type", ["linear"], "pose.projector_type must be a string"),
]


@pytest.mark.parametrize("key, value, words", MALFORMED, ids=[k for k, _, _ in MALFORMED])
def test_a_malformed_value_is_one_line_naming_its_key_and_type(tmp_path, capsys, key, value, words):
    import pretrain
    from signllava import migrate_config
    from signllava.config import parse_args
    f = tmp_path / "orig.yaml"
    f.write_text(yaml.safe_dump(put(small_config(tmp_path), key, value)))
    with pytest.raises(MigrationError, match=rf"^{re.escape(str(f))}: .*{re.escape(words)}"):
        migrate(yaml.safe_load(f.read_text()), str(f))
    assert migrate_config.main([str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {f}: ") and words in err and err.count("\n") == 1, err
    with pytest.raises(SystemExit) as e:                     # --config ORIGINAL.yaml: the same line
        parse_args(pretrain.parser(), ["--config", str(f)])
    assert e.value.code == 2 and f"error: --config {err[len('error: '):]}" in capsys.readouterr().err


def test_malformed_generation_values_name_their_key(tmp_path):
    gen = generate_config(tmp_path, tmp_path / "run", 2)
    for key, value, words in [("num_datapoints", "all", "num_datapoints must be an integer, got a string 'all'"),
                              ("model_path", ["r"], "model_path must be a string, got a list"),
                              ("do_sample", "no", "do_sample must be true or false")]:
        bad = put(json.loads(json.dumps(gen)), f"GenerateArguments.{key}", value)
        with pytest.raises(MigrationError, match=rf"g.yaml: GenerateArguments.{words}"):
            migrate(bad, "g.yaml")
    bad = put(json.loads(json.dumps(gen)), "SignDataArguments.prepared_predicted_context", "yes")
    with pytest.raises(MigrationError, match="prepared_predicted_context must be true or false"):
        migrate(bad, "g.yaml")
    small = small_config(tmp_path)
    assert migrate(put(small, "TrainingArguments.label_smoothing_factor", 0), "s.yaml").values["label_smoothing"] == 0


def test_max_num_words_comes_from_multi_word_present_only(tmp_path):
    """The original read it from the training tasks' multi_word_present alone: elsewhere it is dropped, said."""
    cfg = put(small_config(tmp_path), "SignMultiTaskArguments", {
        "multi_word_present": {"sample_weight": 0.2, "max_num_words": 5},
        "one_word_present": {"sample_weight": 0.2, "max_num_words": 2}, "translation": {"sample_weight": 0.6}})
    m = migrate(cfg, "w.yaml")
    assert (m.values["max_num_words"], m.origins["max_num_words"]) == (
        5, "SignMultiTaskArguments.multi_word_present.max_num_words")
    assert "only multi_word_present asks several words" in dict(m.dropped)[
        "SignMultiTaskArguments.one_word_present.max_num_words: 2"]
    assert not [k for k in accounted(m, cfg) if k.startswith("SignMultiTaskArguments")]
    del cfg["SignMultiTaskArguments"]["multi_word_present"]
    assert "max_num_words" not in migrate(cfg, "w.yaml").values          # the default, 5 as the original's
    put(cfg, "SignMultiTaskArguments.multi_word_present", {"sample_weight": 0.2, "max_num_words": "5"})
    with pytest.raises(MigrationError, match="multi_word_present.max_num_words must be an integer, got a string"):
        migrate(cfg, "w.yaml")


def test_converted_configs_train_both_stages_and_translate_in_the_original_paths(original, tmp_path, caplog):
    import finetune
    import generate
    from signllava.errors import CheckpointError
    _, data, llm = original
    s1, s2 = tmp_path / "s1", tmp_path / "s2"
    (tmp_path / "s1.orig.yaml").write_text(yaml.safe_dump(stage1_config(data, llm, s1)))
    res = subprocess.run([sys.executable, "-m", "signllava.migrate_config", str(tmp_path / "s1.orig.yaml")], cwd=REPO,
                         env=script_env(), capture_output=True, text=True, check=True)
    (tmp_path / "s1.yaml").write_text(res.stdout)
    assert res.stdout.startswith("# pretrain.py --config THIS_FILE") and "keys dropped" in res.stderr
    fast = ["--max_steps", 2, "--eval_generate", 0]
    out = run_script("pretrain.py", "--config", tmp_path / "s1.yaml", *fast)
    assert "no clip can carry it, so its weight went to translation" in out.stderr         # no keywords: said
    recorded = yaml.safe_load((s1 / "args.yaml").read_text())
    assert recorded["features"] == f"sign2vec={RUN}/metadata_sign2vec.{{split}}.json"
    assert (data / RUN / ".metadata_sign2vec.train.index.npz").is_file()                 # the cache, beside it
    # Stage 2 from the original's file as it is (--config reads its layout), on the stage-1 run.
    (tmp_path / "s2.orig.yaml").write_text(yaml.safe_dump(stage2_config(data, s2, s1)))
    out = run_script("finetune.py", "--config", tmp_path / "s2.orig.yaml", "--model", llm, "--num_workers", 0, *fast)
    assert "the original Sign LLaVA's layout" in out.stderr
    assert json.loads((s2 / "checkpoint-2" / "config.json").read_text())["modalities"] == ["sign2vec"]
    # Generation from the original's generation file, in-process.
    (tmp_path / "g.orig.yaml").write_text(yaml.safe_dump(generate_config(data, s2, 2)))
    assert generate.main(["--config", str(tmp_path / "g.orig.yaml"), "--num_workers", "0"]) == 0
    gen = json.loads((s2 / "h2s.generation.translation.dev.json").read_text())
    assert sum(len(vd["clip_order"]) for vd in gen.values()) == 11 and all(
        isinstance(vd[c]["hypothesis"], str) for vd in gen.values() for c in vd["clip_order"])
    check_translator(s2, data)
    # --projector given a stage-2 run: its projectors, a new adapter, said; our DeepSpeed file: the folder to give.
    with caplog.at_level(logging.WARNING, logger="signllava"):
        cfg, _, _ = finetune.read_projector_source(str(s2))
    assert cfg.stage == 2 and "NEW LoRA adapter" in caplog.text and "--resume" in caplog.text
    states = s1 / "checkpoint-2" / "deepspeed" / "mp_rank_00_model_states.pt"
    expected = f"give the checkpoint directory itself \\(--projector {s1 / 'checkpoint-2'}\\)"
    with pytest.raises(CheckpointError, match=expected):
        finetune.read_projector_source(str(states))


def check_translator(run: Path, data: Path):
    """A string of context is one sentence; context given to a checkpoint trained without a window is warned of."""
    import h5py

    from generate import Translator
    tr = Translator.from_checkpoint(run, device="cpu")
    meta = json.loads((data / RUN / "metadata_sign2vec.dev.json").read_text())
    video = next(iter(meta))
    with h5py.File(data / RUN / f"sign2vec.dev.{meta[video]}.h5") as h:
        clip = next(iter(h[video]))
        feats = {"sign2vec": h[video][clip][()]}
    with pytest.warns(UserWarning, match="context ignored: .* trained without a context window"):
        tr.translate(feats, context="The previous sentence.", num_beams=1, max_new_tokens=2)
    tr.context_window = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tr.context_prompt("The previous sentence.") == tr.context_prompt(["The previous sentence."])
    assert "'The previous sentence.'" in tr.context_prompt("The previous sentence.")
    with pytest.raises(TypeError, match="a sentence"):
        tr.context_prompt([1, 2])


def test_s2v_recipes_are_the_converted_originals(tmp_path):
    """configs/ holds the s2v_v2.5 recipe as the converter translates it (paths and run-specific keys aside)."""
    ours = yaml.safe_load((REPO / "configs" / "how2sign_sign2vec_finetuned_stage2.yaml").read_text())
    m = migrate(stage2_config(Path("/H2S"), tmp_path, tmp_path), "s2.yaml")
    run_specific = {"model", "output_dir", "data_dir", "projector", "num_workers"}
    assert {k: v for k, v in m.values.items() if k not in run_specific} == \
        {k: v for k, v in ours.items() if k not in run_specific}


def test_report_to_keeps_the_trackers_this_trainer_has(original, tmp_path):
    _, data, llm = original
    cfg = stage1_config(data, llm, tmp_path / "s1", pose=True)
    cfg["TrainingArguments"].update(report_to=["wandb", "mlflow"], run_name="try1")
    m = migrate(cfg, "s1.yaml")
    assert (m.values["report_to"], m.values["run_name"]) == ("wandb", "try1") and accounted(m, cfg) == []
    assert ("TrainingArguments.report_to: mlflow", "the trackers here are tensorboard, wandb, trackio") in m.dropped
    cfg["TrainingArguments"]["report_to"] = "none"
    assert migrate(cfg, "s1.yaml").values["report_to"] == "none"
