"""The one training loop, used by both stages: explicit DeepSpeed engine, token-normalised loss,
exact resume, complete-or-invisible checkpoints.

A stage script (pretrain.py, finetune.py) reads its flags, then runs top to bottom:

    env = setup_run(args)                       # distributed init, device, seed, output and data dirs
    data = load_data(env, tokenizer, base_model=base)   # train / dev splits; their dims size the projectors
    cfg = model_config(env, data, stage, ...)   # what every checkpoint saves to rebuild the model
    model = assemble(cfg, ...)                  # only the stage's parameters require grad
    return fit(env, model, cfg, data)           # plan -> engine -> resume -> train (evaluate, save)

Batch plan. Each epoch is a list of micro-batches computed from (seed, epoch) alone. Optimizer step s
consumes global micro-batches [s*W*G, (s+1)*W*G) (W ranks, G accumulation steps); rank r takes every
W-th. So 1 rank x G=2 and 2 ranks x G=1 see the same samples per step, and the data position of a
checkpoint is just its step.

Packing (default; --no_packing turns it off): each micro-batch runs as one row of its samples end to end,
no padding, attention kept within each sample (model.SignLLM.packing, signllava/kernels.py).

With --max_tokens_per_batch the micro-batches are cut by a token budget, so their number (and
with it the steps of an epoch) can change from epoch to epoch; `EpochPlans` recomputes each epoch's count
from its plan, so step -> (epoch, step within the epoch) still follows from (seed, flags) alone.
"""
from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import os
import random
import socket
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from data import (Collator, DataOptions, SignDataset, add_path_args, eval_batches, make_loader, parse_max_frames,
                  parse_task_weights, plan_epoch, rank_share)
from model import (TRAINABLE_PREFIXES, SignConfig, SignLLM, compute_dtype, max_positions, parse_projector_types,
                   save_projectors)
from signllava import checkpoint, faults, kernels, portable_state, run_lock, safe_load, step_profiler
from signllava.atomic import parent_problem, write_atomic
from signllava.checkpoint import ADAPTER_DIR
from signllava.config import add_config_arg, write_run_args
from signllava.data_paths import DataPaths, data_problems
from signllava.errors import CheckpointError, DataError, RunError, message, range_problems
from signllava.extraction_record import SETTINGS_FILE, dataset_record, differences
from signllava.prompts import PromptBuilder, special_ids, translation_prompt

log = logging.getLogger("signllava")
EVAL_GENERATE_CAP = 500                         # default dev clips translated at each evaluation
# --metric_for_best -> the metrics.jsonl key it reads; dev loss is better lower, the scores higher.
BEST_KEYS = {"bleu": "dev_bleu", "chrf": "dev_chrf", "dev_loss": "dev_loss"}
# The suite's scores (signllava/scoring.py) each evaluation logs as dev_<name>, with the BLEU / chrF intervals.
EVAL_SCALARS = ("bleu", "chrf", "bleu1", "bleu2", "bleu3", "rouge_l", "multiref_bleu", "multiref_chrf")


# ------------------------------------------------------------------------------------------- flags
def add_common_args(p: argparse.ArgumentParser, lr: float, output_required: bool = True, output_help: str | None = None):
    """The flags both stages share, in four groups; `lr` is the stage's default learning rate."""
    add_data_args(p.add_argument_group("data"))
    add_model_args(p.add_argument_group("model"))
    add_optimisation_args(p.add_argument_group("optimisation"), lr)
    add_run_args(p.add_argument_group("run"), output_required, output_help)


def add_data_args(g):
    g.add_argument("--data_dir", help="dataset in the Sign LLaVA layout (default: the built-in demo language, "
                                      "written to OUTPUT_DIR/demo_data)")
    add_path_args(g)
    g.add_argument("--modalities", help="comma-separated subset of the modalities (default: all)")
    g.add_argument("--max_frames", default="0",
                   help="cap frames per modality: '300' for all, or 'mae=300,sign2vec=150' (others uncapped); 0: no cap")
    g.add_argument("--frame_cap", choices=["stride", "truncate", "pool"], default="stride",
                   help="how --max_frames caps: evenly spaced frames (stride), the first ones (truncate), or the "
                        "means of equal windows (pool: every frame counts)")
    g.add_argument("--missing_modality", choices=["drop", "absent"], default="drop",
                   help="a clip without features in a selected modality: left out (drop), or kept with that "
                        "modality's learned absent row as its segment (absent); both counted in the log")
    g.add_argument("--modality_dropout", type=float, default=0.0, metavar="P",
                   help="training: each present modality of a clip is replaced by its absent row with chance P "
                        "(never all of them), so that any subset of modalities works at inference")
    g.add_argument("--max_seq_len", type=int, default=0,
                   help="longest training sequence in tokens (default 0: the LLM config's maximum positions)")
    g.add_argument("--long_samples", choices=["cap", "skip"], default="cap",
                   help="a clip longer than --max_seq_len: its frames capped to fit (cap) or left out, counted "
                        "(skip); the text is never cut")
    g.add_argument("--context_window", type=int, default=0, help="preceding sentences given as context")
    g.add_argument("--prelude_window", type=int, default=0, help="first sentences of the video given as context")
    g.add_argument("--use_paraphrases", action="store_true", help="sample targets from translation + paraphrases")
    g.add_argument("--task_weights", default="translation=1",
                   help="e.g. translation=0.7,one_word_present=0.1,multi_word_present=0.1,is_reversed=0.1")
    g.add_argument("--eval_task_weights",
                   help="task weights of the dev split's loss, same form as --task_weights (default: "
                        "--task_weights); each dev clip's task is fixed by (seed, clip), so the loss is comparable "
                        "across evaluations")
    g.add_argument("--context_dropout", type=float, default=0.0,
                   help="training only: a clip's context is left out with this probability, so the model also "
                        "translates without it")
    g.add_argument("--context_noise", type=float, default=0.0,
                   help="training only: each context sentence is corrupted with this probability (words dropped, "
                        "two swapped, one replaced, or another clip's sentence instead), so the model learns to use context "
                        "without trusting it blindly, as it must with its own predictions at test time")
    g.add_argument("--max_num_words", type=int, default=5, help="most words asked in multi_word_present")
    g.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (each opens its own h5 handles)")


def add_model_args(g):
    g.add_argument("--model", help="HF id or local path of a chat LLM (default: the embedded tiny Llama)")
    g.add_argument("--chat_template", metavar="builtin|FILE",
                   help="the prompt's chat template: 'builtin' (plain 'Role: text' lines, each closed by the "
                        "tokenizer's end-of-sequence token; used anyway for a tokenizer without a template) or a "
                        "Jinja file (default: the model's own; stage 2 and generation keep stage 1's)")
    g.add_argument("--projector_type", default="mlp2x_gelu",
                   help="linear | identity | mlpNx_gelu; per modality: 'mlp2x_gelu,pose=linear'")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute each decoder layer's activations in the backward pass: less memory, a slower step")
    g.add_argument("--compile_layers", nargs="?", const="inductor", metavar="BACKEND",
                   help="torch.compile each decoder layer for training steps (regional; evaluation stays eager). "
                        "The flag alone: inductor; aot_eager traces without generating kernels (debugging). "
                        "Not under ZeRO-3, whose hooks gather each layer's weights around its forward")
    g.add_argument("--activation_memory_budget", type=float, default=1.0, metavar="F",
                   help="with --compile_layers: how much of each layer's activations is kept for backward, from "
                        "0 (its inputs only) to 1 (all); the compiler recomputes the rest, cheapest first. Lower "
                        "fits a larger token budget in less memory for less recomputation than "
                        "--gradient_checkpointing; needs --lora_dropout 0 (default 1: keep all)")
    g.add_argument("--fp8", action="store_true",
                   help="the frozen LLM's linear layers (stage 2: LoRA's base) multiply in FP8: weights quantised once "
                        "to e4m3 with a power-of-two scale per row (the bf16 copy freed), inputs and gradients per row "
                        "at each step; GPUs with FP8 tensor cores (compute capability 8.9+), emulated on the CPU; not "
                        "with --bits 4 or ZeRO-3. Generation and export use the bf16 base")
    g.add_argument("--no_packing", dest="packing", action="store_false",
                   help="padded rows under SDPA instead of packed rows (default packs each micro-batch into one "
                        "row, no padding, attention within each sample: the varlen flash kernel on GPU)")
    g.add_argument("--label_smoothing", type=float, default=0.0,
                   help="label smoothing of the answer tokens' loss (the original's label_smoothing_factor)")


