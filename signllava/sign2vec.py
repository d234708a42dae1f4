"""sign2vec: the original's wav2vec2-style encoder over the 208 pose numbers, with its multi-cue
convolutional front end, loaded from its own HF checkpoints (JSALT2024/sign2vec, branch `finetuning`,
`sign2vec/modeling_sign2vec.py` and `sign2vec/utils/run_sign2vec_inference.py`).

Those checkpoints say `model_type: wav2vec2` but add `input_dim` (208), `use_multi_cue` and
`num_multi_cue_layers` (4): stock `Wav2Vec2Model` cannot load them. The model here is transformers' own
wav2vec2 feature projection and encoder behind a small front end of our own, with the original's module
names, so a checkpoint's keys load as they are:
- front end (the original's `Sign2VecMultiCueFeatureEncoder`): one Conv1d stack per cue over its channel
  group of the 208 (pose 50 | right hand 42 | left hand 42 | face 74, in that order), each layer
  `feature_extractor.multi_cue_layers_{pose,right_hand,left_hand,face}.{i}.conv` (+ `.layer_norm`), with
  conv_dim[i] / 4 channels out; the four outputs concatenated (same order) along channels. Without
  `use_multi_cue`: one stack `feature_extractor.conv_layers.{i}` over all 208 channels. `feat_extract_norm`
  "layer" puts a LayerNorm over channels in every layer, "group" a GroupNorm(C, C) in the first only.
- `feature_projection.*` and `encoder.*`: transformers' Wav2Vec2FeatureProjection and
  Wav2Vec2Encoder / Wav2Vec2EncoderStableLayerNorm (`do_stable_layer_norm`), whose names the original reused.
Checkpoints saved from the pretraining model carry a `wav2vec2.` prefix and training-only heads (quantizers,
`project_hid`, `project_q`, `masked_spec_embed`): the prefix is removed and the heads dropped. The positional
convolution's weight norm may be stored as `weight_g` / `weight_v` (older torch) or as parametrizations.

Input as the original's inference: the clip's [T, 208] pose features z-normalised over all its values
(Wav2Vec2FeatureExtractor's do_normalize), zero frames appended up to `min_frames` (35 in the original,
which padded after normalising), channels first. Unlike the original: no truncation at 500 frames, all 208
channels padded (its YouTube-ASL script padded 170), and no clip silently replaced by zeros.

Output: `layer` picks one hidden state, numbered as the original's `hidden_states` (0: the encoder's input
after the positional convolution, and its layer norm in the post-norm encoder; k: the output of layer k;
the last: `last_hidden_state`, after the final layer norm in the pre-norm encoder). Only the layers up to it
run. A clip of T frames gives conv_out(max(T, min_frames)) vectors; (T - 5) // 2 - 1 for the released
configs (kernels 5, 3, 1; strides 2, 1, 1).
"""
from __future__ import annotations

import json

import numpy as np
import torch
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor
from transformers.activations import ACT2FN
from transformers.models.wav2vec2.modeling_wav2vec2 import (Wav2Vec2Encoder, Wav2Vec2EncoderStableLayerNorm,
                                                            Wav2Vec2FeatureProjection)
from transformers.utils import cached_file

from signllava import safe_load
from signllava.encoders import first_line, key_problems, sha256
from signllava.errors import CheckpointError, DataError

CUES = (("pose", 50), ("right_hand", 42), ("left_hand", 42), ("face", 74))   # the original's CUE_DIM order
ORIGINAL_MIN_FRAMES = 35
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_TRAINING_ONLY = ("quantizer.", "pose_quantizer.", "right_hand_quantizer.", "left_hand_quantizer.",
                  "face_quantizer.", "project_hid.", "project_q.", "masked_spec_embed")
_WEIGHT_NORM = {".conv.weight_g": ".conv.parametrizations.weight.original0",
                ".conv.weight_v": ".conv.parametrizations.weight.original1"}


