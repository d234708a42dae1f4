"""Features and tokens to loss and text: the Sign LLaVA model around any causal LM.

`SignLLM` owns one projector per modality (framewise: [T, D] -> [T, H]), a two-row embedding for the
segment markers, and the LLM. The trainable state that is not LoRA lives in `projectors.safetensors`
beside a `config.json` (`SignConfig`) that says how to rebuild the whole model, so a checkpoint needs
none of the original flags.
"""
from __future__ import annotations

import json
import logging
import os
import re
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from signllava import kernels, safe_load
from signllava.checkpoint import ADAPTER_DIR, CONFIG_NAME, PROJECTORS_NAME
from signllava.errors import CheckpointError, RunError, brief
from signllava.extraction_record import record_problem
from signllava.prompts import MARKER_TOKENS, SYSTEM_PROMPT

log = logging.getLogger("signllava")

# ------------------------------------------------------------------------------------------ config
@dataclass
class SignConfig:
    base_model: str                              # HF id or path of the LLM
    tokenizer: str                               # HF id or path
    modalities: list[str]                        # splice order
    dims: dict[str, int]
    projector_types: dict[str, str]
    stage: int = 1
    bits: int = 16                               # 4: the LLM was trained quantised (nf4)
    lora: dict | None = None                     # peft LoraConfig kwargs when stage 2
    markers: list[str] = field(default_factory=lambda: list(MARKER_TOKENS))
    added_tokens: bool = False                   # markers were added to a tokenizer that lacked them
    system_prompt: str = SYSTEM_PROMPT
    chat_template: str | None = None             # the template trained with when not the tokenizer's own
    context_window: int = 0
    prelude_window: int = 0
    max_frames: dict | int = 0                   # {modality: cap}; an int (one cap for all) in older checkpoints
    frame_cap: str = "stride"
    max_seq_len: int = 0                         # frames of a longer prompt are capped to fit (0: no guard)
    # Each modality's frames get a learned row added (which stream is this?), and a clip without a modality
    # gets that modality's learned "absent" row as its segment. Checkpoints written before these rows
    # existed load with False: their segments are told apart by position only, and every trained
    # modality must be given to them.
    modality_embeddings: bool = False
    # How the training data's features were made (D/extraction.json's settings, models and software; see
    # signllava/extraction_record.py): translate.py extracts a new video the same way. None: features made elsewhere.
    extraction: dict | None = None
    # Each projector starts with a per-dimension scale and shift (model.FeatureScale), set in stage 1 from the
    # training split so that every feature dimension enters standardised (pretrain.py --standardize_features).
    standardize_features: bool = False
    format: str = "signllava-1"

    def save(self, directory: Path):
        """Into a folder being built (checkpoint-N.tmp, export's temporary): written in place, made visible
        whole by that folder's rename."""
        d = asdict(self)
        # A base model kept in the run's own output dir (the embedded default) is stored as a relative
        # path, so a run directory can be moved or copied as a whole.
        for attr in ("base_model", "tokenizer"):
            p = Path(d[attr])
            if p.is_absolute() and p.exists():
                rel = os.path.relpath(p, Path(directory).resolve())
                if rel.count("..") <= 1:
                    d[attr] = rel
        with open(Path(directory) / CONFIG_NAME, "w") as f:
            json.dump(d, f, indent=1)

    @classmethod
    def load(cls, directory: Path) -> "SignConfig":
        path = Path(directory) / CONFIG_NAME
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: not found (is {directory} a Sign LLaVA checkpoint?)") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: malformed JSON ({e})") from None
        if not isinstance(raw, dict) or raw.get("format") != "signllava-1":
            got = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise CheckpointError(f"{path}: not a Sign LLaVA config (format {brief(got, 40)})")
        problems = config_problems(raw)
        if problems:
            more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
            raise CheckpointError(f"{path}: not a usable config ({'; '.join(problems[:3])}{more})")
        known = set(cls.__dataclass_fields__)
        cfg = cls(**{k: v for k, v in raw.items() if k in known})
        # Local paths are stored relative to the config when they live beside it; resolve them here.
        for attr in ("base_model", "tokenizer"):
            cand = (Path(directory) / getattr(cfg, attr))
            if cand.exists():
                setattr(cfg, attr, str(cand.resolve()))
        return cfg