def add_optimisation_args(g, lr: float):
    g.add_argument("--learning_rate", "--lr", type=float, default=lr, help="peak learning rate after the warmup")
    g.add_argument("--weight_decay", type=float, default=0.1,
                   help="AdamW decay of weight matrices (biases, norms and marker rows never decay); 0.1 as in the "
                        "original's configs")
    g.add_argument("--lr_scheduler", choices=sorted(SCHEDULES), default="cosine",
                   help="learning-rate shape after the linear warmup")
    g.add_argument("--warmup_ratio", type=float, default=0.03, help="share of the steps spent warming up linearly")
    g.add_argument("--min_lr_ratio", type=float, default=0.0, help="cosine and linear decay to lr * this")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping by global norm")
    g.add_argument("--max_bad_steps", type=int, default=10,
                   help="an optimizer step whose loss or gradient norm is not finite is skipped (no update) and "
                        "counted; after this many in a row the run stops, naming the step and its clips")
    g.add_argument("--batch_size", type=int, default=8, help="micro-batch per rank (ignored for training batches "
                                                              "when --max_tokens_per_batch is on)")
    g.add_argument("--max_tokens_per_batch", type=int, default=0,
                   help="cut training micro-batches by a token budget instead of a fixed --batch_size: the clips' "
                        "approximate tokens (prompt template + frames + 2 markers per modality + target characters "
                        "/ 4 + end of turn; context sentences not counted) stay within N -- summed when packing, "
                        "batch size x the longest without it -- so short clips come in large batches and long ones "
                        "in small; a clip longer than "
                        "N is a batch of its own. --batch_size is then ignored for training (dev batches keep "
                        "--eval_batch_size). 0: off")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches accumulated per optimizer step and rank")
    g.add_argument("--max_steps", type=int, default=0, help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=1.0, help="passes over the training split (a fraction is allowed)")
    g.add_argument("--no_group_by_length", dest="group_by_length", action="store_false",
                   help="plain shuffled batches (default groups similar lengths to cut padding)")
    g.add_argument("--seed", type=int, default=42,
                   help="seeds the model's init, the batch plan and every sample's draws")


def add_run_args(g, output_required: bool, output_help: str | None):
    g.add_argument("--output_dir", required=output_required,
                   help=output_help or "the run's folder: checkpoints, latest/best, metrics, args.yaml")
    g.add_argument("--deepspeed_config", default=str(Path(__file__).with_name("ds_config_zero2.json")),
                   help="DeepSpeed JSON for the ZeRO stage and its buckets (ds_config_zero3.json shards parameters "
                        "too); batch geometry, precision and clipping always come from the flags")
    g.add_argument("--save_steps", type=int, default=500, help="a checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--save_total_limit", type=int, default=3, help="complete checkpoints kept (0: all)")
    g.add_argument("--eval_steps", type=int, default=500,
                   help="dev evaluation every N optimizer steps (and at the end)")
    g.add_argument("--eval_batch_size", type=int, default=16, help="dev batches, for the loss and for translation")
    g.add_argument("--eval_generate", type=int, default=None, metavar="N",
                   help="dev clips translated (beam search, as generate.py) and scored with BLEU and chrF at every "
                        f"evaluation: the first N, as `generate.py --limit N` takes them (default: all when the dev "
                        f"split has at most {EVAL_GENERATE_CAP}, else the first {EVAL_GENERATE_CAP}; 0: off)")
    g.add_argument("--eval_num_beams", type=int, default=5, help="beams of the evaluation's translation")
    g.add_argument("--eval_max_new_tokens", type=int,
                   help="token limit of the evaluation's translations (default: twice the longest reference of the "
                        "subset + 8, so an untrained model's runaway outputs stay cheap)")
    g.add_argument("--metric_for_best", choices=sorted(BEST_KEYS),
                   help="what picks OUTPUT_DIR/best, the checkpoint rotation never removes (default: bleu when "
                        "translation is on, else dev_loss)")
    g.add_argument("--logging_steps", type=int, default=10, help="loss, learning rate and speed logged every N steps")
    g.add_argument("--report_to", default="tensorboard", metavar="tensorboard,wandb,trackio|none",
                   help="trackers of the training scalars besides OUTPUT_DIR/metrics.jsonl, any combination "
                        "(signllava/trackers.py; W&B honours WANDB_MODE=offline, Trackio stores locally)")
    g.add_argument("--run_name", help="the run's name in W&B / Trackio (default: the output directory's name)")
    g.add_argument("--tracker_project", default="signllava", help="the W&B / Trackio project")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR's latest complete checkpoint")
    g.add_argument("--overwrite_output_dir", action="store_true",
                   help="start afresh in an OUTPUT_DIR that holds a run: its checkpoints, latest/best, metrics.jsonl, "
                        "summary, curves and TensorBoard events are removed first (other files stay)")
    g.add_argument("--profile_steps", metavar="A:B",
                   help="record optimizer steps A+1..B with torch.profiler on rank 0 into OUTPUT_DIR/profile "
                        "(timeline, operators by time, device busy fraction); pick steps without evaluation or saving")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    add_config_arg(g)


def validate_args(p: argparse.ArgumentParser, args):
    """Every flag problem at once, as argparse's one-line usage error (exit status 2)."""
    problems = range_problems(args, at_least_one=("batch_size", "grad_accum", "eval_batch_size", "save_steps",
                                                  "eval_steps", "logging_steps", "max_bad_steps", "eval_num_beams",
                                                  "eval_max_new_tokens"),
                              non_negative=("max_steps", "context_window", "prelude_window", "max_seq_len",
                                            "num_workers", "max_tokens_per_batch", "eval_generate"))
    try:
        parse_max_frames(args.max_frames)
    except ValueError as e:
        problems.append(str(e))
    if args.profile_steps:
        try:
            step_profiler.parse_window(args.profile_steps)
        except ValueError as e:
            problems.append(str(e))
    if not 0 <= args.modality_dropout < 1:
        problems.append("--modality_dropout must be in [0, 1)")
    if args.max_steps == 0 and args.epochs <= 0:
        problems.append("give --max_steps N or --epochs E > 0")
    if args.compile_layers and args.gradient_checkpointing:
        # On an H200 torch's partitioner failed on the checkpointed QLoRA layer (pytorch/pytorch#164186, open);
        # --activation_memory_budget is the compiled way to trade recomputation for memory.
        problems.append("--compile_layers with --gradient_checkpointing: not supported (torch's partitioner failed "
                        "on the checkpointed layer on a GPU); for less memory with compiled layers use "
                        "--activation_memory_budget")
    if args.fp8 and getattr(args, "bits", 16) == 4:                                     # stage 2's flag
        problems.append("--fp8 with --bits 4: the frozen base is either nf4 or FP8; add --bits 16")
    if not 0 <= args.activation_memory_budget <= 1:
        problems.append("--activation_memory_budget must be in [0, 1]")
    elif args.activation_memory_budget < 1 and not args.compile_layers:
        problems.append("--activation_memory_budget needs --compile_layers (the compiler chooses what to recompute)")
    elif args.activation_memory_budget < 1 and getattr(args, "lora_dropout", 0) > 0:     # stage 2's flag
        problems.append("--activation_memory_budget below 1 with --lora_dropout above 0: recomputed dropout draws "
                        "new masks (wrong gradients); add --lora_dropout 0")
    if args.metric_for_best in ("bleu", "chrf") and args.eval_generate == 0:
        problems.append(f"--metric_for_best {args.metric_for_best} needs translation at evaluation "
                        "(--eval_generate is 0)")
    if not 0 <= args.label_smoothing < 1:
        problems.append("--label_smoothing must be in [0, 1)")
    problems += [f"--{n} must be in [0, 1]" for n in ("context_dropout", "context_noise", "warmup_ratio", "min_lr_ratio")
                 if not 0 <= getattr(args, n) <= 1]
    # A rate of 0 is allowed: a run that only loads, evaluates and saves (tests use it to check loading).
    problems += [f"--{n} must be >= 0" for n in ("learning_rate", "projector_lr", "weight_decay")
                 if getattr(args, n, None) is not None and getattr(args, n) < 0]
    problems += location_problems(args)
    if args.chat_template not in (None, "builtin") and not Path(args.chat_template).is_file():
        problems.append(f"--chat_template {args.chat_template}: no such file (or 'builtin')")
    if not Path(args.deepspeed_config).is_file():
        problems.append(f"--deepspeed_config {args.deepspeed_config}: no such file")
    try:
        from signllava.trackers import parse_report_to
        parse_report_to(args.report_to)
    except ValueError as e:
        problems.append(str(e))
    for flag in ("task_weights", "eval_task_weights"):
        try:
            parse_task_weights(getattr(args, flag))
        except ValueError as e:
            problems.append(f"--{flag}: {e}")
    if problems:
        p.error("; ".join(problems))


