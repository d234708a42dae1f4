"""The one training loop, used by both stages: explicit DeepSpeed engine, token-normalised loss,
exact resume, complete-or-invisible checkpoints.

A stage (pretrain.py, finetune.py) supplies only `Stage`: which base model and tokenizer, and how to
build the model with the right parameters trainable. Everything else lives here.

Batch plan. Each epoch is a list of micro-batches computed from (seed, epoch) alone. Optimizer step s
consumes global micro-batches [s*W*G, (s+1)*W*G) (W ranks, G accumulation steps); rank r takes every
W-th. So 1 rank x G=2 and 2 ranks x G=1 see the same samples per step, and the data position of a
checkpoint is just its step.

Packing (default; --no_packing turns it off): each micro-batch runs as one row of its samples end to end,
no padding, attention kept within each sample (model.SignLLM.packing, attention.py).

With --max_tokens_per_batch the micro-batches are cut by a token budget, so their number (and
with it the steps of an epoch) can change from epoch to epoch; `EpochPlans` recomputes each epoch's count
from its plan, so step -> (epoch, step within the epoch) still follows from (seed, flags) alone.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import checkpoint as ckpt
import portable_state
from data import (Collator, DataOptions, SignDataset, eval_batches, make_loader, parse_task_weights, plan_epoch,
                  rank_share)
from layout import DataError
from model import ADAPTER_DIR, CheckpointError, SignConfig, SignLLM, compute_dtype, save_projectors
from prompts import PromptBuilder, special_ids, translation_prompt

log = logging.getLogger("signllava")


# ------------------------------------------------------------------------------------------- flags
def add_common_args(p: argparse.ArgumentParser, lr: float, output_required: bool = True, output_help: str | None = None):
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", help="dataset in the Sign LLaVA layout (default: the built-in demo language, "
                                      "written to OUTPUT_DIR/demo_data)")
    g.add_argument("--modalities", help="comma-separated subset of the modality folders (default: all)")
    g.add_argument("--max_frames", type=int, default=0, help="cap frames per modality (0: no cap)")
    g.add_argument("--frame_cap", choices=["stride", "truncate"], default="stride")
    g.add_argument("--context_window", type=int, default=0, help="preceding sentences given as context")
    g.add_argument("--prelude_window", type=int, default=0, help="first sentences of the video given as context")
    g.add_argument("--use_paraphrases", action="store_true", help="sample targets from translation + paraphrases")
    g.add_argument("--task_weights", default="translation=1",
                   help="e.g. translation=0.7,one_word_present=0.1,multi_word_present=0.1,is_reversed=0.1")
    g.add_argument("--max_num_words", type=int, default=5, help="most words asked in multi_word_present")
    g.add_argument("--num_workers", type=int, default=2, help="DataLoader workers (each opens its own h5 handles)")
    g = p.add_argument_group("model")
    g.add_argument("--model", help="HF id or local path of a chat LLM (default: the embedded tiny Llama)")
    g.add_argument("--projector_type", default="mlp2x_gelu",
                   help="linear | identity | mlpNx_gelu; per modality: 'mlp2x_gelu,pose=linear'")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--no_packing", dest="packing", action="store_false",
                   help="padded rows under SDPA instead of packed rows (default packs each micro-batch into one "
                        "row, no padding, attention within each sample: the varlen flash kernel on GPU)")
    g.add_argument("--label_smoothing", type=float, default=0.0)
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", "--lr", type=float, default=lr)
    g.add_argument("--weight_decay", type=float, default=0.0)
    g.add_argument("--warmup_ratio", type=float, default=0.03)
    g.add_argument("--min_lr_ratio", type=float, default=0.0, help="cosine decays to lr * this")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
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
    g.add_argument("--grad_accum", type=int, default=1)
    g.add_argument("--max_steps", type=int, default=0, help="optimizer steps (overrides --epochs)")
    g.add_argument("--epochs", type=float, default=1.0)
    g.add_argument("--no_group_by_length", dest="group_by_length", action="store_false",
                   help="plain shuffled batches (default groups similar lengths to cut padding)")
    g.add_argument("--seed", type=int, default=42)
    g = p.add_argument_group("run")
    g.add_argument("--output_dir", required=output_required, help=output_help)
    g.add_argument("--deepspeed_config", default=str(Path(__file__).with_name("ds_config_zero2.json")))
    g.add_argument("--save_steps", type=int, default=500)
    g.add_argument("--save_total_limit", type=int, default=3, help="complete checkpoints kept (0: all)")
    g.add_argument("--eval_steps", type=int, default=500)
    g.add_argument("--eval_batch_size", type=int, default=16)
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR's latest complete checkpoint")
    g.add_argument("--overwrite_output_dir", action="store_true")
    g.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")


def validate_args(p: argparse.ArgumentParser, args):
    problems = []
    for name in ("batch_size", "grad_accum", "eval_batch_size", "save_steps", "eval_steps", "logging_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name} must be >= 1")
    for name in ("max_steps", "max_frames", "context_window", "prelude_window", "num_workers", "max_tokens_per_batch"):
        if getattr(args, name) < 0:
            problems.append(f"--{name} must be >= 0")
    if args.max_steps == 0 and args.epochs <= 0:
        problems.append("give --max_steps N or --epochs E > 0")
    if not 0 <= args.label_smoothing < 1:
        problems.append("--label_smoothing must be in [0, 1)")
    if args.data_dir and not Path(args.data_dir).is_dir():
        problems.append(f"--data_dir {args.data_dir}: no such directory")
    if not Path(args.deepspeed_config).is_file():
        problems.append(f"--deepspeed_config {args.deepspeed_config}: no such file")
    try:
        args.task_weight_map = parse_task_weights(args.task_weights)
    except ValueError as e:
        problems.append(f"--task_weights: {e}")
    if problems:
        p.error("; ".join(problems))


# ------------------------------------------------------------------------------------------- stage
@dataclass
class Context:
    args: argparse.Namespace
    out: Path
    data_dir: Path
    device: torch.device
    dtype: torch.dtype
    zero3: bool
    rank: int
    world: int


@dataclass
class Stage:
    number: int
    # -> (base_model, tokenizer path, projector config or None, projector state or None)
    resolve_base: Callable[[Context], tuple]
    # (ctx, cfg, tokenizer, projector state) -> model with only its trainable parameters requiring grad
    build: Callable


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
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.item()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()
    return st


def set_rng_state(st: dict):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state(st["cuda"])


def to_device(batch: dict, device) -> dict:
    nb = device.type == "cuda"
    return {"input_ids": batch["input_ids"].to(device, non_blocking=nb),
            "attention_mask": batch["attention_mask"].to(device, non_blocking=nb),
            "labels": batch["labels"].to(device, non_blocking=nb),
            "features": {m: t.to(device, non_blocking=nb) for m, t in batch["features"].items()},
            "frame_index": {m: t.to(device, non_blocking=nb) for m, t in batch["frame_index"].items()}}


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
    cfg["bf16"] = {"enabled": dtype == torch.bfloat16}
    cfg["fp16"] = {"enabled": False}
    cfg["gradient_clipping"] = args.max_grad_norm
    cfg.setdefault("steps_per_print", 10**9)
    return cfg


def param_groups(model: torch.nn.Module, weight_decay: float):
    """Weight decay on matrices (projector and LoRA weights); none on biases, norms or marker rows."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or name.startswith("marker_embed.") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_with_warmup(total: int, warmup: int, min_ratio: float):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        prog = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, prog)))
    return f