def config_problems(raw: dict) -> list[str]:
    """What is wrong with a config.json's fields (missing, of the wrong type, out of range), each in a few words;
    a checkpoint's config is read from outside, so nothing of it is trusted before it passes here."""
    def is_int(x, low=0):
        return isinstance(x, int) and not isinstance(x, bool) and x >= low

    def names(x):
        return isinstance(x, list) and bool(x) and all(isinstance(m, str) and m for m in x) and len(set(x)) == len(x)
    problems = [f"no {k!r}" for k in ("base_model", "tokenizer", "modalities", "dims", "projector_types") if k not in raw]
    if problems:
        return problems
    mods = raw["modalities"]
    checks = [
        ("base_model", isinstance(raw["base_model"], str) and raw["base_model"] != "", "a model name or path"),
        ("tokenizer", isinstance(raw["tokenizer"], str) and raw["tokenizer"] != "", "a tokenizer name or path"),
        ("modalities", names(mods), "a list of distinct modality names"),
        ("dims", names(mods) and isinstance(raw["dims"], dict) and all(is_int(raw["dims"].get(m), 1) for m in mods),
         "a positive feature dim for every modality"),
        ("projector_types", names(mods) and isinstance(raw["projector_types"], dict)
         and all(projector_kind_ok(raw["projector_types"].get(m)) for m in mods),
         "linear, identity or mlpNx_gelu for every modality"),
        ("stage", raw.get("stage", 1) in (1, 2) and not isinstance(raw.get("stage", 1), bool), "1 or 2"),
        ("bits", raw.get("bits", 16) in (4, 16) and not isinstance(raw.get("bits", 16), bool), "4 or 16"),
        ("lora", raw.get("lora") is None or isinstance(raw.get("lora"), dict), "null or a LoRA config"),
        ("markers", isinstance(raw.get("markers", []), list) and len(raw.get("markers", ["", ""])) == 2
         and all(isinstance(t, str) for t in raw.get("markers", [])), "two marker tokens"),
        ("added_tokens", isinstance(raw.get("added_tokens", False), bool), "true or false"),
        ("system_prompt", isinstance(raw.get("system_prompt", ""), str), "text"),
        ("chat_template", raw.get("chat_template") is None or isinstance(raw.get("chat_template"), str), "null or text"),
        ("context_window", is_int(raw.get("context_window", 0)), "a whole number >= 0"),
        ("prelude_window", is_int(raw.get("prelude_window", 0)), "a whole number >= 0"),
        ("max_frames", is_int(raw.get("max_frames", 0)) or (isinstance(raw.get("max_frames"), dict)
         and all(isinstance(k, str) and is_int(v) for k, v in raw["max_frames"].items())),
         "a whole number >= 0 or one per modality"),
        ("frame_cap", raw.get("frame_cap", "stride") in ("stride", "truncate", "pool"), "stride, truncate or pool"),
        ("max_seq_len", is_int(raw.get("max_seq_len", 0)), "a whole number >= 0"),
        ("modality_embeddings", isinstance(raw.get("modality_embeddings", False), bool), "true or false"),
        ("standardize_features", isinstance(raw.get("standardize_features", False), bool), "true or false"),
        ("extraction", raw.get("extraction") is None or record_problem(raw["extraction"]) is None,
         "null or an extraction record"),
    ]
    return [f"{name} {brief(raw.get(name), 40)}: expected {what}" for name, ok, what in checks if not ok]


# ------------------------------------------------------------------------------------------ projectors
_MLP_RE = re.compile(r"mlp([1-9]\d?)x_gelu")        # up to 99 layers


def projector_kind_ok(kind) -> bool:
    return isinstance(kind, str) and (kind in ("linear", "identity") or bool(_MLP_RE.fullmatch(kind)))