class ConvLayer(nn.Module):
    """One layer of a cue's stack: Conv1d, optional norm, activation (keys `conv.*`, `layer_norm.*`)."""

    def __init__(self, config, channels_in: int, channels_out: int, index: int):
        super().__init__()
        self.conv = nn.Conv1d(channels_in, channels_out, kernel_size=config.conv_kernel[index],
                              stride=config.conv_stride[index], bias=config.conv_bias)
        self.norm = config.feat_extract_norm if (config.feat_extract_norm == "layer" or index == 0) else None
        if self.norm == "layer":
            self.layer_norm = nn.LayerNorm(channels_out, elementwise_affine=True)
        elif self.norm == "group":
            self.layer_norm = nn.GroupNorm(num_groups=channels_out, num_channels=channels_out, affine=True)
        self.activation = ACT2FN[config.feat_extract_activation]

    def forward(self, x):                      # [B, C, T]
        x = self.conv(x)
        if self.norm == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        elif self.norm == "group":
            x = self.layer_norm(x)
        return self.activation(x)


def conv_stack(config, channels_in: int, share: int) -> nn.ModuleList:
    """A cue's conv layers; `share` stacks split each conv_dim[i] between them (4 with multi-cue, else 1)."""
    layers = []
    for i, width in enumerate(config.conv_dim):
        layers.append(ConvLayer(config, channels_in, width // share, i))
        channels_in = width // share
    return nn.ModuleList(layers)


class FeatureEncoder(nn.Module):
    """[B, 208, T] -> [B, conv_dim[-1], T']: per-cue stacks concatenated, or one stack over all channels."""

    def __init__(self, config):
        super().__init__()
        self.cues = CUES if config.use_multi_cue else (("all", config.input_dim),)
        for name, width in self.cues:
            stack = conv_stack(config, width, len(self.cues))
            self.add_module("conv_layers" if name == "all" else f"multi_cue_layers_{name}", stack)
        self.stacks = [m for m in self.children()]

    def forward(self, x):
        outputs, start = [], 0
        for (_, width), stack in zip(self.cues, self.stacks):
            h, start = x[:, start:start + width], start + width
            for layer in stack:
                h = layer(h)
            outputs.append(h)
        return torch.cat(outputs, dim=1)


class Sign2VecModel(nn.Module):
    """The original's Sign2VecModel at inference, with its key names."""

    def __init__(self, config: Wav2Vec2Config):
        super().__init__()
        self.config = config
        self.feature_extractor = FeatureEncoder(config)
        self.feature_projection = Wav2Vec2FeatureProjection(config)
        stable = config.do_stable_layer_norm
        self.encoder = (Wav2Vec2EncoderStableLayerNorm if stable else Wav2Vec2Encoder)(config)

    def output_lengths(self, frames: torch.Tensor) -> torch.Tensor:
        for kernel, stride in zip(self.config.conv_kernel, self.config.conv_stride):
            frames = torch.div(frames - kernel, stride, rounding_mode="floor") + 1
        return frames

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor, layer: int):
        """frames [B, 208, T] zero-padded after each clip's `lengths`; returns hidden state `layer`
        [B, T', H] and each clip's valid length. Padding never changes a clip's valid vectors: its hidden
        states are zeroed before the positional convolution (a lone clip sees zeros there too, the
        convolution's own padding) and masked out of attention."""
        hidden, _ = self.feature_projection(self.feature_extractor(frames).transpose(1, 2))
        valid_lengths = self.output_lengths(lengths)
        valid = torch.arange(hidden.shape[1], device=hidden.device)[None] < valid_lengths[:, None]
        mask = None
        if not bool(valid.all()):
            hidden = hidden.masked_fill(~valid[..., None], 0.0)
            mask = torch.zeros(valid.shape, dtype=hidden.dtype, device=hidden.device)
            mask = mask.masked_fill(~valid, torch.finfo(hidden.dtype).min)[:, None, None, :]
        encoder, stable = self.encoder, self.config.do_stable_layer_norm
        hidden = hidden + encoder.pos_conv_embed(hidden)
        if not stable:
            hidden = encoder.layer_norm(hidden)
        for block in encoder.layers[:layer]:
            hidden = block(hidden, attention_mask=mask)
        if stable and layer == len(encoder.layers):
            hidden = encoder.layer_norm(hidden)
        return hidden, valid_lengths


class Sign2VecEncoder:
    """Pose features of clips -> sign2vec features: `encode(float32 [T, 208]) -> float32 [T', H]`;
    `encode_many` batches clips of different lengths (sorted by length, zero-padded, masked) with the
    same result as one clip at a time."""

    def __init__(self, model: Sign2VecModel, source: dict, layer: int, min_frames: int, device="cpu",
                 dtype=torch.float32, batch_size: int = 16):
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(device=self.device, dtype=dtype).eval()
        self.source, self.layer, self.min_frames, self.batch_size = source, layer, min_frames, batch_size
        self.input_dim, self.dim = model.config.input_dim, model.config.hidden_size
        # a GroupNorm front end normalises each channel over time, padding included: batch one clip at a time
        self._batchable = model.config.feat_extract_norm == "layer"

    def output_length(self, frames: int) -> int:
        return int(self.model.output_lengths(torch.tensor(max(frames, self.min_frames))))

    def encode(self, pose: np.ndarray, name: str = "clip") -> np.ndarray:
        return self.encode_many([pose], [name])[0]

    def encode_many(self, poses: list, names: list | None = None) -> list[np.ndarray]:
        names = names or [f"clip {i}" for i in range(len(poses))]
        clips = [self._prepare(pose, name) for pose, name in zip(poses, names, strict=True)]
        order = sorted(range(len(clips)), key=lambda i: len(clips[i]))
        step = self.batch_size if self._batchable else 1
        out: list = [None] * len(clips)
        with torch.inference_mode():
            for start in range(0, len(order), step):
                batch = order[start:start + step]
                longest = max(len(clips[i]) for i in batch)
                frames = np.zeros((len(batch), longest, self.input_dim), dtype=np.float32)
                for row, i in enumerate(batch):
                    frames[row, :len(clips[i])] = clips[i]
                x = torch.from_numpy(frames).to(self.device, self.dtype).transpose(1, 2)
                lengths = torch.tensor([len(clips[i]) for i in batch], device=self.device)
                hidden, valid = self.model(x, lengths, self.layer)
                hidden = hidden.float().cpu().numpy()
                for row, i in enumerate(batch):
                    out[i] = hidden[row, :int(valid[row])].copy()
        return out

    def _prepare(self, pose, name: str) -> np.ndarray:
        pose = np.asarray(pose, dtype=np.float32)
        if pose.ndim != 2 or pose.shape[1] != self.input_dim:
            raise ValueError(f"sign2vec: {name}: pose features must be [T, {self.input_dim}], got {pose.shape}")
        if len(pose) == 0:
            raise DataError(f"sign2vec: {name}: no frames")
        if not np.isfinite(pose).all():
            raise DataError(f"sign2vec: {name}: pose features hold NaN or infinite values")
        normed = Wav2Vec2FeatureExtractor.zero_mean_unit_var_norm([pose], attention_mask=None)[0]
        if len(normed) < self.min_frames:
            normed = np.concatenate([normed, np.zeros((self.min_frames - len(normed), self.input_dim),
                                                      dtype=np.float32)])
        return normed

    def describe(self) -> dict:
        c = self.model.config
        return {"encoder": "sign2vec", **self.source, "dim": self.dim, "layer": self.layer,
                "dtype": str(self.dtype).removeprefix("torch."), "batch_size": self.batch_size,
                "architecture": {"hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                                 "num_attention_heads": c.num_attention_heads, "input_dim": c.input_dim,
                                 "use_multi_cue": bool(c.use_multi_cue), "conv_dim": list(c.conv_dim),
                                 "conv_kernel": list(c.conv_kernel), "conv_stride": list(c.conv_stride),
                                 "feat_extract_norm": c.feat_extract_norm,
                                 "do_stable_layer_norm": bool(c.do_stable_layer_norm)},
                "preprocessing": {"normalise": "z over all values of the clip (Wav2Vec2FeatureExtractor, "
                                               "eps 1e-7)", "min_frames": self.min_frames,
                                  "pad": "zero frames after normalising", "truncate": None},
                "output_length": "conv_out(max(T, min_frames))"}


def minimum_frames(config) -> int:
    """The fewest input frames the conv stack turns into at least one vector."""
    need = 1
    for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride))):
        need = (need - 1) * stride + kernel
    return need


def load_sign2vec(spec: str, layer: int | None = None, device="cpu", dtype=torch.float32, *,
                  min_frames: int = ORIGINAL_MIN_FRAMES, batch_size: int = 16) -> Sign2VecEncoder:
    """A sign2vec checkpoint (HF id or directory: config.json + model.safetensors or pytorch_model.bin).
    `layer`: None = the last hidden state, else 0..num_hidden_layers as the module doc numbers them."""
    config = _config(spec)
    depth = config.num_hidden_layers
    layer = depth if layer is None else layer
    if not 0 <= layer <= depth:
        raise CheckpointError(f"{spec}: layer {layer} is out of range: the model has {depth} layers "
                              f"(0 = the encoder's input, {depth} = the last)")
    if min_frames < minimum_frames(config):
        raise CheckpointError(f"{spec}: min_frames {min_frames} is below the {minimum_frames(config)} frames "
                              f"its convolutions need for one output vector")
    weights_path = _weights_file(spec)
    model = Sign2VecModel(config)
    _load_weights(model, weights_path)
    source = {"source": str(spec), "weights": weights_path.rsplit("/", 1)[-1], "sha256": sha256(weights_path)}
    return Sign2VecEncoder(model, source, layer, min_frames, device=device, dtype=dtype, batch_size=batch_size)


