"""The recipe's knobs: optimiser groups and schedules, dev-task weights, imperfect training context, the demo
language's context option, and --config files (the configs/ recipes run on the demo layout)."""
import json
import os
from argparse import Namespace
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import yaml

from tests.kit import REPO, build_tiny_llm, run_script, write_tiny_dataset


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe")
    data = write_tiny_dataset(root / "data")
    llm = build_tiny_llm(root / "llm", data)
    return root, data, llm


def load_tok(llm):
    from model import load_tokenizer
    return load_tokenizer(str(llm))[0]


# ------------------------------------------------------------------------------------------ optimiser
class Toy(torch.nn.Module):
    """The parameter names of a stage-2 SignLLM: LoRA under llm., projectors, marker rows."""

    def __init__(self):
        super().__init__()
        self.llm = torch.nn.ModuleDict({"lora_A": torch.nn.Linear(4, 4, bias=False), "norm": torch.nn.LayerNorm(4)})
        self.llm["norm"].requires_grad_(False)
        self.projectors = torch.nn.ModuleDict({"pose": torch.nn.Linear(4, 4)})
        self.marker_embed = torch.nn.Embedding(2, 4)


def test_projector_lr_moves_projectors_at_their_own_rate():
    from training import param_groups
    torch.manual_seed(0)
    model = Toy()
    groups = param_groups(model, weight_decay=0.1, lr=1e-3, projector_lr=1e-1)
    named = {id(p): n for n, p in model.named_parameters()}
    seen = {(named[id(p)], g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert seen == {("llm.lora_A.weight", 1e-3, 0.1), ("projectors.pose.weight", 1e-1, 0.1),
                    ("projectors.pose.bias", 1e-1, 0.0), ("marker_embed.weight", 1e-1, 0.0)}
    assert named[id(groups[0]["params"][0])].startswith("llm.")          # group 0's rate is the one logged
    # Adam's first step moves every weight by about its group's rate (decay aside): a behaviour, not a label.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(groups, lr=1e-3)
    model.llm["lora_A"](torch.ones(1, 4)).sum().add(model.projectors["pose"](torch.ones(1, 4)).sum()).add(
        model.marker_embed.weight.sum()).backward()
    opt.step()
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad}
    assert moved["llm.lora_A.weight"] == pytest.approx(1e-3, rel=0.05)
    assert moved["projectors.pose.weight"] == pytest.approx(1e-1, rel=0.05)
    assert moved["marker_embed.weight"] == pytest.approx(1e-1, rel=1e-3)   # no decay on marker rows
    # without --projector_lr everything learns at --learning_rate
    assert {g["lr"] for g in param_groups(model, 0.1, 1e-3)} == {1e-3}


def test_lr_schedules():
    from training import lr_schedule
    cos, lin, const = (lr_schedule(k, total=110, warmup=10, min_ratio=0.1) for k in ("cosine", "linear", "constant"))
    for f in (cos, lin, const):
        assert [f(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])   # the same linear warmup
        assert f(10) == pytest.approx(1.0)
    assert cos(60) == pytest.approx(0.55) and cos(110) == pytest.approx(0.1)
    assert lin(35) == pytest.approx(1 - 0.9 * 0.25) and lin(110) == pytest.approx(0.1)
    assert lin(35) < cos(35) and lin(85) > cos(85)                        # linear is not cosine
    assert const(60) == const(109) == 1.0


# ------------------------------------------------------------------------------------------ data
def run_env(args: dict, data: Path, out: Path):
    from pretrain import parser
    from signllava.data_paths import DataPaths
    from training import RunEnv
    ns = parser().parse_args(["--output_dir", str(out), "--data_dir", str(data), "--num_workers", "0",
                              *[str(x) for kv in args.items() for x in kv]])
    return RunEnv(ns, out, data, DataPaths(data), torch.device("cpu"), torch.float32, 2, 0, 1)


def test_eval_task_weights_set_the_dev_tasks(tiny, tmp_path):
    from training import load_data
    _, data, llm = tiny
    tok = load_tok(llm)
    d = load_data(run_env({"--eval_task_weights": "is_reversed=1"}, data, tmp_path), tok)
    assert {d.train[i]["task"] for i in range(10)} == {"translation"}
    assert {d.dev[i]["task"] for i in range(10)} == {"is_reversed"}
    assert [d.dev[i]["answer"] for i in range(10)] == [d.dev[i]["answer"] for i in range(10)]   # fixed per clip
    d = load_data(run_env({"--task_weights": "translation=1,is_reversed=1"}, data, tmp_path), tok)
    assert {d.dev[i]["task"] for i in range(len(d.dev))} == {"translation", "is_reversed"}  # default: --task_weights


def prompts(ds, epoch: int) -> list[str]:
    return [ds[(i, epoch)]["prompt"] for i in range(len(ds))]


def test_context_dropout_and_noise(tiny):
    from data import DataOptions, SignDataset
    from signllava.prompts import PromptBuilder, TRANSLATE, special_ids
    _, data, llm = tiny
    ids = special_ids(load_tok(llm))
    b = PromptBuilder(load_tok(llm), ids["markers"], ids["pad"])
    make = lambda split="train", train=True, **kw: SignDataset(data, split, b, DataOptions(context_window=1, **kw), train=train)
    gold = prompts(make(), 0)
    with_context = [i for i, p in enumerate(gold) if p != TRANSLATE]
    assert len(with_context) > 20
    dropped = prompts(make(context_dropout=0.5), 0)
    left_out = [i for i in with_context if dropped[i] == TRANSLATE]
    assert 0.3 < len(left_out) / len(with_context) < 0.7
    assert all(dropped[i] == gold[i] for i in with_context if i not in left_out)
    assert prompts(make(context_dropout=1.0), 0) == [TRANSLATE] * len(gold)
    noisy = make(context_noise=1.0)
    n0 = prompts(noisy, 0)
    assert sum(n0[i] != gold[i] for i in with_context) > 0.7 * len(with_context)
    assert all(n0[i] == gold[i] for i in range(len(gold)) if i not in with_context)    # no context, nothing to spoil
    assert prompts(noisy, 0) == n0 and prompts(noisy, 1) != n0             # keyed on (seed, epoch, index)
    # the sample's other draws do not move, and dev never sees the noise
    assert [noisy[(i, 0)]["answer"] for i in range(5)] == [make()[(i, 0)]["answer"] for i in range(5)]
    assert prompts(make("dev", False, context_noise=1.0, context_dropout=1.0), 0) == prompts(make("dev", False), 0)


def test_imperfect_context_kinds():
    from signllava.prompts import imperfect_context
    rng = np.random.default_rng(0)
    pool = ["the dog is big"]
    outs = [imperfect_context(["Tom reads the old book"], rng, 0.0, 1.0, pool)[0] for _ in range(200)]
    words = [o.split() for o in outs]
    assert any(o == "the dog is big" for o in outs)                                   # another clip's sentence
    assert any(len(w) < 5 for w in words)                                             # words dropped
    assert any(sorted(w) == sorted("Tom reads the old book".split()) and o != "Tom reads the old book"
               for o, w in zip(outs, words))                                          # two words swapped
    assert any(len(w) == 5 and set(w) - {"Tom", "reads", "the", "old", "book"} for w in words)  # one substituted
    assert imperfect_context(["a b"], rng, 0.0, 0.0, pool) == ["a b"]


def test_demo_context_refers_back(tmp_path):
    from signllava.demo import NOUN_KIND, PRONOUN, make_demo, parse, refer_back, sample_glosses, subject_index
    rng = np.random.default_rng(1)
    sentences = [sample_glosses(rng) for _ in range(400)]
    meant, signed = refer_back(sentences, np.random.default_rng(2))
    pronouns = [k for k, g in enumerate(signed) if PRONOUN in g]
    assert len(pronouns) > 60
    for k in pronouns:
        j = subject_index(meant[k])
        assert signed[k][j] == PRONOUN and signed[k][:j] + signed[k][j + 1:] == meant[k][:j] + meant[k][j + 1:]
        assert meant[k][j] == meant[k - 1][subject_index(meant[k - 1])]               # the previous subject
        assert NOUN_KIND[meant[k][j]] == NOUN_KIND[parse(sentences[k])["subj"]]
    assert all(meant[k] == sentences[k] for k in range(len(sentences)) if k not in pronouns)
    make_demo(str(tmp_path / "plain"), n_train_videos=3, n_dev_videos=1, n_test_videos=1)
    make_demo(str(tmp_path / "ctx"), n_train_videos=3, n_dev_videos=1, n_test_videos=1, context=True)
    plain, ctx = (json.loads((tmp_path / d / "annotation.train.json").read_text()) for d in ("plain", "ctx"))
    assert plain.keys() == ctx.keys() and plain != ctx


# ------------------------------------------------------------------------------------------ config files
def test_config_file_values_overrides_and_errors(tmp_path, capsys):
    from pretrain import parser
    from signllava.config import parse_args
    cfg = tmp_path / "c.yaml"
    cfg.write_text("output_dir: o\nlearning_rate: 2e-4\nno_packing: true\nlr_scheduler: linear\nepochs: 3\n"
                   "eval_generate: null\n")                    # default None: null is that default, as args.yaml has it
    a = parse_args(parser(), ["--config", str(cfg), "--epochs", "2"])
    assert (a.output_dir, a.learning_rate, a.packing, a.lr_scheduler, a.epochs) == ("o", 2e-4, False, "linear", 2.0)
    assert a.eval_generate is None
    (tmp_path / "c.json").write_text(json.dumps({"packing": False, "seed": 7}))     # a destination, as args.yaml has
    a = parse_args(parser(), ["--config", str(tmp_path / "c.json"), "--output_dir", "o"])
    assert (a.packing, a.seed) == (False, 7)
    for text, words in [("learning_rat: 1\nfoo: 2\n",
                         ["unknown key(s) learning_rat (closest flag: learning_rate), foo"]),
                        ("lr_scheduler: cos\nepochs: abc\npacking: 1\n",
                         ["'cos' is not one of", "epochs: not a valid float", "packing: expected true or false"]),
                        ("label_smoothing: null\nlearning_rate:\n",      # null only where the default is None
                         ["label_smoothing: cannot be null (leave the key out for its default, 0.0)",
                          "learning_rate: cannot be null"]),
                        ("output_dir: null\n", ["output_dir: cannot be null (the flag is required)"])]:
        cfg.write_text(text)
        with pytest.raises(SystemExit) as e:
            parse_args(parser(), ["--config", str(cfg), "--output_dir", "o"])
        err = capsys.readouterr().err
        assert e.value.code == 2 and str(cfg) in err and all(w in err for w in words), err


def test_recipes_parse():
    import finetune
    import pretrain
    from signllava.config import read_config
    recipes = sorted((REPO / "configs").glob("*.yaml"))
    assert len(recipes) == 6
    for path in recipes:
        p = (finetune if "stage2" in path.name else pretrain).parser()
        values = read_config(p, path)
        assert values["weight_decay"] == 0.1 and values["modalities"] in ("pose", "mae,dino,sign2vec", "sign2vec")


def test_pose_recipes_run_on_the_demo_layout_and_args_yaml_repeats_a_run(tmp_path):
    from signllava.demo import make_demo
    data = tmp_path / "demo"
    make_demo(str(data), n_train_videos=4, n_dev_videos=1, n_test_videos=1)
    s1, again = tmp_path / "s1", tmp_path / "s1-again"
    fast = ["--max_steps", 2, "--num_workers", 0, "--eval_batch_size", 4]
    run_script("pretrain.py", "--config", REPO / "configs/how2sign_pose_stage1.yaml", "--data_dir", data,
               "--output_dir", s1, *fast)
    recorded = yaml.safe_load((s1 / "args.yaml").read_text())
    assert recorded["learning_rate"] == 2e-3 and recorded["batch_size"] == 1 and recorded["modalities"] == "pose"
    assert recorded["max_steps"] == 2 and "config" not in recorded                    # command line won
    run_script("pretrain.py", "--config", s1 / "args.yaml", "--output_dir", again)
    assert yaml.safe_load((again / "args.yaml").read_text()) == {**recorded, "output_dir": str(again)}
    rows = [[{k: v for k, v in json.loads(r).items() if not k.endswith("_per_s")}
             for r in (d / "metrics.jsonl").read_text().splitlines()] for d in (s1, again)]
    assert rows[0] == rows[1] and any("dev_loss" in r for r in rows[0])          # the same run again
    s2 = tmp_path / "s2"
    run_script("finetune.py", "--config", REPO / "configs/how2sign_pose_stage2.yaml", "--projector", s1,
               "--data_dir", data, "--output_dir", s2, *fast, "--lr_scheduler", "constant", "--projector_lr", 1e-3, "--logging_steps", 1)
    lrs = [r for r in map(json.loads, (s2 / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    # the optimizer's own rates: LoRA at the file's 2e-5, projectors at the command line's 1e-3, held constant
    assert len(lrs) == 2 and all((r["lr"], r["projector_lr"]) == (2e-5, 1e-3) for r in lrs), lrs
    assert (s2 / "train_summary.json").is_file()