class FeatureScale(nn.Module):
    """x * scale + shift per feature dimension, in front of a projector (--standardize_features).

    Why: a stream's informative part can be small beside its constant part. In the 208 pose numbers a sign moves
    a body point by a few hundredths while the point's place, and the -1 of a hand not found, stay; the first
    linear layer's gradient is then dominated by that constant part, and a projector learns the signal many
    times slower than from standardised inputs (measured on the visual language of
    signllava/visual_language.py: BLEU 20 raw against 88 standardised after the same 400 steps). Stage 1 sets
    scale = 1 / std and shift = -mean / std from the training split (`set_from`); they are ordinary trainable
    parameters afterwards, so they are saved in projectors.safetensors and stage 2, generation and export use
    them as they are. At 1 and 0 they change nothing."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return x * self.scale + self.shift

    @torch.no_grad()
    def set_from(self, mean: np.ndarray, std: np.ndarray):
        """A dimension that hardly varies in training (std under a tenth of the typical one: a part never found,
        a coordinate MediaPipe pins) is only centred, not blown up: at test time it may vary after all."""
        typical = float(np.median(std[std > 0])) if np.any(std > 0) else 1.0
        scale = np.where(std >= 0.1 * typical, 1.0 / np.maximum(std, 1e-12), 1.0)
        self.scale.copy_(torch.as_tensor(scale, dtype=self.scale.dtype))
        self.shift.copy_(torch.as_tensor(-mean * scale, dtype=self.shift.dtype))


def build_projector(kind: str, in_dim: int, hidden: int, standardize: bool = False) -> nn.Module:
    """linear | mlpNx_gelu (Linear, then N-1 x [GELU, Linear]) | identity, applied per frame; with `standardize`
    a FeatureScale in front (`standardize.*`, the projector as `project.*`)."""
    if not projector_kind_ok(kind):
        raise ValueError(f"unknown projector type {kind!r:.60} (linear, identity, mlpNx_gelu e.g. mlp2x_gelu)")
    if kind == "linear":
        proj = nn.Linear(in_dim, hidden)
    elif kind == "identity":
        if in_dim != hidden:
            raise ValueError(f"identity projector needs feature dim == LLM hidden size ({in_dim} != {hidden})")
        proj = nn.Identity()
    else:
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden)]
        for _ in range(int(_MLP_RE.fullmatch(kind).group(1)) - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        proj = nn.Sequential(*layers)
    if standardize:
        return nn.Sequential(OrderedDict(standardize=FeatureScale(in_dim), project=proj))
    return proj


def parse_projector_types(text: str, modalities: list[str]) -> dict[str, str]:
    """'mlp2x_gelu' for all, or 'mlp2x_gelu,pose=linear' to override some modalities."""
    default, per = "mlp2x_gelu", {}
    for part in text.split(","):
        if "=" in part:
            m, _, k = part.partition("=")
            per[m.strip()] = k.strip()
        elif part.strip():
            default = part.strip()
    unknown = set(per) - set(modalities)
    if unknown:
        raise ValueError(f"--projector_type names modalities not in the data: {', '.join(sorted(unknown))}")
    kinds = {m: per.get(m, default) for m in modalities}
    bad = sorted({k for k in kinds.values() if not projector_kind_ok(k)})
    if bad:
        raise ValueError(f"unknown projector type {', '.join(bad)} (linear, identity, mlpNx_gelu e.g. mlp2x_gelu)")
    return kinds


# ------------------------------------------------------------------------------------------ model
TRAINABLE_PREFIXES = ("projectors.", "marker_embed.")      # what projectors.safetensors holds


class SegmentRows(nn.Module):
    """The learned rows around the projected frames, saved with the projectors under `marker_embed.`:
    `weight` [2, H], the start/end marker rows shared by every segment (an Embedding's weight, so the
    original's two marker rows map onto it); with modality embeddings, `modality` [M, H], added to every
    frame of modality m (zero at init: a new run starts out as one without them), and `absent` [M, H],
    the single position standing for a modality a clip lacks (or that --modality_dropout hid). Rows are
    read through module calls only (embedding lookups), so that ZeRO-3 gathers them first."""

    def __init__(self, modalities: list[str], hidden: int, init: torch.Tensor, std: torch.Tensor, with_modalities: bool):
        super().__init__()
        gen = torch.Generator().manual_seed(1234)
        self.weight = nn.Parameter(init + torch.randn(2, hidden, generator=gen) * std * 0.1)
        self.index = {m: k for k, m in enumerate(modalities)}
        if with_modalities:
            self.modality = nn.Embedding(len(modalities), hidden)
            self.absent = nn.Embedding(len(modalities), hidden)
            with torch.no_grad():
                self.modality.weight.zero_()
                self.absent.weight.copy_(init + torch.randn(len(modalities), hidden, generator=gen) * std * 0.1)

    @property
    def has_modalities(self) -> bool:
        return hasattr(self, "modality")

    def forward(self, slot: torch.Tensor) -> torch.Tensor:
        return F.embedding(slot, self.weight)

    def tables(self, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(modality rows [M, H], absent rows [M, H]), or None without modality embeddings. Every forward reads
        both whole, whatever the batch holds: under ZeRO-3 the gather is collective, so every rank must ask."""
        if not self.has_modalities:
            return None
        idx = torch.arange(len(self.index), device=device)
        return self.modality(idx), self.absent(idx)


class SignLLM(nn.Module):
    def __init__(self, llm: nn.Module, cfg: SignConfig, marker_ids: tuple[int, int], label_smoothing: float = 0.0):
        super().__init__()
        self.llm = llm
        self.cfg = cfg
        self.label_smoothing = label_smoothing
        # Packed: a micro-batch's samples run end to end in one row with no padding (attention.py); needs the
        # LLM on kernels.ATTENTION, which assemble() sets. Off: padded rows under SDPA. Training sets it.
        self.packing = False
        emb = llm.get_input_embeddings()
        hidden = emb.weight.shape[1]
        self.projectors = nn.ModuleDict({m: build_projector(cfg.projector_types[m], cfg.dims[m], hidden,
                                                            cfg.standardize_features) for m in cfg.modalities})
        # The markers' input rows are trained here, not in the (frozen) embedding matrix: only these rows
        # learn, they are saved with the projectors, and no weight decay touches the other 128k rows.
        with torch.no_grad():
            # Statistics of what the embedding module outputs, not of its weight: some families scale inside
            # it (Gemma multiplies by sqrt(hidden)). Up to 4096 evenly spaced rows (all of a small vocabulary).
            vocab = emb.weight.shape[0]
            rows = torch.linspace(0, vocab - 1, min(vocab, 4096), device=emb.weight.device).long()
            w = emb(rows).detach().float()
            mean, std = w.mean(0, keepdim=True).cpu(), w.std().cpu()     # the LLM may already sit on a GPU
        self.marker_embed = SegmentRows(cfg.modalities, hidden, mean, std, cfg.modality_embeddings)
        self.register_buffer("marker_ids", torch.tensor(marker_ids, dtype=torch.long), persistent=False)

    # -- pieces shared by training and generation
    def embed(self, input_ids, features: dict, frame_index: dict, absent_index: dict | None = None) -> torch.Tensor:
        """Token embeddings with markers, projected frames and absent rows spliced in: [B, L, H]."""
        emb = self.llm.get_input_embeddings()(input_ids)
        slot = torch.full_like(input_ids, -1)
        for k in range(len(self.marker_ids)):
            slot = torch.where(input_ids == self.marker_ids[k], k, slot)
        marker = self.marker_embed(slot.clamp(min=0)).to(emb.dtype)
        emb = torch.where((slot >= 0).unsqueeze(-1), marker, emb)
        B, L, H = emb.shape
        flat = emb.reshape(B * L, H)
        rows = self.marker_embed
        tables = rows.tables(emb.device)
        for m, feats in features.items():
            if m not in self.projectors:
                raise CheckpointError(f"modality {m!r} has no projector (model knows {', '.join(self.projectors)})")
            proj = self.projectors[m]
            weight = next(proj.parameters(), None)      # None for the identity projector
            dtype = weight.dtype if weight is not None else emb.dtype
            out = proj(feats.to(device=emb.device, dtype=dtype)).to(emb.dtype)
            if tables is not None:
                out = out + tables[0][rows.index[m]].to(emb.dtype)
            flat = flat.index_copy(0, frame_index[m].to(emb.device), out)
        for m, pos in (absent_index or {}).items():
            if m not in rows.index:
                raise CheckpointError(f"modality {m!r} was not trained (model knows {', '.join(rows.index)})")
            if tables is None:
                raise CheckpointError(f"this checkpoint has no learned absent rows (trained before modality "
                                      f"embeddings): give it every modality it was trained with "
                                      f"({', '.join(rows.index)}); {m!r} is missing")
            flat = flat.index_copy(0, pos.to(emb.device), tables[1][rows.index[m]].to(emb.dtype).expand(len(pos), -1))
        return flat.view(B, L, H)

    def decoder(self):
        return self.llm.get_decoder()

    def forward(self, input_ids, attention_mask, labels, features, frame_index, absent_index=None):
        """Returns (sum of token losses, number of target tokens). The caller normalises, so the loss
        is a per-token mean over the whole (accumulated, all-rank) batch rather than a mean of means."""
        emb = self.embed(input_ids, features, frame_index, absent_index)
        if self.packing:
            hidden, target = self._packed_hidden(emb, attention_mask, labels)
        else:
            hidden = self.decoder()(inputs_embeds=emb, attention_mask=attention_mask, use_cache=False).last_hidden_state
            hidden, target = hidden[:, :-1], labels[:, 1:]
        sel = target != -100
        # Logits only where there is a target: never materialise vocab-sized logits over frames.
        logits = self.llm.get_output_embeddings()(hidden[sel]).float()
        loss = F.cross_entropy(logits, target[sel], reduction="sum", label_smoothing=self.label_smoothing)
        return loss, sel.sum()

    def _packed_hidden(self, emb, attention_mask, labels):
        """The padded batch's real positions end to end in one row: positions restart at 0 per sample and
        attention stays within each sample (cumulative lengths), so every sample sees exactly what it sees
        padded. Returns hidden states [N-1, H] and their next-token targets [N-1]."""
        keep = attention_mask.bool()
        lengths = keep.sum(1)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        positions = (keep.long().cumsum(1) - 1)[keep].unsqueeze(0)
        longest = int(lengths.max())
        hidden = self.decoder()(inputs_embeds=emb[keep].unsqueeze(0), position_ids=positions, attention_mask=None,
                                use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                max_length_q=longest, max_length_k=longest).last_hidden_state
        target = labels[keep][1:].clone()
        target[cu[1:-1].long() - 1] = -100      # a sample's last position does not predict the next sample
        return hidden[0, :-1], target

    # -- trainable state by name
    def projector_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}

    def standardize_from(self, stats: dict[str, tuple[np.ndarray, np.ndarray]]):
        """Set each projector's FeatureScale from the training split's (mean, std) per modality."""
        if not self.cfg.standardize_features:
            raise RunError("standardize_from: this model's projectors have no FeatureScale (standardize_features off)")
        for m, (mean, std) in stats.items():
            self.projectors[m].standardize.set_from(mean, std)

    def load_projector_state(self, state: dict[str, torch.Tensor], source: str):
        """Strict by name and shape; the error lists every missing, unexpected and mis-shaped key."""
        own = self.projector_state()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        shapes = sorted(f"{k} {tuple(state[k].shape)} (model {tuple(own[k].shape)})"
                        for k in set(own) & set(state) if tuple(state[k].shape) != tuple(own[k].shape))
        if missing or unexpected or shapes:
            parts = []
            if missing:
                parts.append("missing: " + ", ".join(missing))
            if unexpected:
                parts.append("unexpected: " + ", ".join(unexpected))
            if shapes:
                parts.append("mis-shaped: " + ", ".join(shapes))
            raise CheckpointError(f"{source}: projector weights do not fit this model ({'; '.join(parts)})")
        with torch.no_grad():
            for k, p in self.named_parameters():
                if k in state:
                    p.copy_(state[k].to(dtype=p.dtype, device=p.device))


