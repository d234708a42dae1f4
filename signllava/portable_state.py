"""Optimizer state that does not depend on the number of ranks.

DeepSpeed's own checkpoint stores the fp32 master weights and Adam moments as per-rank partitions and
refuses to load them into a different data-parallel world size. Next to it each checkpoint keeps
`optimizer_portable.pt`: for every trainable parameter, by name, its full fp32 value and both Adam
moments, plus the Adam step and the LR-scheduler state. `--resume` uses it when the world size changed.
Only trainable tensors are in it (projectors, marker rows, LoRA), so it stays small next to the model.
"""
from __future__ import annotations

from pathlib import Path

import torch

from signllava import safe_load

PORTABLE_NAME = "optimizer_portable.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


def _inner_states(engine):
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)     # ZeRO wraps the torch optimizer
    return opt.state.values()


def adam_step(engine) -> int:
    for st in _inner_states(engine):
        s = st.get("step")
        if s is not None:
            return int(s.item() if torch.is_tensor(s) else s)
    return 0


def ensure_adam_state(engine):
    """A fresh ZeRO-1/2 engine has no Adam state until its first step; create it (zeros, as torch's
    AdamW would) so that restored moments have somewhere to go."""
    zero = engine.optimizer
    opt = getattr(zero, "optimizer", zero)
    # The fp32 tensors the torch optimizer actually steps: ZeRO-1/2 partitions, ZeRO-3 sub-group flats.
    flats = (getattr(zero, "single_partition_of_fp32_groups", None) or getattr(zero, "fp32_partitioned_groups_flat", None)
             or [p for g in opt.param_groups for p in g["params"]])
    on_device = any(g.get("fused") or g.get("capturable") for g in opt.param_groups)
    for p in flats:
        if "exp_avg" not in opt.state[p]:
            opt.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                            "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                            "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format)}


def relink_optimizer_views(engine):
    """ZeRO-1/2 link each parameter to its slice of the Adam moments lazily, right after the first
    step of the first param group, when the other groups have no state yet (deepspeed 0.19.8); our
    decay / no-decay groups then miss theirs. Relink once every group has state."""
    zero = engine.optimizer
    if hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def gather(engine) -> dict:
    """Collective: every rank calls it; the full tensors are returned on every rank."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    relink_optimizer_views(engine)
    params, moments = {}, {}
    for name, p in engine.module.named_parameters():
        if not p.requires_grad:
            continue
        params[name] = safe_get_full_fp32_param(p).float().cpu().clone()
        moments[name] = {k: safe_get_full_optimizer_state(p, k).float().cpu().clone() for k in MOMENTS}
    return {"params": params, "moments": moments, "adam_step": adam_step(engine),
            "scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None}


def save(state: dict, directory: Path):
    torch.save(state, Path(directory) / PORTABLE_NAME)          # into checkpoint-N.tmp: renamed in when complete


def restore(engine, directory: Path):
    """Collective: load a portable state into an initialised engine of any world size / ZeRO stage."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    state = safe_load.load(Path(directory) / PORTABLE_NAME)
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    missing = [n for n, _ in named if n not in state["params"]]
    if missing:
        from signllava.errors import CheckpointError
        raise CheckpointError(f"{directory / PORTABLE_NAME}: no state for {', '.join(missing)}")
    ensure_adam_state(engine)
    relink_optimizer_views(engine)
    for name, p in named:
        value = state["params"][name]
        safe_set_full_fp32_param(p, value.to(p.device))
        for k in MOMENTS:
            safe_set_full_optimizer_state(p, state["moments"][name][k].to(p.device), k)
        # The low-precision copy the forward uses is refreshed from the master only after the next
        # step; set it now so that the first resumed step already sees the restored weights.
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(value.to(dtype=p.dtype, device=p.device))
    for st in _inner_states(engine):
        if "step" in st:
            if torch.is_tensor(st["step"]):
                st["step"].fill_(state["adam_step"])
            else:
                st["step"] = state["adam_step"]
    if state["scheduler"] is not None and engine.lr_scheduler is not None:
        sched = engine.lr_scheduler
        sched.load_state_dict(state["scheduler"])
        # load_state_dict restores the schedule's position but not the rate already set on the groups.
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr
