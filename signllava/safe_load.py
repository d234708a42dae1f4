"""Reading `.pt` files without running code from them.

A `.pt` file is a pickle, and a pickle can name any function to call while it loads: a checkpoint
downloaded from a colleague or a hub could run anything. Every `.pt` this trainer reads goes through
`load`, which is torch's weights-only unpickler: tensors, dicts, lists, tuples, sets, strings, numbers,
`torch.Size` and OrderedDict, plus an explicit allow-list of the few other types real files need. A file
that names anything else is refused with one line naming the file and the type; nothing in it runs.

DeepSpeed reads its own checkpoint files (`engine.load_checkpoint`) with the full, code-running unpickler
(deepspeed 0.19.8, TorchCheckpointEngine.load); `guard_engine` routes those reads through `load` too.
"""
from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch

from signllava.errors import CheckpointError


def deepspeed_types() -> list[type]:
    """The non-container types in DeepSpeed 0.19.8's ZeRO optimizer-state files
    (`*_optim_states.pt`): the static loss scaler (bf16 / fp32 runs; its attributes are numbers), the
    ZeRO stage enum and the dataclass recording each parameter's fragment of the flat partition.
    Its model-states files need nothing beyond the defaults. Rebuilding these runs no code of the
    file: the class is instantiated empty and its attributes are set from already-checked values."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


_REFUSED = (r"GLOBAL (\S+) was not an allowed global", r"unsupported GLOBAL (\S+) whose module",
            r"unrecognized function (.+?)(?: which belongs|$)", r"new object for .* but got (.+)$")


def _refused_type(message: str) -> str | None:
    for pattern in _REFUSED:
        m = re.search(pattern, message, re.MULTILINE)
        if m:
            return m.group(1).strip("<>' ").removeprefix("class '")
    return None


def load(path: str | Path, map_location="cpu", allow: list[type] = ()):
    """torch.load with weights_only=True and `allow` added to torch's allow-list for this read only.
    A file needing another type, or not a readable torch file, raises CheckpointError naming it."""
    try:
        with torch.serialization.safe_globals(list(allow)):
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except pickle.UnpicklingError as e:
        kind = _refused_type(str(e))
        if kind is None:
            m = re.search(r"WeightsUnpickler error: (.+)", str(e))
            why = m.group(1) if m else str(e).strip().splitlines()[0]
            raise CheckpointError(f"{path}: refused, not a plain tensor file ({why})") from None
        raise CheckpointError(f"{path}: needs {kind} to load, which could run code; refused "
                              f"(only tensors, containers, strings and numbers are read)") from None
    except Exception as e:       # truncated or not a torch file: the weights-only unpickler fails in many ways
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        detail = first if isinstance(e, RuntimeError) else f"{type(e).__name__} {first}".strip()
        raise CheckpointError(f"{path}: unreadable torch file ({detail})") from None


def guard_engine(engine):
    """Make `engine.load_checkpoint` read DeepSpeed's files through `load` (with `deepspeed_types`)."""
    allow = deepspeed_types()

    def safe(path, map_location=None):
        return load(path, map_location=map_location, allow=allow)

    engine.checkpoint_engine.load = safe