def save_projectors(state: dict[str, torch.Tensor], directory: Path):
    # In place: `directory` is a checkpoint-N.tmp being built, renamed into place once complete.
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(Path(directory) / PROJECTORS_NAME))


def read_projector_file(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of trained weights (projectors and marker rows, or a LoRA adapter), checked."""
    try:
        state = load_file(str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: not found") from None
    except Exception as e:     # safetensors raises its own error types for truncated/corrupt files
        raise CheckpointError(f"{path}: unreadable projector file ({e})") from None
    return check_weights(state, path)


def check_weights(state: dict, source) -> dict:
    """Weights that cannot be right are refused, naming the file and tensor: an integer or bool tensor would be
    cast silently into a float parameter, and a NaN or Inf anywhere makes every output empty or garbage."""
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            kind = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise CheckpointError(f"{source}: tensor {brief(key, 60)} is {kind}; trained weights are floating point")
        bad = int((~torch.isfinite(value)).sum())
        if bad:
            raise CheckpointError(f"{source}: tensor {brief(key, 60)} holds {bad} non-finite values (NaN/Inf) of "
                                  f"{value.numel()}; the weights are broken")
    return state


def read_reference_states(path: Path) -> dict[str, torch.Tensor]:
    """The original's DeepSpeed file `mp_rank_00_model_states.pt`: its `module` dict with keys
    `model.<m>_projector.*` and `model.embed_tokens.weight`, whose last two rows are the
    <video_start>/<video_end> tokens it added (reference §5.4-5.6). Mapped to our names."""
    raw = safe_load.load(path)          # runs no code from the file; a pickled object is refused, naming it
    module = raw.get("module", raw) if isinstance(raw, dict) else None
    if not isinstance(module, dict):
        raise CheckpointError(f"{path}: no 'module' state dict inside")
    out = {}
    for key, val in module.items():
        m = re.search(r"(?:^|\.)(\w+?)_projector\.(.+)$", key)
        if m:
            out[f"projectors.{m.group(1)}.{m.group(2)}"] = val
    emb = next((v for k, v in module.items() if k.endswith("embed_tokens.weight")), None)
    if emb is not None and emb.dim() == 2 and emb.shape[0] >= 2:
        out["marker_embed.weight"] = emb[-2:].clone()
    if not any(k.startswith("projectors.") for k in out):
        raise CheckpointError(f"{path}: no '<modality>_projector.*' keys in its module state")
    return check_weights(out, path)


# ------------------------------------------------------------------------------------------ loading
def compute_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU; fp32 on CPU, where bf16 matmuls are 15-40x slower without native support."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_llm(name_or_path: str, bits: int, dtype: torch.dtype, device: torch.device, zero3: bool = False):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    kw: dict = {"dtype": dtype}
    if bits == 4:
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # ZeRO-3 partitions parameters by dtype; packed uint8 weights must look like the rest.
            bnb_4bit_quant_storage=dtype if zero3 else torch.uint8)
        kw["device_map"] = {"": device}
    elif bits != 16:
        raise ValueError(f"--bits must be 4 or 16, not {bits}")
    try:
        return AutoModelForCausalLM.from_pretrained(name_or_path, **kw)
    except OSError as e:
        raise CheckpointError(f"{name_or_path}: cannot load the base model ({str(e).splitlines()[0]})") from None


def max_positions(name_or_path: str) -> int:
    """The LLM config's maximum positions (0 if it names none): the default --max_seq_len."""
    from transformers import AutoConfig
    try:
        cfg = AutoConfig.from_pretrained(name_or_path)
    except OSError as e:
        raise CheckpointError(f"{name_or_path}: cannot read the model config ({str(e).splitlines()[0]})") from None
    cfg = getattr(cfg, "text_config", None) or cfg
    return int(getattr(cfg, "max_position_embeddings", 0) or 0)


def load_tokenizer(name_or_path: str, chat_template: str | None = None):
    """The tokenizer with the marker tokens, and whether they had to be added. `chat_template` (text)
    replaces the tokenizer's own; a tokenizer without one gets prompts.BUILTIN_TEMPLATE. The template is
    probed here (system role, end-of-turn token), so a broken one fails before any model weight loads."""
    from transformers import AutoTokenizer
    from signllava.prompts import BUILTIN_TEMPLATE, chat_layout, setup_special_tokens
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path)
    except OSError as e:
        raise CheckpointError(f"{name_or_path}: cannot load the tokenizer ({str(e).splitlines()[0]})") from None
    if chat_template is not None:
        tok.chat_template = chat_template
    elif not tok.chat_template:
        if tok.eos_token is None:
            raise CheckpointError(f"{name_or_path}: the tokenizer has neither a chat template nor an end-of-sequence "
                                  "token; give --chat_template FILE")
        log.warning("%s has no chat template: using the built-in one (--chat_template builtin)", name_or_path)
        tok.chat_template = BUILTIN_TEMPLATE
    added = setup_special_tokens(tok)
    chat_layout(tok)
    return tok, added


