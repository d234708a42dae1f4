"""The two image encoders of the feature extraction: MAE (ViT-B/16, signer crop) and DINOv2 with registers
(ViT-S/14, face and hand crops), as transformers models, from an HF id / directory or from the original's
released checkpoint files.

The original (JSALT2024/MAE `mae/models_vit.py`, JSALT2024/DINOv2 `predict/predict_dino.py`) ran timm's
VisionTransformer and the torch-hub DINOv2 code, both fetched or imported at run time; here the same weights
run in transformers' `ViTModel` and `Dinov2WithRegistersModel`, whose forward equals theirs after a key
conversion (tests/test_encoders.py checks it against a plain-torch restatement of the original forward).

Original layouts read (through signllava/safe_load.py, torch's weights-only loader, or safetensors):
- MAE: `{"model": state_dict}` (or the state dict itself) in timm names: `cls_token`, `pos_embed`,
  `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}.*`, `norm.*`. The MAE
  decoder (`decoder_*`, `mask_token`) and a fine-tuning `head.*` are dropped.
- DINOv2: `{"teacher": {...}}` whose backbone keys carry a `backbone.` prefix (the `dino_head` / `ibot_head`
  entries are dropped), or a plain dinov2 state dict: `cls_token`, `pos_embed`, `register_tokens`,
  `mask_token`, `patch_embed.proj.*`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,
  ls2.gamma}.*`, `norm.*`.
The architecture is read off the tensors' shapes: width, depth, patch, image size (from the position
embedding: the original DINO checkpoints hold 257 positions, i.e. 224 x 224), MLP width, register count.
The head count is not in a state dict: it is hidden // 64 (64-wide heads, as in every ViT-S/B/L and DINOv2
model) unless `num_heads` says otherwise.

The target names are transformers 5.24's module names (it renamed ViT's internals in version 5); loading a
converted dict is strict, so a transformers that renames them again fails loudly here, not silently.
"""
from __future__ import annotations

import hashlib
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from signllava import safe_load
from signllava.errors import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZES = ("pil", "torch")
HEAD_WIDTH = 64
LAYER_NORM_EPS = 1e-6      # both originals build their norms as partial(nn.LayerNorm, eps=1e-6)