def export_trainable(state: dict[str, torch.Tensor], model: SignLLM, cfg: SignConfig, directory: Path):
    """Portable weights: projectors.safetensors (+ adapter/ in PEFT format) + config.json."""
    save_projectors({k: v for k, v in state.items() if k.startswith(("projectors.", "marker_embed."))}, directory)
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


# ------------------------------------------------------------------------------------------- run
def run(args, stage: Stage) -> int:
    """Entry point of both stages: clear one-line errors for user mistakes, tracebacks for bugs."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    try:
        return _run(args, stage)
    except (DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, stage: Stage) -> int:
    import deepspeed
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    init_distributed(device_type)
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    dtype = compute_dtype(device)
    seed_everything(args.seed)
    out = Path(args.output_dir)

    resume_from = ckpt.latest_checkpoint(out) if args.resume else None
    if not args.resume and ckpt.complete_checkpoints(out) and not args.overwrite_output_dir:
        raise CheckpointError(f"{out}: already holds checkpoints; pass --resume to continue or --overwrite_output_dir")
    if args.resume and resume_from is None:
        log.info("--resume: %s holds no complete checkpoint, starting from scratch", out)

    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(args.data_dir) if args.data_dir else out / "demo_data"
    if not args.data_dir and rank == 0 and not (data_dir / "annotation.train.json").exists():
        from demo_language import make_demo
        log.info("no --data_dir: writing the built-in demo language to %s", data_dir)
        make_demo(str(data_dir))
    barrier()

    with open(args.deepspeed_config) as f:
        zero_stage = json.load(f).get("zero_optimization", {}).get("stage", 0)
    ctx = Context(args, out, data_dir, device, dtype, zero_stage == 3, rank, world)

    # Base model and tokenizer, then the data (its dims size the projectors), then the model.
    base_model, tok_path, prev_cfg, prev_state = stage.resolve_base(ctx)
    from model import load_tokenizer
    tokenizer, added = load_tokenizer(tok_path)
    ids = special_ids(tokenizer)
    opts = DataOptions(modalities=args.modalities.split(",") if args.modalities else (prev_cfg.modalities if prev_cfg else None),
                       max_frames=args.max_frames, frame_cap=args.frame_cap, context_window=args.context_window,
                       prelude_window=args.prelude_window, use_paraphrases=args.use_paraphrases,
                       task_weights=args.task_weight_map, max_num_words=args.max_num_words, seed=args.seed)
    builder = PromptBuilder(tokenizer, ids["markers"], ids["pad"])
    expected = prev_cfg.dims if prev_cfg else None
    train_ds = SignDataset(data_dir, "train", builder, opts, train=True, expected_dims=expected)
    has_dev = (data_dir / "annotation.dev.json").exists()
    dev_ds = SignDataset(data_dir, "dev", builder, opts, train=False, expected_dims=train_ds.dims) if has_dev else None
    log.info("train: %d clips, modalities %s, dims %s%s", len(train_ds), ",".join(train_ds.modalities), train_ds.dims,
             f"; dev: {len(dev_ds)} clips" if dev_ds else "; no dev split")

    from model import parse_projector_types
    ptypes = prev_cfg.projector_types if prev_cfg else parse_projector_types(args.projector_type, train_ds.modalities)
    cfg = SignConfig(base_model=base_model, tokenizer=tok_path, modalities=train_ds.modalities, dims=train_ds.dims,
                     projector_types={m: ptypes[m] for m in train_ds.modalities}, stage=stage.number,
                     added_tokens=added, context_window=args.context_window, prelude_window=args.prelude_window,
                     max_frames=args.max_frames, frame_cap=args.frame_cap)
    model = stage.build(ctx, cfg, tokenizer, prev_state)
    model.packing = args.packing
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("trainable parameters: %s (%s)", f"{n_train:,}",
             ", ".join(sorted({n.split(".")[0] if not n.startswith("llm.") else "lora" for n, p in model.named_parameters() if p.requires_grad})))

    # Plan.
    per_step = world * args.grad_accum
    lengths = np.asarray([train_ds.length(i) for i in range(len(train_ds))])
    plans = EpochPlans(lengths, args.batch_size, args.seed, args.group_by_length, args.max_tokens_per_batch, per_step,
                       overhead=prompt_tokens(builder, len(train_ds.modalities)), packed=args.packing)
    micro_batch = None
    if plans.steps(0) == 0:
        batch = f"token budget {args.max_tokens_per_batch}" if args.max_tokens_per_batch else f"batch {args.batch_size}"
        raise DataError(f"{data_dir}: {len(train_ds)} training clips make fewer than one optimizer step "
                        f"({batch} x accumulation {args.grad_accum} x {world} ranks)")
    if args.max_tokens_per_batch:
        sizes = [len(b) for b in plans.batches(0)]
        micro_batch = max(1, round(len(train_ds) / len(sizes)))
        log.info("token budget %d (clip length + %d prompt tokens): epoch 0 has %d micro-batches of %d-%d clips "
                 "(mean %.1f), %d optimizer steps", args.max_tokens_per_batch, plans.overhead, len(sizes), min(sizes),
                 max(sizes), len(train_ds) / len(sizes), plans.steps(0))
    total = args.max_steps or plans.total(args.epochs)
    warmup = int(args.warmup_ratio * total)

    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate, betas=(0.9, 0.999),
                                  eps=1e-8, **({"fused": True} if device_type == "cuda" else {}))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(total, warmup, args.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=deepspeed_config(args.deepspeed_config, args, world, dtype, micro_batch))
    step = 0
    best_dev = None
    if resume_from is not None:
        state = ckpt.read_state(resume_from)
        if state.get("stage") != stage.number:
            raise CheckpointError(f"{resume_from}: a stage-{state.get('stage')} checkpoint; cannot resume stage {stage.number} from it")
        saved_global = state["world_size"] * state["grad_accum"]
        saved_budget = state.get("max_tokens_per_batch", 0)
        saved_packing = state.get("packing", False)
        # A token budget counts tokens differently packed and padded, so the plan depends on packing too.
        if (saved_global != per_step or saved_budget != args.max_tokens_per_batch
                or (not args.max_tokens_per_batch and state["batch_size"] != args.batch_size)
                or (args.max_tokens_per_batch and saved_packing != args.packing)):
            def geometry(bs, budget, gas, w, packed):
                batch = f"{'packed' if packed else 'padded'} token budget {budget}" if budget else f"batch {bs}"
                return f"{batch} x {gas} accumulation x {w} ranks"
            raise CheckpointError(f"{resume_from}: saved with "
                                  f"{geometry(state['batch_size'], saved_budget, state['grad_accum'], state['world_size'], saved_packing)}; "
                                  f"resume needs the same global batch (now "
                                  f"{geometry(args.batch_size, args.max_tokens_per_batch, args.grad_accum, world, args.packing)})")
        if state["world_size"] == world and state.get("zero_stage") == zero_stage:
            load_path, _ = engine.load_checkpoint(str(resume_from), tag="deepspeed", load_module_strict=False)
            if load_path is None:
                raise CheckpointError(f"{resume_from}: DeepSpeed state missing or unreadable")
        else:
            # DeepSpeed's partitions only load into the same world size and ZeRO stage.
            log.info("resuming %d ranks / ZeRO-%s from %d ranks / ZeRO-%s through the portable optimizer state",
                     world, zero_stage, state["world_size"], state.get("zero_stage"))
            portable_state.restore(engine, resume_from)
        step, best_dev = state["step"], state.get("best_dev_loss")
        rng_file = resume_from / f"rng_state_{rank % state['world_size']}.pt"
        set_rng_state(torch.load(rng_file, weights_only=False))
        log.info("resumed from %s at step %d", resume_from, step)

    writer = None
    if rank == 0:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out / "runs"))
        (out / "args.json").write_text(json.dumps({k: v for k, v in vars(args).items() if k != "task_weight_map"}, indent=1))
    collate = Collator(ids["pad"])

    def record(row: dict):
        """Rank 0: TensorBoard scalars plus one JSON line per record in OUTPUT_DIR/metrics.jsonl."""
        if writer is None:
            return
        for k, v in row.items():
            if k != "step":
                writer.add_scalar(("dev/" if k.startswith("dev") else "train/") + k, v, row["step"])
        with open(out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def evaluate() -> float | None:
        if dev_ds is None:
            return None
        engine.eval()
        batches = eval_batches(dev_ds, args.eval_batch_size)
        mine = batches[rank::world]
        n_max = -(-len(batches) // world)
        # Under ZeRO-3 every rank must run the same number of forwards: pad with weight-0 repeats.
        weights = [1.0] * len(mine) + [0.0] * (n_max - len(mine))
        mine = mine + [batches[0]] * (n_max - len(mine))
        tot = cnt = 0.0
        with torch.no_grad():
            for w, batch in zip(weights, make_loader(dev_ds, mine, collate, args.num_workers, device_type == "cuda")):
                loss, n = engine(**to_device(batch, device))
                tot += w * loss.item()
                cnt += w * n.item()
        engine.train()
        tot, cnt = all_sum(tot, device), all_sum(cnt, device)
        return tot / max(cnt, 1.0)

    def save(step: int, dev_loss):
        tmp = ckpt.begin(out, step) if rank == 0 else out / f"checkpoint-{step}.tmp"
        barrier()
        engine.save_checkpoint(str(tmp), tag="deepspeed", exclude_frozen_parameters=True)
        portable = portable_state.gather(engine)          # collective: full fp32 trainables + Adam moments
        state = portable["params"]
        torch.save(rng_state(), tmp / f"rng_state_{rank}.pt")
        if rank == 0:
            export_trainable(state, model, cfg, tmp)
            portable_state.save(portable, tmp)
            ckpt.write_state(tmp, {"step": step, "stage": stage.number, "world_size": world, "grad_accum": args.grad_accum,
                                   "batch_size": args.batch_size,
                                   "max_tokens_per_batch": args.max_tokens_per_batch, "packing": args.packing, "seed": args.seed, "zero_stage": zero_stage, "dev_loss": dev_loss,
                                   "best_dev_loss": best_dev, "total_steps": total})
        barrier()
        ckpt.fault_point("mid_save", step)
        if rank == 0:
            final = ckpt.commit(tmp, step, args.save_total_limit)
            log.info("saved %s", final)
        barrier()
        ckpt.fault_point("after_save", step)

    engine.train()
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, disable=rank != 0, dynamic_ncols=True, desc=f"stage {stage.number}")
    t0, tok_count, sample_count, log_loss, log_tok = time.time(), 0, 0, 0.0, 0.0
    dev_loss = None
    epoch, k0 = plans.locate(step)
    while step < total:
        mine = [[(i, epoch) for i in b] for b in rank_share(plans.batches(epoch), rank, world, per_step)]
        it = iter(make_loader(train_ds, mine[k0 * args.grad_accum:], collate, args.num_workers, device_type == "cuda"))
        for _ in range(k0, plans.steps(epoch)):
            if step >= total:
                break
            micro = [next(it) for _ in range(args.grad_accum)]
            n_global = all_sum(sum(target_tokens(b) for b in micro), device)
            step_loss = 0.0
            for b in micro:
                loss_sum, n = engine(**to_device(b, device))
                # engine.backward divides by G and the gradient all-reduce averages over W; scaling by
                # G*W/N gives the exact per-token mean over the global batch.
                engine.backward(loss_sum * (per_step / max(n_global, 1.0)))
                engine.step()
                step_loss += loss_sum.item()
                sample_count += len(b["meta"])
                tok_count += int(b["attention_mask"].sum())
            step += 1
            log_loss += all_sum(step_loss, device)
            log_tok += n_global
            bar.update(1)
            if step % args.logging_steps == 0 or step == total:
                dt = time.time() - t0
                mean = log_loss / max(log_tok, 1.0)
                lr = scheduler.get_last_lr()[0]
                bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.2e}")
                row = {"step": step, "loss": mean, "lr": lr, "samples_per_s": sample_count * world / dt,
                       "tokens_per_s": tok_count * world / dt}
                if device_type == "cuda":
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                record(row)
                log_loss = log_tok = 0.0
                t0, tok_count, sample_count = time.time(), 0, 0
            if step % args.eval_steps == 0 or step == total:
                dev_loss = evaluate()
                if dev_loss is not None:
                    best_dev = dev_loss if best_dev is None else min(best_dev, dev_loss)
                    log.info("step %d: dev loss %.4f", step, dev_loss)
                    record({"step": step, "dev_loss": dev_loss})
            if step % args.save_steps == 0 or step == total:
                save(step, dev_loss)
        epoch, k0 = epoch + 1, 0
    bar.close()
    if writer:
        writer.close()
    if rank == 0:
        summary = {"steps": step, "dev_loss": dev_loss, "best_dev_loss": best_dev,
                   "checkpoint": str(ckpt.latest_checkpoint(out))}
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
        log.info("done: %s", summary)
    barrier()
    return 0