def fit_embeddings(llm, tokenizer):
    """If marker tokens were added, grow the vocabulary with rows set to the mean of the old rows:
    deterministic, so a rebuilt model at inference equals the one trained (nothing random unsaved)."""
    old = llm.get_input_embeddings().weight.shape[0]
    if len(tokenizer) <= old:
        return
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        for mod in (llm.get_input_embeddings(), llm.get_output_embeddings()):
            if mod is not None:
                mod.weight[old:] = mod.weight[:old].mean(0, keepdim=True)


def disable_dropout(module: nn.Module):
    """A frozen LLM should behave the same every step: zero its dropout (kept in train mode so that
    gradient checkpointing, which only runs in training mode, still applies)."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    cfg = getattr(module, "config", None)
    if cfg is not None and hasattr(cfg, "attention_dropout"):
        cfg.attention_dropout = 0.0


def assemble(cfg: SignConfig, tokenizer, device: torch.device, dtype: torch.dtype, zero3: bool = False,
             adapter: str | None = None, gradient_checkpointing: bool = False,
             label_smoothing: float = 0.0, compile_layers: str | None = None,
             activation_memory_budget: float = 1.0, fp8: bool = False) -> SignLLM:
    """Build the whole model from a config: base LLM (4-bit if cfg.bits == 4), frozen; then LoRA —
    new (`adapter="new"`, from cfg.lora) or loaded from a PEFT directory — and the projectors.
    Only projectors, marker rows and LoRA weights require grad. The LLM runs on kernels.ATTENTION (SDPA
    unless a forward passes packed boundaries); packed training is SignLLM.packing. `compile_layers`: a
    torch.compile backend for the decoder layers (kernels.compile_decoder_layers), None for eager;
    `activation_memory_budget` how much of their activations they keep for backward (0-1). `fp8`: the frozen
    linear layers of the decoder (stage 2: LoRA's base) multiply in FP8, their bf16 weights freed (signllava/fp8.py)."""
    from signllava import fp8 as fp8_matmuls
    from signllava.kernels import use_packed_attention
    from signllava.prompts import special_ids
    if fp8:
        fp8_matmuls.check_support(device, zero3, cfg.bits)      # before loading gigabytes
    llm = load_llm(cfg.base_model, cfg.bits, dtype, device, zero3=zero3)
    use_packed_attention(llm)       # SDPA unless a forward passes packed boundaries
    kernels.fuse_rms_norm(llm)             # fused RMSNorm: same maths, less memory and traffic
    fit_embeddings(llm, tokenizer)
    llm.requires_grad_(False)
    disable_dropout(llm)
    if compile_layers:
        kernels.compile_decoder_layers(llm, compile_layers, activation_memory_budget)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no enable_input_require_grads() hack for a frozen base.
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.bits == 4 and zero3 and device.type == "cpu":
        # bitsandbytes repacks 4-bit weights for its CPU kernel on the first no-grad eval forward and
        # unpacks them when saving; under ZeRO-3 the weights are partitioned away and the unpack fails.
        import bitsandbytes as bnb
        for m in llm.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
    if cfg.bits == 4:
        # Not peft's prepare_model_for_kbit_training: it upcasts every non-quantised weight
        # (embeddings, lm_head, norms) to fp32, which costs GBs at 8B and buys nothing here —
        # Llama's RMSNorm and our loss already compute in fp32.
        llm.config.use_cache = False
    if adapter == "new":
        from peft import LoraConfig, get_peft_model
        llm = get_peft_model(llm, LoraConfig(task_type="CAUSAL_LM", bias="none", **cfg.lora))
    elif adapter:
        llm = load_adapter_strict(llm, Path(adapter))
    model = SignLLM(llm, cfg, special_ids(tokenizer)["markers"], label_smoothing=label_smoothing).to(device)
    if fp8:
        fp8_matmuls.convert_frozen_linears(model.llm, device)     # on the device: quantised there, once
    return model


def load_adapter_strict(llm, adapter_dir: Path):
    """PEFT's own loader only warns about missing or unexpected adapter keys; a checkpoint that does not
    fit must fail instead, listing them."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    weights = adapter_dir / "adapter_model.safetensors"
    try:
        lcfg = LoraConfig.from_pretrained(str(adapter_dir))
    except Exception as e:
        raise CheckpointError(f"{adapter_dir}: unreadable adapter_config.json ({str(e).splitlines()[0]})") from None
    state = read_projector_file(weights)
    lcfg.inference_mode = True
    llm = get_peft_model(llm, lcfg)
    try:
        res = set_peft_model_state_dict(llm, state)
    except RuntimeError as e:      # shape mismatches
        msg = " ".join(l.strip() for l in str(e).splitlines() if "size mismatch" in l)
        raise CheckpointError(f"{weights}: adapter weights do not fit the base model ({msg or e})") from None
    missing = sorted(k for k in res.missing_keys if "lora_" in k)
    if missing or res.unexpected_keys:
        raise CheckpointError(f"{weights}: adapter keys do not fit (missing: {', '.join(missing) or '-'}; "
                              f"unexpected: {', '.join(res.unexpected_keys) or '-'})")
    return llm