def location_problems(args) -> list[str]:
    """The data folder, the training split's annotation and modalities, and the output folder, checked from
    file names before the distributed start-up (the launcher's rendezvous, DeepSpeed's first-use builds), so a
    wrong path costs a second, not minutes."""
    if args.data_dir:
        problems = data_problems(args.data_dir, args.annotation_file, args.features, ["train"])
    else:
        problems = [f"--{n} needs --data_dir (its relative paths are under it)" for n in ("annotation_file", "features")
                    if getattr(args, n)]
    if not args.output_dir:                       # argparse reports a missing required flag itself
        return problems
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        problems.append(f"--output_dir {out}: a file, not a directory")
    elif not out.exists() and parent_problem(out):
        problems.append(f"--output_dir {out}: {parent_problem(out)}")
    elif not args.resume and not args.overwrite_output_dir and checkpoint.complete_checkpoints(out):
        problems.append(f"--output_dir {out}: already holds checkpoints; pass --resume to continue or "
                        "--overwrite_output_dir to start afresh")
    return problems


# ------------------------------------------------------------------------------------------- helpers
def init_distributed(device_type: str):
    # A plain `python pretrain.py` is a world of one; the deepspeed launcher sets these itself.
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0").items():
            os.environ.setdefault(k, v)
    import deepspeed
    deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo")


def barrier():
    torch.distributed.barrier()


def all_sum(x: float | int, device) -> float:
    if torch.distributed.get_world_size() == 1:     # no all-reduce, and no device sync waiting on it
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every generator's state as tensors, lists and numbers only, so that reading it back needs no pickled
    object (signllava/safe_load.py): numpy's key array becomes a list of ints."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    st = {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, gauss],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict):
    version, internal, gauss_next = st["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def to_device(batch: dict, device) -> dict:
    nb = device.type == "cuda"
    return {"input_ids": batch["input_ids"].to(device, non_blocking=nb),
            "attention_mask": batch["attention_mask"].to(device, non_blocking=nb),
            "labels": batch["labels"].to(device, non_blocking=nb),
            "features": {m: t.to(device, non_blocking=nb) for m, t in batch["features"].items()},
            "frame_index": {m: t.to(device, non_blocking=nb) for m, t in batch["frame_index"].items()},
            "absent_index": {m: t.to(device, non_blocking=nb) for m, t in batch.get("absent_index", {}).items()}}


def target_tokens(batch: dict) -> int:
    return int((batch["labels"][:, 1:] != -100).sum())


def deepspeed_config(path: str, args, world: int, dtype: torch.dtype, micro_batch: int | None = None) -> dict:
    with open(path) as f:
        cfg = json.load(f)
    # Batch geometry, precision and clipping come from our flags, so they cannot disagree with the loop.
    # The loop feeds DeepSpeed its own micro-batches and counts accumulation itself through
    # gradient_accumulation_steps; train_micro_batch_size_per_gpu only feeds DeepSpeed's bookkeeping (its
    # own dataloader, which we do not use, and its samples/throughput counters). Under a token budget the
    # micro-batch size varies, so the caller passes a representative size (the mean of epoch 0), and
    # train_batch_size is derived from it so that DeepSpeed's consistency check holds.
    micro = micro_batch or args.batch_size
    cfg["train_micro_batch_size_per_gpu"] = micro
    cfg["gradient_accumulation_steps"] = args.grad_accum
    cfg["train_batch_size"] = micro * args.grad_accum * world
    # check_grad_overflow: ZeRO then discards a bf16 update whose gradient norm is not finite, as it
    # always does in fp32 (train_step counts such skipped steps).
    cfg["bf16"] = {"enabled": dtype == torch.bfloat16, "check_grad_overflow": True}
    cfg["fp16"] = {"enabled": False}
    cfg["gradient_clipping"] = args.max_grad_norm
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float, projector_lr: float | None = None):
    """AdamW groups of the trainable parameters: weight decay on matrices (projector and LoRA weights), none on
    biases, norms or marker rows. With `projector_lr`, everything outside the LLM (projectors, marker rows)
    gets groups of its own at that rate, after the LLM's (so group 0's rate is the one logged as `lr`).
    Without it the groups are [decay, no decay], as checkpoints written before --projector_lr hold them."""
    groups: dict[tuple[bool, bool], list] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            own_lr = projector_lr is not None and not name.startswith("llm.")
            no_decay = p.ndim < 2 or name.startswith("marker_embed.")
            groups.setdefault((own_lr, no_decay), []).append(p)
    return [{"params": groups[key], "weight_decay": 0.0 if key[1] else weight_decay,
             "lr": projector_lr if key[0] else lr} for key in sorted(groups)]


def lr_schedule(kind: str, total: int, warmup: int, min_ratio: float):
    """step -> multiplier of each group's rate: linear warmup over `warmup` steps, then `kind` (SCHEDULES)."""
    decay = SCHEDULES[kind]

    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return decay(min(1.0, (step - warmup) / max(1, total - warmup)), min_ratio)
    return f


# progress through the decay in [0, 1], floor ratio -> multiplier
SCHEDULES = {"cosine": lambda prog, floor: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * prog)),
             "linear": lambda prog, floor: floor + (1 - floor) * (1 - prog),
             "constant": lambda prog, floor: 1.0}


def write_trainable_weights(state: dict[str, torch.Tensor], model: SignLLM, cfg: SignConfig, directory: Path):
    """What a checkpoint is used for later: projectors.safetensors (+ adapter/ in PEFT format) + config.json."""
    save_projectors({k: v for k, v in state.items() if k.startswith(TRAINABLE_PREFIXES)}, directory)
    lora = {k[len("llm."):]: v for k, v in state.items() if k.startswith("llm.")}
    if lora:
        model.llm.save_pretrained(str(directory / ADAPTER_DIR), state_dict=lora, safe_serialization=True)
    cfg.save(directory)


def prompt_tokens(builder: PromptBuilder, n_modalities: int) -> int:
    """Tokens of a training sequence that SignDataset.length leaves out: the chat template and the
    translation instruction around the modality segments (markers excluded: length counts them) and
    the end-of-turn token after the answer. Context sentences (--context_window) are not counted."""
    ids, _, _ = builder.build([0] * n_modalities, translation_prompt([]), None)
    return len(ids) - 2 * n_modalities + 1