class ImageEncoder:
    """A ViT whose normed CLS token is the feature of an image: `encode(uint8 [N, H, W, 3] RGB) -> float32
    [N, D]`. Preprocessing as the original's: resize to the model's square input (PIL bilinear, which is what
    torchvision's Resize does on the PIL images the original DINO path fed it; `resize="torch"` does an
    antialiased bilinear resize on the device instead, faster, within a few uint8 levels of PIL; the original
    MAE path resized with cv2 INTER_LINEAR, which does not antialias its 512 -> 224 step), scale to
    [0, 1], ImageNet mean/std. `channel_order="bgr"` reverses the channels first, reproducing the released
    features' swapped colours (see docs: off by default)."""

    def __init__(self, model, kind: str, source: dict, device="cpu", dtype=torch.float32, batch_size: int = 64,
                 resize: str = "pil", channel_order: str = "rgb", image_size: int | None = None):
        if resize not in RESIZES:
            raise ValueError(f"resize must be one of {RESIZES}, not {resize!r}")
        if channel_order not in ("rgb", "bgr"):
            raise ValueError(f"channel_order must be 'rgb' or 'bgr', not {channel_order!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.kind, self.source = kind, source
        self.batch_size, self.resize, self.channel_order = batch_size, resize, channel_order
        self.image_size = int(image_size or _square(model.config.image_size))
        self.dim = model.config.hidden_size
        # ViTModel refuses another input size unless asked to interpolate; DINOv2 interpolates by itself
        native = _square(model.config.image_size)
        interpolate = kind == "mae" and self.image_size != native
        self._forward_options = {"interpolate_pos_encoding": True} if interpolate else {}
        shape = (1, 3, 1, 1)
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(shape)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(shape)

    def preprocess(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N, H, W, 3] -> normalised [N, 3, S, S] on the device, in the model's dtype."""
        _check_images(images, self.kind)
        if self.channel_order == "bgr":
            images = images[..., ::-1]
        size = self.image_size
        resized = images.shape[1:3] != (size, size)
        if resized and self.resize == "pil":
            images = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize(
                (size, size), Image.Resampling.BILINEAR)) for im in images])
        pixels = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float()
        if resized and self.resize == "torch":
            pixels = torch.nn.functional.interpolate(pixels, size=(size, size), mode="bilinear",
                                                     align_corners=False, antialias=True)
        return ((pixels / 255.0 - self._mean) / self._std).to(self.dtype)

    def encode(self, images: np.ndarray) -> np.ndarray:
        _check_images(images, self.kind)
        out = np.empty((len(images), self.dim), dtype=np.float32)
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                pixels = self.preprocess(images[start:start + self.batch_size])
                cls = self.model(pixel_values=pixels, **self._forward_options).last_hidden_state[:, 0]
                out[start:start + len(cls)] = cls.float().cpu().numpy()
        return out

    def describe(self) -> dict:
        """What made the features, for the dataset's extraction.json."""
        c = self.model.config
        arch = {"class": type(self.model).__name__, "hidden_size": c.hidden_size,
                "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                "patch_size": c.patch_size, "image_size": self.image_size,
                "native_image_size": _square(c.image_size), "layer_norm_eps": c.layer_norm_eps,
                "mlp_dim": c.intermediate_size if self.kind == "mae" else int(c.hidden_size * c.mlp_ratio)}
        if self.kind == "dino":
            arch["num_register_tokens"] = c.num_register_tokens
        resize = ("PIL bilinear" if self.resize == "pil" else "torch bilinear, antialiased")
        return {"encoder": self.kind, **self.source, "architecture": arch, "dim": self.dim,
                "dtype": str(self.dtype).removeprefix("torch."), "batch_size": self.batch_size,
                "preprocessing": {"channel_order": self.channel_order.upper(),
                                  "resize": f"{resize} to {self.image_size}x{self.image_size}",
                                  "scale": "1/255", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
                "output": "CLS token after the final layer norm",
                "transformers": transformers.__version__}


def load_mae(spec: str, device="cpu", dtype=torch.float32, *, num_heads: int | None = None,
             batch_size: int = 64, resize: str = "pil", channel_order: str = "rgb",
             image_size: int | None = None) -> ImageEncoder:
    """The MAE ViT encoder from an HF id or directory (model_type vit or vit_mae; an MAE decoder there is
    ignored) or from the original's checkpoint file (see the module doc). `num_heads` applies to checkpoint
    files only (an HF config states its own)."""
    return _load("mae", spec, device, dtype, num_heads, dict(batch_size=batch_size, resize=resize,
                                                             channel_order=channel_order, image_size=image_size))


def load_dino(spec: str, device="cpu", dtype=torch.float32, *, num_heads: int | None = None,
              batch_size: int = 64, resize: str = "pil", channel_order: str = "rgb",
              image_size: int | None = None) -> ImageEncoder:
    """DINOv2 with registers from an HF id or directory (model_type dinov2_with_registers) or from the
    original's checkpoint file. `image_size` other than the model's own makes transformers interpolate the
    position embedding (bicubic), which the original never did (it resized every crop to 224)."""
    return _load("dino", spec, device, dtype, num_heads, dict(batch_size=batch_size, resize=resize,
                                                              channel_order=channel_order, image_size=image_size))


def _load(kind, spec, device, dtype, num_heads, options) -> ImageEncoder:
    path = Path(spec)
    if path.is_file():
        model, source = _from_original(kind, path, num_heads), {"source": str(spec), "source_kind":
                                                                "original checkpoint", "sha256": sha256(path)}
    elif path.is_dir() or not _looks_like_hub_id(str(spec)):
        if not path.exists():
            raise CheckpointError(f"{spec}: not found (neither a checkpoint file nor a model directory)")
        model, source = _from_pretrained(kind, spec), {"source": str(spec), "source_kind": "HF directory",
                                                       "sha256": _weights_hashes(path)}
    else:
        model = _from_pretrained(kind, spec)
        source = {"source": str(spec), "source_kind": "HF hub",
                  "revision": getattr(model.config, "_commit_hash", None)}
    return ImageEncoder(model, kind, source, device=device, dtype=dtype, **options)


# ---- HF ids and directories -------------------------------------------------------------------------------

_HF = {"mae": ({"vit", "vit_mae"}, "ViTModel", ("decoder.", "pooler.", "classifier.")),
       "dino": ({"dinov2_with_registers"}, "Dinov2WithRegistersModel", ("classifier.",))}


def _from_pretrained(kind: str, spec: str):
    model_types, class_name, ignorable = _HF[kind]
    try:
        config, _ = transformers.PretrainedConfig.get_config_dict(spec)
    except Exception as e:
        raise CheckpointError(f"{spec}: cannot read its config.json ({first_line(e)})") from None
    if config.get("model_type") not in model_types:
        raise CheckpointError(f"{spec}: model_type {config.get('model_type')!r} is not a {kind} encoder "
                              f"(expected {' or '.join(sorted(model_types))})")
    cls = getattr(transformers, class_name)
    extra = {"add_pooling_layer": False} if kind == "mae" else {}
    try:
        with _quiet_transformers():
            model, info = cls.from_pretrained(spec, output_loading_info=True, **extra)
    except Exception as e:
        raise CheckpointError(f"{spec}: cannot load as {class_name} ({first_line(e)})") from None
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith(ignorable))
    problems = key_problems(sorted(info["missing_keys"]), unexpected) + [str(m) for m in info["mismatched_keys"]]
    if problems:
        raise CheckpointError(f"{spec}: its weights do not fit {class_name}: {'; '.join(problems)}")
    return model