def _config(spec: str) -> Wav2Vec2Config:
    try:
        path = cached_file(spec, "config.json")
        with open(path) as f:
            raw = json.load(f)
    except Exception as e:
        raise CheckpointError(f"{spec}: no readable config.json ({first_line(e)})") from None
    if raw.get("model_type") != "wav2vec2" or "input_dim" not in raw:
        raise CheckpointError(f"{spec}: not a sign2vec config (model_type {raw.get('model_type')!r}, "
                              f"input_dim {raw.get('input_dim')!r}; expected wav2vec2 with input_dim)")
    try:
        config = Wav2Vec2Config.from_dict(raw)
    except Exception as e:      # e.g. conv_dim, conv_kernel and conv_stride of different lengths
        raise CheckpointError(f"{spec}: its config.json does not make a wav2vec2 config ({first_line(e)})") from None
    config.use_multi_cue = bool(raw.get("use_multi_cue", False))
    if config.use_multi_cue:
        cues = raw.get("num_multi_cue_layers")
        widths = sum(w for _, w in CUES)
        if cues != len(CUES) or config.input_dim != widths or any(d % len(CUES) for d in config.conv_dim):
            raise CheckpointError(f"{spec}: a multi-cue config must have num_multi_cue_layers {len(CUES)}, "
                                  f"input_dim {widths} and conv_dim divisible by {len(CUES)} (has {cues}, "
                                  f"{config.input_dim}, {list(config.conv_dim)})")
    if config.add_adapter or getattr(config, "adapter_attn_dim", None):
        raise CheckpointError(f"{spec}: adapters (add_adapter / adapter_attn_dim) are not supported")
    if config.feat_extract_norm not in ("layer", "group"):
        raise CheckpointError(f"{spec}: feat_extract_norm {config.feat_extract_norm!r} is not layer or group")
    config._attn_implementation = "sdpa"
    return config


def _weights_file(spec: str) -> str:
    for name in WEIGHT_FILES:
        try:
            path = cached_file(spec, name, _raise_exceptions_for_missing_entries=False)
        except Exception as e:
            raise CheckpointError(f"{spec}: cannot fetch {name} ({first_line(e)})") from None
        if path:
            return path
    raise CheckpointError(f"{spec}: no weights ({' or '.join(WEIGHT_FILES)})")


def _load_weights(model: Sign2VecModel, path: str):
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            state = load_file(path)
        except Exception as e:
            raise CheckpointError(f"{path}: unreadable safetensors file ({first_line(e)})") from None
    else:
        state = safe_load.load(path)
    state = checkpoint_keys(state)
    expected = model.state_dict()
    problems = key_problems(sorted(set(expected) - set(state)), sorted(set(state) - set(expected)))
    if problems:
        raise CheckpointError(f"{path}: not a sign2vec checkpoint for its config: {'; '.join(problems)}")
    wrong = [f"{k} {tuple(v.shape)} (config: {tuple(expected[k].shape)})" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise CheckpointError(f"{path}: tensor shapes do not fit its config: {', '.join(wrong[:3])}")
    model.load_state_dict(state, strict=True)


def checkpoint_keys(state: dict) -> dict:
    """A checkpoint's keys as Sign2VecModel names them: `wav2vec2.` prefix off, training heads dropped,
    weight norm as parametrizations."""
    prefixed = any(k.startswith("wav2vec2.") for k in state)
    out = {}
    for key, value in state.items():
        if prefixed and not key.startswith("wav2vec2.") and key.startswith(_TRAINING_ONLY):
            continue
        key = key.removeprefix("wav2vec2.")
        if key.startswith("masked_spec_embed"):
            continue
        for old, new in _WEIGHT_NORM.items():
            if key.endswith(old):
                key = key[:-len(old)] + new
        out[key] = value
    return out