class EpochPlans:
    """Each epoch's micro-batch plan and how many optimizer steps it makes, from (seed, epoch) alone.

    Fixed --batch_size: every epoch has ceil(N / batch_size) micro-batches, so the same number of steps.
    --max_tokens_per_batch: the count depends on how the epoch's shuffle falls into windows, so it is
    recomputed per epoch from the plan (the tail that would not fill a whole step on every rank is
    dropped, as rank_share does). `locate(step)` walks the epochs' counts: a resumed run needs nothing
    but its step to find its exact data position."""

    def __init__(self, lengths: np.ndarray, batch_size: int, seed: int, group_by_length: bool, max_tokens: int,
                 per_step: int, overhead: int = 0, packed: bool = False):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group_by_length
        self.max_tokens, self.per_step, self.overhead, self.packed = max_tokens, per_step, overhead, packed
        self._steps: dict[int, int] = {}

    def batches(self, epoch: int) -> list[list[int]]:
        return plan_epoch(self.lengths, self.batch_size, self.seed, epoch, self.group, max_tokens=self.max_tokens or None,
                          overhead=self.overhead, packed=self.packed)

    def steps(self, epoch: int) -> int:
        if not self.max_tokens:
            return -(-len(self.lengths) // self.batch_size) // self.per_step
        if epoch not in self._steps:
            self._steps[epoch] = len(self.batches(epoch)) // self.per_step
        return self._steps[epoch]

    def locate(self, step: int) -> tuple[int, int]:
        """Optimizer step -> (epoch, steps already taken in that epoch)."""
        if not self.max_tokens:
            return divmod(step, self.steps(0))
        epoch, empty = 0, 0
        while step >= self.steps(epoch):
            empty = empty + 1 if self.steps(epoch) == 0 else 0
            if empty > 1000:
                raise DataError("1000 epochs in a row make no optimizer step under this token budget")
            step -= self.steps(epoch)
            epoch += 1
        return epoch, step

    def total(self, epochs: float) -> int:
        """Optimizer steps of `epochs` epochs (a fraction takes that share of the last epoch's steps)."""
        if not self.max_tokens:
            return max(1, int(epochs * self.steps(0)))
        whole = int(epochs)
        return max(1, sum(self.steps(e) for e in range(whole)) + int((epochs - whole) * self.steps(whole)))


# ------------------------------------------------------------------------------------------- the run
@dataclass(frozen=True)
class RunEnv:
    """Where this process runs: the parsed flags (read, never written), the output and data directories,
    device, precision and its place among the ranks."""
    args: argparse.Namespace
    out: Path
    data_dir: Path
    paths: DataPaths                            # its files: today's layout, or --annotation_file / --features
    device: torch.device
    dtype: torch.dtype
    zero_stage: int
    rank: int
    world: int
    lock: object = None          # rank 0: OUTPUT_DIR's run lock, held for the whole run (signllava/run_lock.py)

    @property
    def zero3(self) -> bool:
        return self.zero_stage == 3

    @property
    def per_step(self) -> int:
        """Micro-batches in one optimizer step, over all ranks."""
        return self.world * self.args.grad_accum


def setup_run(args) -> RunEnv:
    """Distributed init, device and seed; refuse to overwrite a finished run; write the demo data if no
    --data_dir was given."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    init_distributed(device_type)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    seed_everything(args.seed)
    out = Path(args.output_dir)
    # Refused before anything in OUTPUT_DIR is touched.
    with open(args.deepspeed_config) as f:
        zero_stage = json.load(f).get("zero_optimization", {}).get("stage", 0)
    if zero_stage == 3 and args.compile_layers:
        raise RunError(f"--compile_layers: not with ZeRO-3 ({args.deepspeed_config}), whose hooks gather and release "
                       "each layer's weights around its forward; use ZeRO-2 or drop the flag")
    data_dir = Path(args.data_dir) if args.data_dir else out / "demo_data"
    lock = failure = None
    if rank == 0:
        try:
            lock = prepare_output(args, out)
            if not args.data_dir and not (data_dir / "annotation.train.json").exists():
                write_demo_data(data_dir)
        except (CheckpointError, DataError, RunError) as e:
            failure = e
    raise_everywhere(failure, world)
    barrier()
    if zero_stage == 3 and world == 1 and device.type == "cuda":
        # Measured on one H200 (issue 16): QLoRA 3.9 k real tokens/s under ZeRO-3 against 10-11 k under ZeRO-2.
        log.warning("ZeRO-3 on one GPU: parameters are gathered and released layer by layer on every pass with no "
                    "other rank to share them (QLoRA ran at under half ZeRO-2's speed); ds_config_zero2.json is "
                    "the default, ZeRO-3 is for models that need sharding over several GPUs")
    paths = DataPaths.from_specs(data_dir, args.annotation_file, args.features)
    if paths.describe():
        log.info("data files named explicitly: %s", paths.describe())
    return RunEnv(args, out, data_dir, paths, device, compute_dtype(device), zero_stage, rank, world, lock)


def prepare_output(args, out: Path) -> run_lock.RunLock:
    """(rank 0) Take OUTPUT_DIR's lock before anything in it is touched, so that no other run is writing there;
    then refuse a finished run (without --resume or --overwrite_output_dir), remove what an interrupted save of
    this folder left (it can only be ours now), and clear the previous run when asked."""
    out.mkdir(parents=True, exist_ok=True)
    lock = run_lock.hold(out)
    if not args.resume and checkpoint.complete_checkpoints(out) and not args.overwrite_output_dir:
        raise CheckpointError(f"{out}: already holds checkpoints; pass --resume to continue or --overwrite_output_dir")
    if args.resume:
        checkpoint.latest_checkpoint(out)      # a `latest` naming anything but a checkpoint of this run: refused now
    for left in checkpoint.leftovers(out):
        checkpoint.remove_leftover(left)
        log.info("removed %s, left by an interrupted save", left)
    if args.overwrite_output_dir and not args.resume:
        gone = checkpoint.clear_run(out)
        if gone:
            log.info("--overwrite_output_dir: removed the previous run's %s", ", ".join(gone))
    return lock


def raise_everywhere(failure: Exception | None, world: int):
    """Rank 0's one-line error raised on every rank, so that none waits at a barrier for a rank that stopped."""
    if world > 1:
        sent = [None if failure is None else (type(failure).__name__, message(failure))]
        torch.distributed.broadcast_object_list(sent, src=0)
        if sent[0] is not None:
            kind, text = sent[0]
            failure = {"CheckpointError": CheckpointError, "DataError": DataError}.get(kind, RunError)(text)
    if failure is not None:
        raise failure


def write_demo_data(data_dir: Path):
    """(rank 0) The built-in demo language, built beside `data_dir` and renamed into place (demo.write_demo): a
    kill or a full disk half-way never leaves a partial dataset that the next start would take for the whole one."""
    from signllava.demo import write_demo
    log.info("no --data_dir: writing the built-in demo language to %s", data_dir)
    write_demo(data_dir)


@dataclass
class Data:
    """The tokenizer's prompt layout and the train / dev splits built with it."""
    tokenizer: object
    builder: PromptBuilder
    pad_id: int
    train: SignDataset
    dev: SignDataset | None


def load_data(env: RunEnv, tokenizer, modalities: list[str] | None = None,
              expected_dims: dict[str, int] | None = None, base_model: str | None = None) -> Data:
    """Train and dev splits of --data_dir. `modalities` (default: --modalities, else every folder) and
    `expected_dims` come from a stage-1 checkpoint when there is one; `base_model`'s config gives the
    default --max_seq_len."""
    a = env.args
    ids = special_ids(tokenizer)
    if a.modalities:
        modalities = a.modalities.split(",")
    opts = DataOptions(modalities=modalities, max_frames=parse_max_frames(a.max_frames), frame_cap=a.frame_cap,
                       missing_modality=a.missing_modality, modality_dropout=a.modality_dropout,
                       max_seq_len=a.max_seq_len or (max_positions(base_model) if base_model else 0), long_samples=a.long_samples,
                       context_window=a.context_window, prelude_window=a.prelude_window,
                       use_paraphrases=a.use_paraphrases, task_weights=parse_task_weights(a.task_weights),
                       max_num_words=a.max_num_words, seed=a.seed, context_dropout=a.context_dropout,
                       context_noise=a.context_noise)
    builder = PromptBuilder(tokenizer, ids["markers"], ids["pad"])
    train = SignDataset(env.paths, "train", builder, opts, train=True, expected_dims=expected_dims)
    dev_opts = replace(opts, task_weights=parse_task_weights(a.eval_task_weights or a.task_weights))
    has_dev = env.paths.has_split("dev")
    dev = SignDataset(env.paths, "dev", builder, dev_opts, train=False, expected_dims=train.dims) if has_dev else None
    log.info("train: %d clips, modalities %s, dims %s%s", len(train), ",".join(train.modalities), train.dims,
             f"; dev: {len(dev)} clips" if dev else "; no dev split")
    for split in (train, dev) if dev else (train,):
        split.log_task_mix()
    return Data(tokenizer, builder, ids["pad"], train, dev)


def model_config(env: RunEnv, data: Data, stage: int, base_model: str, tokenizer_path: str, added_tokens: bool,
                 projector_types: dict[str, str] | None = None, inherited_extraction: dict | None = None,
                 **extra) -> SignConfig:
    """The SignConfig saved with every checkpoint: enough to rebuild the model without any flag, and to
    extract new videos as its training data was (the dataset's extraction record, else stage 1's)."""
    a = env.args
    own = dataset_record(env.paths.data_dir)
    diffs = differences(inherited_extraction, own) if own and inherited_extraction else []
    if diffs:
        log.warning("%s: extracted otherwise than stage 1's data (%s); the checkpoint records this dataset's way",
                    env.paths.data_dir / SETTINGS_FILE, ", ".join(diffs[:6]))
    extraction = own or inherited_extraction
    mods = data.train.modalities
    try:
        ptypes = projector_types or parse_projector_types(a.projector_type, mods)
    except ValueError as e:
        raise RunError(f"--projector_type {a.projector_type}: {e}") from None
    return SignConfig(base_model=base_model, tokenizer=tokenizer_path, modalities=mods, dims=data.train.dims,
                      projector_types={m: ptypes[m] for m in mods}, stage=stage, added_tokens=added_tokens,
                      context_window=a.context_window, prelude_window=a.prelude_window,
                      max_frames=data.train.limits, frame_cap=a.frame_cap, max_seq_len=data.train.opts.max_seq_len,
                      modality_embeddings=True, extraction=extraction, **extra)


@dataclass
class Best:
    """The best evaluation so far by `metric` (a --metric_for_best name): its step and score."""
    metric: str
    step: int | None = None
    score: float | None = None

    def improved_by(self, score: float) -> bool:
        if self.score is None:
            return True
        return score < self.score if self.metric == "dev_loss" else score > self.score


@dataclass
class EvalTranslation:
    """Training's translation of a fixed dev subset: generate.py's Translator on the model being trained,
    the dev split read as generate.py reads it (same clips, order, prompts, context policy)."""
    translator: object
    dataset: object
    indices: list[int]
    context: str
    max_new_tokens: int


@dataclass
class TrainState:
    """What the phases of `fit` share. `step`, `best_dev_loss`, `best` and the skipped-step counts are all
    that a resume restores beyond DeepSpeed's own state: the data position follows from the step (EpochPlans)."""
    env: RunEnv
    model: SignLLM
    cfg: SignConfig
    data: Data
    plans: EpochPlans
    total: int
    engine: object = None
    scheduler: object = None
    trackers: object = None                     # signllava.trackers.Trackers on rank 0
    step: int = 0
    best_dev_loss: float | None = None
    dev_loss: float | None = None
    skipped_steps: int = 0          # steps whose update was discarded (non-finite loss or gradient norm)
    bad_in_a_row: int = 0
    best: Best | None = None                    # None: no dev split, nothing to pick by
    translation: EvalTranslation | None = None
    dev_postfix: dict | None = None             # the last evaluation, for the progress bar
    eval_scores: dict | None = None             # the last evaluation's whole suite, signatures and intervals
    best_scores: dict | None = None             # the same of the best evaluation (this process's own)


def fit(env: RunEnv, model: SignLLM, cfg: SignConfig, data: Data) -> int:
    """The shared loop of both stages: plan, engine, resume, train, summary."""
    model.packing = env.args.packing
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("trainable parameters: %s (%s)", f"{n_train:,}",
             ", ".join(sorted({n.split(".")[0] if not n.startswith("llm.") else "lora"
                               for n, p in model.named_parameters() if p.requires_grad})))
    resume_from = checkpoint.latest_checkpoint(env.out) if env.args.resume else None
    if env.args.resume and resume_from is None:
        log.info("--resume: %s holds no complete checkpoint, starting from scratch", env.out)
    plans, total, micro_batch = plan(env, data)
    state = TrainState(env, model, cfg, data, plans, total)
    make_engine(state, micro_batch)
    setup_evaluation(state)
    if resume_from is not None:
        resume(state, resume_from)
    if env.rank == 0:
        write_run_args(env.args, env.out / "args.yaml")
        state.trackers = start_trackers(env)
    train(state)
    if state.trackers:
        state.trackers.close()
    if env.rank == 0:
        write_summary(state)
        if cfg.stage == 2:        # a finished stage-2 run describes itself (export.py writes the same card)
            from signllava.model_card import write_model_card
            log.info("model card: %s", write_model_card(env.out, cfg, cfg.base_model, env.out, [], adapter=True))
    barrier()
    return 0


def write_summary(state: TrainState):
    """(rank 0) train_summary.json (the last and the best evaluation) and the curves picture."""
    from signllava.curves import draw_curves
    out, best = state.env.out, state.best
    summary = {"steps": state.step, "skipped_steps": state.skipped_steps, "dev_loss": state.dev_loss,
               "best_dev_loss": state.best_dev_loss, "checkpoint": str(checkpoint.latest_checkpoint(out))}
    if best is not None and best.step is not None:
        summary["best"] = {"metric": best.metric, "step": best.step, "score": best.score,
                           "checkpoint": str(out / f"checkpoint-{best.step}")}
    if state.eval_scores:       # the model card's dev scores, with signatures and intervals
        summary["dev_scores"] = {"step": state.step, **state.eval_scores}
        if state.best_scores:
            summary["best_dev_scores"] = state.best_scores
    write_atomic(out / "train_summary.json", json.dumps(summary, indent=1))
    log.info("done: %s", summary)
    if (out / "metrics.jsonl").is_file():
        log.info("curves: %s", draw_curves(out))


def plan(env: RunEnv, data: Data) -> tuple[EpochPlans, int, int | None]:
    """-> (the epochs' batch plans, total optimizer steps, the representative micro-batch size DeepSpeed is
    told under a token budget)."""
    a, ds = env.args, data.train
    lengths = np.asarray([ds.length(i) for i in range(len(ds))])
    plans = EpochPlans(lengths, a.batch_size, a.seed, a.group_by_length, a.max_tokens_per_batch, env.per_step,
                       overhead=prompt_tokens(data.builder, len(ds.modalities)), packed=a.packing)
    if plans.steps(0) == 0:
        batch = f"token budget {a.max_tokens_per_batch}" if a.max_tokens_per_batch else f"batch {a.batch_size}"
        raise DataError(f"{env.data_dir}: {len(ds)} training clips make fewer than one optimizer step "
                        f"({batch} x accumulation {a.grad_accum} x {env.world} ranks)")
    micro_batch = None
    if a.max_tokens_per_batch:
        sizes = [len(b) for b in plans.batches(0)]
        micro_batch = max(1, round(len(ds) / len(sizes)))
        log.info("token budget %d (clip length + %d prompt tokens): epoch 0 has %d micro-batches of %d-%d clips "
                 "(mean %.1f), %d optimizer steps", a.max_tokens_per_batch, plans.overhead, len(sizes), min(sizes),
                 max(sizes), len(ds) / len(sizes), plans.steps(0))
    return plans, a.max_steps or plans.total(a.epochs), micro_batch


def make_engine(state: TrainState, micro_batch: int | None):
    """AdamW (weight decay on matrices only; --projector_lr for the projectors in stage 2) and warmup +
    --lr_scheduler, wrapped in the DeepSpeed engine."""
    import deepspeed
    env, a = state.env, state.env.args
    warmup = int(a.warmup_ratio * state.total)
    groups = param_groups(state.model, a.weight_decay, a.learning_rate, getattr(a, "projector_lr", None))
    optimizer = torch.optim.AdamW(groups, lr=a.learning_rate, betas=(0.9, 0.999),
                                  eps=1e-8, **({"fused": True} if env.device.type == "cuda" else {}))
    schedule = lr_schedule(a.lr_scheduler, state.total, warmup, a.min_lr_ratio)
    state.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    state.engine, _, _, _ = deepspeed.initialize(model=state.model, optimizer=optimizer, lr_scheduler=state.scheduler,
                                                 config=deepspeed_config(a.deepspeed_config, a, env.world, env.dtype,
                                                                         micro_batch))
    safe_load.guard_engine(state.engine)             # DeepSpeed's own checkpoint reads run no code either
    if env.zero_stage in (1, 2) and skip_per_tensor_overflow_scan(state.engine.optimizer):
        log.info("ZeRO-%d: non-finite steps are found by the gradient norm (per-tensor scan skipped)", env.zero_stage)


def skip_per_tensor_overflow_scan(optimizer) -> bool:
    """ZeRO-1/2 (DeepSpeed's stage_1_and_2 optimizer) checks each step for inf/NaN twice: a scan of every
    gradient tensor, a few tiny kernels and their launches each, then the global gradient norm that clipping
    computes anyway. An inf or NaN anywhere makes that norm non-finite, so while the norm is computed the scan
    decides nothing the norm does not; it only costs: QLoRA's ~470 LoRA tensors kept an H200 idle for 140-170 ms
    of each ~1 s step (bench/real_scripts.sh's profile). The scan is skipped then; the norm still discards the
    step (test_faults). Returns whether it was skipped."""
    if not (getattr(optimizer, "compute_grad_norm", False) and callable(getattr(optimizer, "check_overflow", None))
            and hasattr(optimizer, "has_overflow_partitioned_grads_serial")):
        return False
    optimizer.check_overflow = lambda partition_gradients=True: None    # step() has just set overflow = False
    return True


def batch_geometry(batch_size: int, budget: int, grad_accum: int, world: int, packed: bool) -> str:
    batch = f"{'packed' if packed else 'padded'} token budget {budget}" if budget else f"batch {batch_size}"
    return f"{batch} x {grad_accum} accumulation x {world} ranks"


# The flags whose values a resumed run takes from the checkpoint, not from the command line: the optimizer's
# param groups (rates, decay) and the scheduler's base rates are DeepSpeed state, loaded over the ones the flags
# built. A different value is refused, never silently ignored while args.yaml records it. (The schedule's shape,
# --lr_scheduler / --warmup_ratio / --min_lr_ratio / --max_steps, is rebuilt from the flags and does take effect.)
OPTIMISER_FLAGS = ("learning_rate", "projector_lr", "weight_decay")
# What makes the trained modules' shapes: a checkpoint with other ones cannot be loaded into this model.
MODEL_FIELDS = ("modalities", "dims", "projector_types", "lora", "bits", "modality_embeddings",
                "standardize_features")


def resume_mismatches(state: TrainState, directory: Path, saved: dict) -> list[str]:
    """Each flag or model setting of this start that differs from the run's checkpoint (checkpoints written
    before the optimiser's flags were recorded are checked on the model only)."""
    a = state.env.args
    recorded = saved.get("optimiser", {})
    out = [f"--{k} {getattr(a, k)} (the run: {recorded[k]})" for k in OPTIMISER_FLAGS
           if k in recorded and getattr(a, k, None) != recorded[k]]
    then = SignConfig.load(directory)
    as_saved = lambda v: json.loads(json.dumps(v))     # noqa: E731 (tuples and lists alike, as config.json holds them)
    return out + [f"{k} {getattr(state.cfg, k)} (the run: {getattr(then, k)})" for k in MODEL_FIELDS
                  if as_saved(getattr(state.cfg, k)) != as_saved(getattr(then, k))]


def resume(state: TrainState, directory: Path):
    """Load `directory` into the engine (DeepSpeed's own partitions when the world size and ZeRO stage match,
    the portable state otherwise), then restore the step, best dev loss and this rank's RNG."""
    env, a = state.env, state.env.args
    saved = checkpoint.read_state(directory)
    if saved.get("stage") != state.cfg.stage:
        raise CheckpointError(f"{directory}: a stage-{saved.get('stage')} checkpoint; cannot resume stage {state.cfg.stage} from it")
    saved_budget, saved_packing = saved.get("max_tokens_per_batch", 0), saved.get("packing", False)
    # A token budget counts tokens differently packed and padded, so the plan depends on packing too.
    if (saved["world_size"] * saved["grad_accum"] != env.per_step or saved_budget != a.max_tokens_per_batch
            or (not a.max_tokens_per_batch and saved["batch_size"] != a.batch_size)
            or (a.max_tokens_per_batch and saved_packing != a.packing)):
        then = batch_geometry(saved["batch_size"], saved_budget, saved["grad_accum"], saved["world_size"], saved_packing)
        now = batch_geometry(a.batch_size, a.max_tokens_per_batch, a.grad_accum, env.world, a.packing)
        raise CheckpointError(f"{directory}: saved with {then}; resume needs the same global batch (now {now})")
    differ = resume_mismatches(state, directory, saved)
    if differ:
        raise CheckpointError(f"{directory}: --resume continues the run as it was trained, and this start differs: "
                              f"{'; '.join(differ)} (use the run's values, or start a new run in another folder)")
    if saved["world_size"] == env.world and saved.get("zero_stage") == env.zero_stage:
        try:
            load_path, _ = state.engine.load_checkpoint(str(directory), tag="deepspeed", load_module_strict=False)
        except (AssertionError, KeyError, OSError, RuntimeError, ValueError) as e:      # DeepSpeed's, on bad files
            raise CheckpointError(f"{directory}: DeepSpeed state unreadable ({type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:200] if str(e) else 'no message'})") from None
        if load_path is None:
            raise CheckpointError(f"{directory}: DeepSpeed state missing or unreadable")
    else:
        # DeepSpeed's partitions only load into the same world size and ZeRO stage.
        log.info("resuming %d ranks / ZeRO-%s from %d ranks / ZeRO-%s through the portable optimizer state",
                 env.world, env.zero_stage, saved["world_size"], saved.get("zero_stage"))
        portable_state.restore(state.engine, directory)
    state.step, state.best_dev_loss = saved["step"], saved.get("best_dev_loss")
    state.skipped_steps, state.bad_in_a_row = saved.get("skipped_steps", 0), saved.get("bad_in_a_row", 0)
    restore_best(state, saved, directory)
    rng_file = directory / f"rng_state_{env.rank % saved['world_size']}.pt"
    set_rng_state(safe_load.load(rng_file))
    log.info("resumed from %s at step %d", directory, state.step)


def start_trackers(env: RunEnv):
    """(rank 0) The --report_to trackers, the run's flags as their config."""
    from signllava.config import NOT_RECORDED
    from signllava.trackers import Trackers, parse_report_to
    a = env.args
    config = {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
              for k, v in vars(a).items() if k not in NOT_RECORDED}
    return Trackers(parse_report_to(a.report_to), env.out, a.run_name or env.out.resolve().name, a.tracker_project,
                    config, resume=a.resume)


def record(state: TrainState, row: dict):
    """Rank 0: one JSON line per record in OUTPUT_DIR/metrics.jsonl, and the row to each --report_to tracker."""
    if state.trackers is None:
        return
    state.trackers.log(row)
    # Appended in place, not rewritten atomically: an append-only log whose earlier lines a write never touches;
    # a kill loses at most the line being written, which curves.read_series skips as the last line.
    with open(state.env.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def evaluate(state: TrainState) -> float | None:
    """Token-mean loss over the whole dev split, shared among the ranks."""
    env, dev = state.env, state.data.dev
    if dev is None:
        return None
    state.engine.eval()
    batches = eval_batches(dev, env.args.eval_batch_size)
    mine = batches[env.rank::env.world]
    n_max = -(-len(batches) // env.world)
    # Under ZeRO-3 every rank must run the same number of forwards: pad with weight-0 repeats.
    weights = [1.0] * len(mine) + [0.0] * (n_max - len(mine))
    mine = mine + [batches[0]] * (n_max - len(mine))
    tot = cnt = 0.0
    loader = make_loader(dev, mine, Collator(state.data.pad_id), env.args.num_workers, env.device.type == "cuda")
    with torch.no_grad():
        for w, batch in zip(weights, loader):
            with faults.out_of_memory_named(batch, env.args, f"step {state.step}, dev evaluation", training=False):
                loss, n = state.engine(**to_device(batch, env.device))
            tot += w * loss.item()
            cnt += w * n.item()
    state.engine.train()
    tot, cnt = all_sum(tot, env.device), all_sum(cnt, env.device)
    return tot / max(cnt, 1.0)


def setup_evaluation(state: TrainState):
    """What picks the best checkpoint and, unless --eval_generate 0, the dev subset translated at evaluation
    (context as generate.py's default: the model's own predictions when trained with a window, else none)."""
    env, a = state.env, state.env.args
    if state.data.dev is None:
        return
    n = EVAL_GENERATE_CAP if a.eval_generate is None else a.eval_generate
    if n > 0:
        from generate import Translator, context_policy, generation_dataset
        tr = Translator(state.model, state.data.tokenizer, state.cfg, env.device)
        tr.synced_ranks = env.zero3 and env.world > 1
        if env.zero3:       # ZeRO-3 gathers each layer's weights in hooks around its forward: no static buffers
            tr.decode_steps = "eager"
        mode, cw, pw = context_policy(state.cfg, None)
        ds = generation_dataset(env.paths, "dev", tr.builder, state.cfg, mode, cw, pw, seed=a.seed)
        indices = list(range(min(n, len(ds))))
        longest = max(len(tr.tokenizer(ds.annotation.clips[tuple(ds.items[i][:2])].translation)["input_ids"])
                      for i in indices)
        state.translation = EvalTranslation(tr, ds, indices, mode, a.eval_max_new_tokens or 2 * longest + 8)
        log.info("evaluation translates %d of %d dev clips (%d beams, context %s; generate.py --limit %d "
                 "--num_beams %d --max_new_tokens %d repeats it)", len(indices), len(ds), a.eval_num_beams, mode,
                 len(indices), a.eval_num_beams, state.translation.max_new_tokens)
    state.best = Best(a.metric_for_best or ("bleu" if state.translation else "dev_loss"))


def restore_best(state: TrainState, saved: dict, directory: Path):
    """Best-tracking as it stood at the checkpoint; `O/best` repointed in case the kill came between the
    checkpoint's commit and the pointer's move."""
    if state.best is None or saved.get("best_metric") is None:
        return
    if saved["best_metric"] != state.best.metric:
        raise CheckpointError(f"{directory}: its run picks the best checkpoint by {saved['best_metric']}; resume "
                              f"with --metric_for_best {saved['best_metric']}")
    state.best = Best(saved["best_metric"], saved["best_step"], saved["best_score"])
    if state.env.rank == 0 and state.best.step is not None and (state.env.out / f"checkpoint-{state.best.step}").is_dir():
        checkpoint.point_best(state.env.out, state.best.step)


def evaluate_translation(state: TrainState) -> dict | None:
    """BLEU and chrF of the fixed dev subset, translated by generate.py's batched beam search: each rank its
    share of the videos, gathered; under ZeRO-3 with several ranks every rank makes the same number of generate
    calls (padded with dummy ones) and generate() keeps finished ranks stepping. The RNG is put back afterwards,
    so evaluating never changes the training trajectory."""
    from generate import count_calls, gather_results, generate_split, share_by_video
    from signllava.scoring import N_BOOTSTRAP, compute_metrics, score_rows
    t, env, a = state.translation, state.env, state.env.args
    if t is None:
        return None
    predicted = t.context == "predicted"
    if predicted:
        t.dataset.context_texts = {}             # context from this evaluation's own outputs only
    mine = share_by_video(t.dataset, t.indices, env.rank, env.world)
    calls = None
    if t.translator.synced_ranks:
        n = torch.tensor([count_calls(t.dataset, mine, predicted, a.eval_batch_size)], device=env.device)
        torch.distributed.all_reduce(n, op=torch.distributed.ReduceOp.MAX)
        calls = int(n.item())
    saved_rng = rng_state()
    state.engine.eval()
    results = generate_split(t.translator, t.dataset, mine, task="translation", predicted=predicted,
                             batch_size=a.eval_batch_size, num_beams=a.eval_num_beams,
                             max_new_tokens=t.max_new_tokens, num_workers=a.num_workers, calls=calls,
                             progress=False)
    state.engine.train()
    set_rng_state(saved_rng)
    results = gather_results(results, env.world)
    keys = [k for k in (tuple(t.dataset.items[i][:2]) for i in t.indices) if k in results]
    m = compute_metrics([results[k]["hypothesis"] for k in keys], [results[k]["reference"] for k in keys],
                        paraphrases=[t.dataset.annotation.clips[k].paraphrases for k in keys], n_bootstrap=N_BOOTSTRAP)
    if state.eval_scores is None:     # once: what reproduces each logged score
        log.info("evaluation scores: %s", "; ".join(f"{name} [{sig}]" for name, _, _, sig in score_rows(m)))
    state.eval_scores = m
    return {f"dev_{k}": m[k] for k in EVAL_SCALARS if k in m} | {
        f"dev_{k}_ci95": m["ci95"][k]["pm"] for k in ("bleu", "chrf")}


def run_evaluation(state: TrainState) -> bool:
    """Dev loss and (if on) translation scores, logged; True when they make this step the new best."""
    with kernels.eager_layers():
        state.dev_loss = evaluate(state)
        if state.dev_loss is None:
            return False
        scores = evaluate_translation(state) or {}
    best = state.best_dev_loss
    state.best_dev_loss = state.dev_loss if best is None else min(best, state.dev_loss)
    row = {"step": state.step, "dev_loss": state.dev_loss, **scores}
    log.info("step %d: %s", state.step, ", ".join(f"{k.replace('_', ' ')} {v:.4f}" for k, v in row.items() if k != "step"))
    record(state, row)
    state.dev_postfix = {k: f"{v:.4f}" if k == "dev_loss" else f"{v:.2f}" for k, v in row.items()
                         if k in ("dev_loss", "dev_bleu", "dev_chrf")}
    score = row[BEST_KEYS[state.best.metric]]
    if not state.best.improved_by(score):
        return False
    state.best = Best(state.best.metric, state.step, score)
    state.best_scores = state.eval_scores and {"step": state.step, **state.eval_scores}
    return True


def save_checkpoint(state: TrainState):
    """A complete checkpoint or none. A save that the file system refuses (full disk, permissions) stops the
    run with one line and its `.tmp` removed; the previous checkpoint and `latest` stay as they were."""
    env, step = state.env, state.step
    try:
        write_checkpoint(state)
    except Exception as e:
        why = faults.write_failure(e, env.out)
        if why is None:
            raise
        if env.rank == 0:
            checkpoint.remove_leftover(env.out / f"checkpoint-{step}.tmp")
        last = checkpoint.latest_checkpoint(env.out)
        raise RunError(f"{env.out / f'checkpoint-{step}'}: the save failed ({why}); run stopped, "
                       f"{last.name if last else 'no checkpoint'} stays the latest complete checkpoint "
                       f"(free space or fix permissions, then --resume)") from None


def write_checkpoint(state: TrainState):
    """Written into `checkpoint-N.tmp`, renamed when every rank is done: every file in it (DeepSpeed's states, RNG
    states, weights, adapter, config, trainer state) is written in place there, made visible whole by
    checkpoint.commit's manifest and rename."""
    env, a, step, best = state.env, state.env.args, state.step, state.best
    tmp = checkpoint.begin(env.out, step) if env.rank == 0 else env.out / f"checkpoint-{step}.tmp"
    barrier()
    state.engine.save_checkpoint(str(tmp), tag="deepspeed", exclude_frozen_parameters=True)
    if checkpoint.fault_requested("save_error", step):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp / f"rng_state_{env.rank}.pt"))
    portable = portable_state.gather(state.engine)          # collective: full fp32 trainables + Adam moments
    torch.save(rng_state(), tmp / f"rng_state_{env.rank}.pt")
    if env.rank == 0:
        write_trainable_weights(portable["params"], state.model, state.cfg, tmp)
        portable_state.save(portable, tmp)
        checkpoint.write_state(tmp, {
            "step": step, "stage": state.cfg.stage, "world_size": env.world, "grad_accum": a.grad_accum,
            "batch_size": a.batch_size, "max_tokens_per_batch": a.max_tokens_per_batch, "packing": a.packing,
            "seed": a.seed, "zero_stage": env.zero_stage, "dev_loss": state.dev_loss,
            "best_dev_loss": state.best_dev_loss, "total_steps": state.total, "skipped_steps": state.skipped_steps,
            "bad_in_a_row": state.bad_in_a_row, "optimiser": {k: getattr(a, k, None) for k in OPTIMISER_FLAGS},
            **({"best_metric": best.metric, "best_step": best.step, "best_score": best.score} if best else {})})
    barrier()
    checkpoint.fault_point("mid_save", step)
    if env.rank == 0:
        log.info("saved %s", checkpoint.commit(tmp, step, a.save_total_limit, best.step if best else None))
    barrier()
    checkpoint.fault_point("after_save", step)


class Throughput:
    """Loss and speed since the last log line: loss summed over all ranks, tokens and samples of this rank."""

    def __init__(self, world: int):
        self.world = world
        self.reset()

    def reset(self):
        self.t0, self.tokens, self.samples, self.loss_sum, self.targets = time.time(), 0, 0, 0.0, 0.0

    def row(self, step: int, lr: float) -> dict:
        """No loss when every step since the last line was skipped (skip_bad_step)."""
        dt = time.time() - self.t0
        loss = {"loss": self.loss_sum / self.targets} if self.targets else {}
        return {"step": step, **loss, "lr": lr,
                "samples_per_s": self.samples * self.world / dt, "tokens_per_s": self.tokens * self.world / dt}


def train_step(state: TrainState, micro: list[dict], meter: Throughput):
    """One optimizer step over this rank's micro-batches: the exact per-token mean over the global batch.
    ZeRO discards an update whose gradient norm is not finite, on every rank alike (the norm is reduced
    over the ranks); such a step, or one whose loss is not finite, goes to `skip_bad_step`."""
    env, engine = state.env, state.engine
    n_global = all_sum(sum(target_tokens(b) for b in micro), env.device)
    step_loss = 0.0
    for k, b in enumerate(micro):
        with faults.out_of_memory_named(b, env.args, f"step {state.step + 1}"):
            if k == 0 and checkpoint.fault_requested("oom", state.step + 1):
                raise torch.OutOfMemoryError("CUDA out of memory (injected by SIGNLLAVA_FAULT)")
            loss_sum, _ = engine(**to_device(b, env.device))
            if k == 0 and env.rank == 0 and checkpoint.fault_requested("nan_loss", state.step + 1):
                loss_sum = loss_sum * float("nan")
            # engine.backward divides by G and the gradient all-reduce averages over W; scaling by
            # G*W/N gives the exact per-token mean over the global batch.
            engine.backward(loss_sum * (env.per_step / max(n_global, 1.0)))
            engine.step()
        step_loss += loss_sum.item()
        meter.samples += len(b["meta"])
        meter.tokens += int(b["attention_mask"].sum())
    state.step += 1
    step_loss = all_sum(step_loss, env.device)
    if math.isfinite(step_loss) and engine.was_step_applied():
        state.bad_in_a_row = 0
        meter.loss_sum += step_loss
        meter.targets += n_global
    else:
        skip_bad_step(state, micro, "loss" if not math.isfinite(step_loss) else "gradient norm")


def skip_bad_step(state: TrainState, micro: list[dict], what: str):
    """(every rank) Count, log and record a step whose `what` was not finite; stop the run after
    --max_bad_steps of them in a row, before anything is saved."""
    env, a = state.env, state.env.args
    clips = [None] * env.world
    torch.distributed.all_gather_object(clips, [c for b in micro for c in faults.batch_clips(b)])
    clips = faults.clip_list([c for rank in clips for c in rank])
    last = checkpoint.latest_checkpoint(env.out)
    last = last.name if last else "no checkpoint"
    if state.engine.was_step_applied():        # only without ZeRO, whose fp32 optimizer checks nothing
        raise RunError(f"step {state.step}: non-finite {what} (clips {clips}) and the optimizer applied the update "
                       f"(ZeRO stage {env.zero_stage} does not discard it; ZeRO-1/2/3 does); run stopped, {last} "
                       f"stays the latest complete checkpoint")
    state.skipped_steps += 1
    state.bad_in_a_row += 1
    log.warning("step %d skipped: non-finite %s (%d in a row, %d in all); clips %s", state.step, what,
                state.bad_in_a_row, state.skipped_steps, clips)
    record(state, {"step": state.step, "skipped_steps": state.skipped_steps, "bad_in_a_row": state.bad_in_a_row})
    if state.bad_in_a_row >= a.max_bad_steps:
        raise RunError(f"step {state.step}: non-finite {what}, {state.bad_in_a_row} steps in a row "
                       f"(--max_bad_steps {a.max_bad_steps}); run stopped, {last} stays the latest complete "
                       f"checkpoint; this step's clips: {clips} (check their features, or lower --learning_rate)")


def train(state: TrainState):
    """Steps from `state.step` to `state.total`; each epoch's loader starts at the step's place in the plan."""
    from tqdm import tqdm
    env, a = state.env, state.env.args
    collate = Collator(state.data.pad_id)
    meter = Throughput(env.world)
    profiler = step_profiler.StepProfiler(a.profile_steps, env.out, env.rank, env.device)
    state.engine.train()
    epoch, k0 = state.plans.locate(state.step)
    # A context, so that a run stopped by an error closes its bar before the error line is printed.
    with tqdm(total=state.total, initial=state.step, disable=env.rank != 0, dynamic_ncols=True,
              desc=f"stage {state.cfg.stage}") as bar:
        while state.step < state.total:
            mine = [[(i, epoch) for i in b] for b in rank_share(state.plans.batches(epoch), env.rank, env.world, env.per_step)]
            it = iter(make_loader(state.data.train, mine[k0 * a.grad_accum:], collate, a.num_workers, env.device.type == "cuda"))
            for _ in range(k0, state.plans.steps(epoch)):
                if state.step >= state.total:
                    break
                train_step(state, [next(it) for _ in range(a.grad_accum)], meter)
                bar.update(1)
                profiler.after_step(state.step)
                after_step(state, meter, bar)
            epoch, k0 = epoch + 1, 0


def after_step(state: TrainState, meter: Throughput, bar):
    """Log, evaluate and save when their step has come (always at the last step; a new best always saved)."""
    a, step, last = state.env.args, state.step, state.step == state.total
    if step % a.logging_steps == 0 or last:
        lrs = state.scheduler.get_last_lr()
        row = meter.row(step, lrs[0])
        if lrs[-1] != lrs[0]:                    # --projector_lr: the projectors' group comes last
            row["projector_lr"] = lrs[-1]
        bar.set_postfix(loss=f"{row.get('loss', math.nan):.4f}", lr=f"{row['lr']:.2e}", **(state.dev_postfix or {}))
        if state.env.device.type == "cuda":
            row["peak_mem_gib"] = torch.cuda.max_memory_allocated(state.env.device) / 2**30
        record(state, row)
        meter.reset()
    new_best = False
    if step % a.eval_steps == 0 or last:
        new_best = run_evaluation(state)
        if state.dev_postfix:
            bar.set_postfix(**state.dev_postfix)
    # A new best is saved even off --save_steps: `O/best` must name a checkpoint that exists.
    if step % a.save_steps == 0 or last or new_best:
        save_checkpoint(state)
