"""Tiny random encoders for tests: HF model directories (safetensors) for MAE, DINOv2 with registers and
sign2vec, and the original's checkpoint layouts written to a file. Every tensor is random (norm weights and
layer scales too), so a test comparing two forwards notices any weight that is misplaced or ignored."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

TINY_VIT = dict(hidden=64, depth=2, patch=8, image=32, mlp=96)       # MAE: 4 x 4 patches
TINY_DINO = dict(hidden=64, depth=2, patch=7, image=28, mlp=128, registers=4)


def _random_like(shapes: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}


def randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random, norm weights around 1 so activations stay in range."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.3
            p.copy_(1.0 + noise if ("norm" in name and name.endswith("weight")) else noise)
    return model


def _vit_block_shapes(prefix: str, hidden: int, mlp: int, layer_scale: bool) -> dict:
    shapes = {f"{prefix}norm1.weight": (hidden,), f"{prefix}norm1.bias": (hidden,),
              f"{prefix}attn.qkv.weight": (3 * hidden, hidden), f"{prefix}attn.qkv.bias": (3 * hidden,),
              f"{prefix}attn.proj.weight": (hidden, hidden), f"{prefix}attn.proj.bias": (hidden,),
              f"{prefix}norm2.weight": (hidden,), f"{prefix}norm2.bias": (hidden,),
              f"{prefix}mlp.fc1.weight": (mlp, hidden), f"{prefix}mlp.fc1.bias": (mlp,),
              f"{prefix}mlp.fc2.weight": (hidden, mlp), f"{prefix}mlp.fc2.bias": (hidden,)}
    if layer_scale:
        shapes.update({f"{prefix}ls1.gamma": (hidden,), f"{prefix}ls2.gamma": (hidden,)})
    return shapes


def _vit_shapes(hidden, depth, patch, image, mlp, registers=None) -> dict:
    shapes = {"cls_token": (1, 1, hidden), "pos_embed": (1, (image // patch) ** 2 + 1, hidden),
              "patch_embed.proj.weight": (hidden, 3, patch, patch), "patch_embed.proj.bias": (hidden,),
              "norm.weight": (hidden,), "norm.bias": (hidden,)}
    if registers is not None:
        shapes.update({"register_tokens": (1, registers, hidden), "mask_token": (1, hidden)})
    for i in range(depth):
        shapes.update(_vit_block_shapes(f"blocks.{i}.", hidden, mlp, layer_scale=registers is not None))
    return shapes


def original_mae_state_dict(path: str | Path | None = None, *, nested: bool = True, decoder: bool = True,
                            seed: int = 0, **arch) -> dict:
    """A random MAE encoder in timm's names (what the test's reference forward reads). Written to `path` as
    the original's checkpoint: {"model": ...} (nested) with the MAE decoder's keys beside it."""
    state = _random_like(_vit_shapes(**{**TINY_VIT, **arch}), seed)
    if path is not None:
        hidden = state["cls_token"].shape[-1]
        extra = {"decoder_embed.weight": torch.randn(16, hidden), "decoder_pos_embed": torch.randn(1, 17, 16),
                 "mask_token": torch.randn(1, 1, 16), "decoder_blocks.0.norm1.weight": torch.randn(16)}
        full = {**state, **(extra if decoder else {})}
        torch.save({"model": full, "epoch": 399} if nested else full, path)
    return state


def original_dino_checkpoint(path: str | Path | None = None, *, seed: int = 1, **arch) -> dict:
    """A random DINOv2-with-registers backbone in dinov2's names; written to `path` as the original's
    training checkpoint: {"teacher": {"backbone.<key>": ..., "dino_head.<key>": ...}}."""
    arch = {**TINY_DINO, **arch}
    state = _random_like(_vit_shapes(arch["hidden"], arch["depth"], arch["patch"], arch["image"], arch["mlp"],
                                     registers=arch["registers"]), seed)
    if path is not None:
        teacher = {f"backbone.{k}": v for k, v in state.items()}
        teacher["dino_head.mlp.0.weight"] = torch.randn(32, arch["hidden"])
        torch.save({"teacher": teacher, "iteration": 12}, path)
    return state


def _save_hf(model, directory) -> Path:
    directory = Path(directory)
    model.save_pretrained(directory)          # safetensors
    return directory


def make_tiny_mae(directory, seed: int = 2) -> Path:
    c = TINY_VIT
    config = transformers.ViTConfig(hidden_size=c["hidden"], num_hidden_layers=c["depth"], num_attention_heads=2,
                                    intermediate_size=c["mlp"], patch_size=c["patch"], image_size=c["image"],
                                    layer_norm_eps=1e-6)
    return _save_hf(randomise(transformers.ViTModel(config, add_pooling_layer=False), seed), directory)


def make_tiny_dino(directory, seed: int = 3) -> Path:
    c = TINY_DINO
    config = transformers.Dinov2WithRegistersConfig(
        hidden_size=c["hidden"], num_hidden_layers=c["depth"], num_attention_heads=2, mlp_ratio=c["mlp"] // c["hidden"],
        patch_size=c["patch"], image_size=c["image"], num_register_tokens=c["registers"])
    return _save_hf(randomise(transformers.Dinov2WithRegistersModel(config), seed), directory)


TINY_SIGN2VEC = {
    "model_type": "wav2vec2", "input_dim": 208, "use_multi_cue": True, "num_multi_cue_layers": 4,
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 48,
    "conv_dim": [64, 64, 64], "conv_kernel": [5, 3, 1], "conv_stride": [2, 1, 1], "num_feat_extract_layers": 3,
    "conv_bias": True, "feat_extract_norm": "layer", "feat_extract_activation": "gelu", "hidden_act": "gelu",
    "do_stable_layer_norm": True, "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 4,
    "layer_norm_eps": 1e-5, "mask_time_prob": 0.05, "hidden_dropout": 0.1, "attention_dropout": 0.1,
    "activation_dropout": 0.1, "layerdrop": 0.1, "feat_proj_dropout": 0.0, "add_adapter": False,
    "adapter_attn_dim": None, "architectures": ["MultiCueSign2VecForPreTraining"],
}


def make_tiny_sign2vec(directory, *, seed: int = 4, prefix: str = "wav2vec2.", legacy_weight_norm: bool = True,
                       training_heads: bool = True, weights: str = "model.safetensors", **config) -> Path:
    """A sign2vec checkpoint directory in the original's layout: its config.json (the released configs'
    fields, tiny sizes; `config` overrides any) and weights saved as the pretraining model saves them
    (`wav2vec2.` prefix, quantizer / projection heads beside it, weight norm as weight_g / weight_v)."""
    from signllava.sign2vec import Sign2VecModel, _config   # noqa: PLC0415  (the kit's only use of the loader)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw = {**TINY_SIGN2VEC, **config}
    (directory / "config.json").write_text(json.dumps(raw, indent=1))
    model = randomise(Sign2VecModel(_config(str(directory))), seed)
    state = {}
    for key, value in model.state_dict().items():
        if legacy_weight_norm:
            key = key.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v")
        state[prefix + key] = value.contiguous()
    if training_heads:
        state.update({"project_hid.weight": torch.randn(8, raw["hidden_size"]), "project_q.bias": torch.randn(8),
                      "pose_quantizer.codevectors": torch.randn(1, 4, 4),
                      f"{prefix}masked_spec_embed": torch.randn(raw["hidden_size"])})
    if weights.endswith(".safetensors"):
        save_file(state, str(directory / weights))
    else:
        torch.save(state, directory / weights)
    return directory