@contextmanager
def _quiet_transformers():
    # from_pretrained logs a load report listing every ignored MAE-decoder key; the keys are checked here instead
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(level)


def _looks_like_hub_id(spec: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", spec) is not None and not spec.startswith((".", "/"))


def _weights_hashes(directory: Path) -> dict:
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {p.name: sha256(p) for p in files}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- the original's checkpoint files -----------------------------------------------------------------------

# timm / dinov2 name -> transformers 5.24 name, at the top and inside block N
_TOP = {"cls_token": "embeddings.cls_token", "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
_TOP_DINO = {**_TOP, "register_tokens": "embeddings.register_tokens", "mask_token": "embeddings.mask_token"}
_BLOCK_MAE = {"norm1": "layernorm_before", "attn.proj": "attention.o_proj", "norm2": "layernorm_after",
              "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_BLOCK_DINO = {"norm1": "norm1", "attn.proj": "attention.o_proj", "norm2": "norm2",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
_LAYERS = {"mae": "layers", "dino": "encoder.layer"}
_DROPPED = {"mae": ("decoder_", "mask_token", "head."), "dino": ()}


def _from_original(kind: str, path: Path, num_heads: int | None):
    state = original_state_dict(path, kind)
    config = _config_from_shapes(kind, state, path, num_heads)
    table = _key_table(kind, config)
    problems = key_problems(sorted(set(table) - set(state)), sorted(set(state) - set(table)))
    if problems:
        raise CheckpointError(f"{path}: not a {kind} checkpoint in the original layout: {'; '.join(problems)}")
    converted = {}
    for old, new in table.items():
        # timm and dinov2 keep q, k, v as one [3 * D, D] matrix; transformers has three
        for name, part in zip(new, state[old].chunk(len(new), dim=0)):
            converted[name] = part.contiguous()
    model = (transformers.ViTModel(config, add_pooling_layer=False) if kind == "mae"
             else transformers.Dinov2WithRegistersModel(config))
    try:
        model.load_state_dict(converted, strict=True)
    except RuntimeError as e:
        sizes = re.findall(r"size mismatch for (\S+): (.+?)\.?$", str(e), re.MULTILINE)
        why = "; ".join(f"{k} {v}" for k, v in sizes[:3]) or first_line(e)
        raise CheckpointError(f"{path}: tensor shapes do not fit one {kind} architecture ({why})") from None
    return model


def original_state_dict(path: Path, kind: str) -> dict:
    """The encoder's tensors of an original checkpoint file, unwrapped from `model` / `teacher` (with its
    `backbone.` prefix) / `state_dict`, training-only entries dropped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            obj = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({first_line(e)})") from None
    else:
        obj = safe_load.load(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    if isinstance(obj.get("teacher"), dict):
        obj = {k.removeprefix("backbone."): v for k, v in obj["teacher"].items() if k.startswith("backbone.")}
    else:
        for wrapper in ("model", "state_dict"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor) and not k.startswith(_DROPPED[kind])}
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        raise CheckpointError(f"{path}: unknown layout: no cls_token / patch_embed.proj.weight under the top "
                              f"level, `model`, `teacher` (backbone.) or `state_dict` (keys: {_some(obj)})")
    return state


def _config_from_shapes(kind: str, state: dict, path: Path, num_heads: int | None):
    hidden = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    positions = state["pos_embed"].shape[1] - 1 if "pos_embed" in state else 0
    grid = int(round(positions ** 0.5))
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    if depth == 0 or fc1 is None or grid * grid != positions or positions == 0:
        raise CheckpointError(f"{path}: cannot read a ViT from its shapes (blocks: {depth}, position "
                              f"embeddings for {positions} patches, blocks.0.mlp.fc1.weight "
                              f"{'missing' if fc1 is None else 'present'})")
    heads = num_heads or hidden // HEAD_WIDTH
    if heads < 1 or hidden % heads:
        raise CheckpointError(f"{path}: width {hidden} does not split into {heads} heads; give num_heads")
    common = dict(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=heads, patch_size=patch,
                  image_size=grid * patch, num_channels=state["patch_embed.proj.weight"].shape[1],
                  qkv_bias="blocks.0.attn.qkv.bias" in state, layer_norm_eps=LAYER_NORM_EPS, hidden_act="gelu")
    if kind == "mae":
        return transformers.ViTConfig(intermediate_size=fc1.shape[0], **common)
    if "register_tokens" not in state:
        raise CheckpointError(f"{path}: no register_tokens: not a DINOv2-with-registers checkpoint")
    if "blocks.0.mlp.w12.weight" in state:
        raise CheckpointError(f"{path}: a SwiGLU (ViT-g) DINOv2; only the MLP blocks of ViT-S/B/L are read")
    if fc1.shape[0] % hidden:       # the config holds the MLP width as an integer ratio to the width
        raise CheckpointError(f"{path}: MLP width {fc1.shape[0]} is not a multiple of the width {hidden}")
    return transformers.Dinov2WithRegistersConfig(mlp_ratio=fc1.shape[0] // hidden, layerscale_value=1.0,
                                                  num_register_tokens=state["register_tokens"].shape[1],
                                                  **common)


def _key_table(kind: str, config) -> dict[str, tuple[str, ...]]:
    """Every key the original checkpoint must hold -> the transformers key(s) it becomes."""
    top, block = (_TOP, _BLOCK_MAE) if kind == "mae" else (_TOP_DINO, _BLOCK_DINO)
    table = {old: (new,) for old, new in top.items()}
    leaves = ("weight", "bias") if config.qkv_bias else ("weight",)
    for i in range(config.num_hidden_layers):
        src, dst = f"blocks.{i}.", f"{_LAYERS[kind]}.{i}."
        for old, new in block.items():
            table.update({f"{src}{old}.{leaf}": (f"{dst}{new}.{leaf}",) for leaf in ("weight", "bias")})
        for leaf in leaves:
            table[f"{src}attn.qkv.{leaf}"] = tuple(f"{dst}attention.{p}_proj.{leaf}" for p in "qkv")
        if kind == "dino":
            table[f"{src}ls1.gamma"] = (f"{dst}layer_scale1.lambda1",)
            table[f"{src}ls2.gamma"] = (f"{dst}layer_scale2.lambda1",)
    return table


# ---- small helpers ----------------------------------------------------------------------------------------

def _check_images(images, kind: str):
    if not (isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4
            and images.shape[-1] == 3):
        what = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"{kind} encoder: images must be a uint8 array [N, H, W, 3] (RGB), got {what}")


def key_problems(missing: list, unexpected: list) -> list[str]:
    return ([f"missing keys {_some(missing)}"] if missing else []) + \
           ([f"unexpected keys {_some(unexpected)}"] if unexpected else [])


def _some(keys, n: int = 3) -> str:
    keys = list(keys)
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(map(str, keys[:n])) + more


def _square(size) -> int:
    return size if isinstance(size, int) else int(size[0])


def first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
