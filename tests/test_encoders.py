"""The feature encoders (signllava/encoders.py, signllava/sign2vec.py) against the original models' forward.

timm and the torch-hub DINOv2 code do not run here, so the original forwards are restated below in plain
torch, reading the original-layout state dicts by their own key names: timm's VisionTransformer
(`forward_features`, global_pool=False: the CLS token after `norm`), dinov2's DinoVisionTransformer with
registers and layer scale, and the original Sign2VecModel (JSALT2024/sign2vec, `modeling_sign2vec.py`:
multi-cue conv stacks, feature projection, weight-normed positional convolution, pre- or post-norm
encoder, `hidden_states` numbering). Our converted transformers models must give the same numbers at fp32.
"""
import hashlib
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

from signllava.encoders import IMAGENET_MEAN, IMAGENET_STD, load_dino, load_mae
from signllava.errors import CheckpointError, DataError
from signllava.sign2vec import load_sign2vec
from tests import encoder_kit as kit

TIGHT = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


def images(n=3, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def reference_pixels(imgs: np.ndarray, size: int) -> torch.Tensor:
    """torchvision's Resize((size, size)) on a PIL image (PIL bilinear), ToTensor, Normalize."""
    resized = np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BILINEAR)) for im in imgs])
    x = torch.from_numpy(resized).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


# ---- the original image encoders, restated ---------------------------------------------------------------

def original_vit_cls(sd: dict, pixels: torch.Tensor, heads: int, dinov2: bool) -> torch.Tensor:
    """timm VisionTransformer.forward_features (MAE, global_pool=False) or dinov2's forward with registers:
    the CLS row of norm(x)."""
    width = sd["cls_token"].shape[-1]
    patch = sd["patch_embed.proj.weight"].shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    n = len(pixels)

    def norm(x, name):
        return F.layer_norm(x, (width,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-6)

    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = torch.cat([sd["cls_token"].expand(n, -1, -1), x.flatten(2).transpose(1, 2)], dim=1) + sd["pos_embed"]
    if dinov2:      # registers go after the CLS token, with no position embedding
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(n, -1, -1), x[:, 1:]], dim=1)
    for i in range(depth):
        b = f"blocks.{i}."
        qkv = F.linear(norm(x, b + "norm1"), sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"])
        q, k, v = qkv.reshape(n, x.shape[1], 3, heads, width // heads).permute(2, 0, 3, 1, 4)
        att = ((q @ k.transpose(-2, -1)) * (width // heads) ** -0.5).softmax(-1)
        a = F.linear((att @ v).transpose(1, 2).reshape(x.shape), sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"])
        x = x + (a * sd[b + "ls1.gamma"] if dinov2 else a)
        h = F.gelu(F.linear(norm(x, b + "norm2"), sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"]))
        m = F.linear(h, sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"])
        x = x + (m * sd[b + "ls2.gamma"] if dinov2 else m)
    return norm(x, "norm")[:, 0]


@pytest.mark.parametrize("nested,heads", [(True, None), (False, 4)])
def test_mae_checkpoint_equals_original_forward(tmp_path, nested, heads):
    path = tmp_path / "mae.pth"
    sd = kit.original_mae_state_dict(path, nested=nested, decoder=nested)
    enc = load_mae(str(path), num_heads=heads)
    assert enc.model.config.num_attention_heads == (heads or 1)         # 64 wide: one 64-wide head by default
    for imgs in (images(3), images(2, 40, 48, seed=1)):                 # native size, and resized
        ref = original_vit_cls(sd, reference_pixels(imgs, 32), heads or 1, dinov2=False)
        out = enc.encode(imgs)
        assert out.dtype == np.float32 and out.shape == (len(imgs), 64)
        torch.testing.assert_close(torch.from_numpy(out), ref, **TIGHT)
    other = load_mae(str(path), num_heads=heads, image_size=48)        # position embeddings interpolated
    assert other.encode(images(1)).shape == (1, 64) and other.describe()["architecture"]["native_image_size"] == 32


@pytest.mark.parametrize("layout,heads", [("teacher", None), ("flat", 4)])
def test_dino_checkpoint_equals_original_forward(tmp_path, layout, heads):
    path = tmp_path / "dino.pth"
    sd = kit.original_dino_checkpoint(path if layout == "teacher" else None)
    if layout == "flat":            # a plain dinov2 state dict, as the hub's released backbones are
        torch.save(sd, path)
    enc = load_dino(str(path), num_heads=heads, batch_size=2)            # several batches
    assert enc.describe()["architecture"]["num_register_tokens"] == 4
    imgs = images(5, 14, 14, seed=2)                                     # crops smaller than the input: upscaled
    ref = original_vit_cls(sd, reference_pixels(imgs, 28), heads or 1, dinov2=True)
    torch.testing.assert_close(torch.from_numpy(enc.encode(imgs)), ref, **TIGHT)


def test_hf_directories_and_describe(tmp_path):
    imgs = images(2, 36, 30, seed=3)
    for make, load, cls, size in ((kit.make_tiny_mae, load_mae, transformers.ViTModel, 32),
                                  (kit.make_tiny_dino, load_dino, transformers.Dinov2WithRegistersModel, 28)):
        directory = make(tmp_path / cls.__name__)
        enc = load(str(directory))
        plain = cls.from_pretrained(directory).eval()
        with torch.no_grad():
            ref = plain(pixel_values=reference_pixels(imgs, size)).last_hidden_state[:, 0]
        torch.testing.assert_close(torch.from_numpy(enc.encode(imgs)), ref, **TIGHT)
        d = enc.describe()
        digest = hashlib.sha256((directory / "model.safetensors").read_bytes()).hexdigest()
        assert d["source_kind"] == "HF directory" and d["sha256"] == {"model.safetensors": digest}
        assert d["architecture"]["image_size"] == size and d["dim"] == 64
        assert d["preprocessing"]["channel_order"] == "RGB"
    path = tmp_path / "mae.pth"
    kit.original_mae_state_dict(path)
    d = load_mae(str(path)).describe()
    assert d["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest() and d["source_kind"] == "original checkpoint"
    expected = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 1, "patch_size": 8,
                "image_size": 32, "mlp_dim": 96, "layer_norm_eps": 1e-6}
    assert {k: d["architecture"][k] for k in expected} == expected


def test_vit_mae_directory_loads_as_its_encoder(tmp_path):
    """An HF ViTMAE pretraining checkpoint (model_type vit_mae, decoder beside the encoder) loads into
    ViTModel; its CLS equals ViTMAEModel's at mask_ratio 0 (which shuffles the patches, leaving CLS as it is)."""
    config = transformers.ViTMAEConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                       image_size=32, patch_size=8, decoder_hidden_size=16, decoder_num_hidden_layers=1,
                                       decoder_num_attention_heads=2, decoder_intermediate_size=24, mask_ratio=0.0)
    kit.randomise(transformers.ViTMAEForPreTraining(config), 5).save_pretrained(tmp_path / "vitmae")
    enc = load_mae(str(tmp_path / "vitmae"))
    imgs = images(2, seed=4)
    mae = transformers.ViTMAEModel.from_pretrained(tmp_path / "vitmae").eval()
    with torch.no_grad():
        ref = mae(pixel_values=reference_pixels(imgs, 32)).last_hidden_state[:, 0]
    torch.testing.assert_close(torch.from_numpy(enc.encode(imgs)), ref, **TIGHT)


def test_preprocessing_channels_and_resize(tmp_path):
    path = tmp_path / "dino.pth"
    kit.original_dino_checkpoint(path)
    rgb = load_dino(str(path))
    imgs = images(2, 20, 24, seed=5)
    torch.testing.assert_close(rgb.preprocess(imgs), reference_pixels(imgs, 28), rtol=0, atol=1e-6)
    native = images(1, 28, 28, seed=6)                                   # the model's size: not resized at all
    torch.testing.assert_close(rgb.preprocess(native), reference_pixels(native, 28), rtol=0, atol=1e-6)
    red = np.zeros((1, 28, 28, 3), np.uint8)
    red[..., 0] = 255
    pixels = rgb.preprocess(red)[0]
    expected = [(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1],
                -IMAGENET_MEAN[2] / IMAGENET_STD[2]]
    torch.testing.assert_close(pixels.mean(dim=(1, 2)), torch.tensor(expected))  # channel 0 is R
    bgr = load_dino(str(path), channel_order="bgr")
    np.testing.assert_array_equal(bgr.encode(imgs), rgb.encode(np.ascontiguousarray(imgs[..., ::-1])))
    assert bgr.describe()["preprocessing"]["channel_order"] == "BGR"
    fast = load_dino(str(path), resize="torch")
    for shape in ((2, 14, 14), (2, 56, 56)):                            # up (the 56 crops to 224) and down
        imgs = images(*shape, seed=7)
        diff = (fast.preprocess(imgs) - rgb.preprocess(imgs)).abs().max().item()
        assert diff < 4 / 255 / min(IMAGENET_STD), diff                # within a few uint8 levels of PIL


def test_empty_batch_and_bad_images(tmp_path):
    path = tmp_path / "mae.pth"
    kit.original_mae_state_dict(path)
    enc = load_mae(str(path))
    assert enc.encode(np.zeros((0, 32, 32, 3), np.uint8)).shape == (0, 64)
    for bad in (np.zeros((2, 32, 32, 3), np.float32), np.zeros((32, 32, 3), np.uint8), [np.zeros((32, 32, 3))]):
        with pytest.raises(ValueError, match=r"uint8 array \[N, H, W, 3\]"):
            enc.encode(bad)


def _checkpoint_error(load, spec) -> str:
    with pytest.raises(CheckpointError) as info:
        load(str(spec))
    message = str(info.value)
    assert "\n" not in message and str(spec) in message, message
    return message


def test_image_checkpoint_errors(tmp_path):
    assert "not found" in _checkpoint_error(load_mae, tmp_path / "none" / "mae.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    assert "not a plain tensor file" in _checkpoint_error(load_mae, tmp_path / "junk.pth")     # safe_load's words
    torch.save({"weights": {"a": torch.zeros(1)}}, tmp_path / "other.pth")
    assert "unknown layout" in _checkpoint_error(load_mae, tmp_path / "other.pth")
    sd = kit.original_mae_state_dict()
    torch.save({k: v for k, v in sd.items() if k != "blocks.1.attn.proj.weight"}, tmp_path / "missing.pth")
    assert "missing keys blocks.1.attn.proj.weight" in _checkpoint_error(load_mae, tmp_path / "missing.pth")
    torch.save({**sd, "blocks.0.attn.extra.weight": torch.zeros(2)}, tmp_path / "extra.pth")
    assert "unexpected keys blocks.0.attn.extra.weight" in _checkpoint_error(load_mae, tmp_path / "extra.pth")
    torch.save({**sd, "blocks.1.mlp.fc1.weight": torch.zeros(80, 64)}, tmp_path / "shape.pth")
    assert "tensor shapes do not fit" in _checkpoint_error(load_mae, tmp_path / "shape.pth")
    kit.original_dino_checkpoint(tmp_path / "dino.pth")
    assert "unexpected keys blocks.0.ls1.gamma" in _checkpoint_error(load_mae, tmp_path / "dino.pth")
    kit.original_mae_state_dict(tmp_path / "mae.pth")
    assert "no register_tokens" in _checkpoint_error(load_dino, tmp_path / "mae.pth")
    odd = {k: v for k, v in sd.items()}
    odd["pos_embed"] = torch.zeros(1, 16, 64)                           # 15 patches: not a square grid
    torch.save(odd, tmp_path / "odd.pth")
    assert "cannot read a ViT" in _checkpoint_error(load_mae, tmp_path / "odd.pth")
    assert "into 0 heads" in _checkpoint_error(load_mae, _write(tmp_path / "narrow.pth",
                                                                 kit.original_mae_state_dict(hidden=32)))
    directory = kit.make_tiny_dino(tmp_path / "hf_dino")
    assert "model_type 'dinov2_with_registers' is not a mae encoder" in _checkpoint_error(load_mae, directory)
    assert "cannot read its config.json" in _checkpoint_error(load_dino, "nobody/no-such-model")   # offline
    assert "not found" in _checkpoint_error(load_dino, tmp_path / "no-such-dir")


def _write(path, state):
    torch.save(state, path)
    return path


# ---- sign2vec -------------------------------------------------------------------------------------------

def znorm(x: np.ndarray) -> np.ndarray:
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


def original_sign2vec_states(sd: dict, cfg: dict, x: np.ndarray) -> list[torch.Tensor]:
    """The original Sign2VecModel's hidden_states (output_hidden_states=True) for one clip, already
    normalised and padded: [T, 208] -> L + 1 tensors [T', H]."""
    prefix = "wav2vec2." if any(k.startswith("wav2vec2.") for k in sd) else ""

    def w(key):
        return sd[prefix + key]

    eps, hidden = cfg["layer_norm_eps"], cfg["hidden_size"]
    cues = ([("multi_cue_layers_pose", 0, 50), ("multi_cue_layers_right_hand", 50, 92),
             ("multi_cue_layers_left_hand", 92, 134), ("multi_cue_layers_face", 134, 208)]
            if cfg["use_multi_cue"] else [("conv_layers", 0, 208)])
    h = torch.from_numpy(x).T[None]
    outputs = []
    for name, start, end in cues:
        y = h[:, start:end]
        for i, stride in enumerate(cfg["conv_stride"]):
            p = f"feature_extractor.{name}.{i}."
            y = F.conv1d(y, w(p + "conv.weight"), w(p + "conv.bias"), stride=stride)
            if cfg["feat_extract_norm"] == "layer":
                y = F.layer_norm(y.transpose(1, 2), (y.shape[1],), w(p + "layer_norm.weight"),
                                 w(p + "layer_norm.bias"), eps=1e-5).transpose(1, 2)
            elif i == 0:
                y = F.group_norm(y, y.shape[1], w(p + "layer_norm.weight"), w(p + "layer_norm.bias"), eps=1e-5)
            y = F.gelu(y)
        outputs.append(y)
    y = torch.cat(outputs, dim=1).transpose(1, 2)
    y = F.layer_norm(y, (y.shape[-1],), w("feature_projection.layer_norm.weight"),
                     w("feature_projection.layer_norm.bias"), eps=eps)
    y = F.linear(y, w("feature_projection.projection.weight"), w("feature_projection.projection.bias"))

    conv = "encoder.pos_conv_embed.conv."
    g, v = ((w(conv + "weight_g"), w(conv + "weight_v")) if prefix + conv + "weight_g" in sd else
            (w(conv + "parametrizations.weight.original0"), w(conv + "parametrizations.weight.original1")))
    kernel = cfg["num_conv_pos_embeddings"]
    weight = g * v / v.norm(dim=(0, 1), keepdim=True)                    # torch weight_norm(dim=2)
    pos = F.conv1d(y.transpose(1, 2), weight, w(conv + "bias"), padding=kernel // 2,
                   groups=cfg["num_conv_pos_embedding_groups"])
    pos = pos[:, :, :-1] if kernel % 2 == 0 else pos
    y = y + F.gelu(pos).transpose(1, 2)

    def ln(t, name):
        return F.layer_norm(t, (hidden,), w(name + ".weight"), w(name + ".bias"), eps=eps)

    def attention(t, p):
        heads = cfg["num_attention_heads"]
        q, k, v_ = (F.linear(t, w(f"{p}attention.{n}_proj.weight"), w(f"{p}attention.{n}_proj.bias"))
                    .view(1, -1, heads, hidden // heads).transpose(1, 2) for n in "qkv")
        att = ((q * (hidden // heads) ** -0.5) @ k.transpose(-1, -2)).softmax(-1)
        out = (att @ v_).transpose(1, 2).reshape(t.shape)
        return F.linear(out, w(p + "attention.out_proj.weight"), w(p + "attention.out_proj.bias"))

    def feed_forward(t, p):
        t = F.gelu(F.linear(t, w(p + "feed_forward.intermediate_dense.weight"),
                            w(p + "feed_forward.intermediate_dense.bias")))
        return F.linear(t, w(p + "feed_forward.output_dense.weight"), w(p + "feed_forward.output_dense.bias"))

    stable = cfg["do_stable_layer_norm"]
    if not stable:
        y = ln(y, "encoder.layer_norm")
    states = [y]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        if stable:
            y = y + attention(ln(y, p + "layer_norm"), p)
            y = y + feed_forward(ln(y, p + "final_layer_norm"), p)
        else:
            y = ln(y + attention(y, p), p + "layer_norm")
            y = ln(y + feed_forward(y, p), p + "final_layer_norm")
        states.append(y)
    if stable:
        states[-1] = ln(y, "encoder.layer_norm")
    return [s[0] for s in states]


def _state(directory):
    from safetensors.torch import load_file
    files = list(directory.glob("*.safetensors"))
    return load_file(files[0]) if files else torch.load(directory / "pytorch_model.bin", weights_only=True)


VARIANTS = {
    "released": dict(),                            # pre-norm, LayerNorm front end, wav2vec2. prefix, weight_g/v
    "post-norm, group norm, bare": dict(do_stable_layer_norm=False, feat_extract_norm="group", prefix="",
                                        legacy_weight_norm=False, training_heads=False, weights="pytorch_model.bin",
                                        num_conv_pos_embeddings=7),
    "single cue": dict(use_multi_cue=False, conv_dim=[24, 24, 16]),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_sign2vec_equals_original_forward(tmp_path, variant):
    directory = kit.make_tiny_sign2vec(tmp_path / "s2v", **VARIANTS[variant])
    cfg = {**kit.TINY_SIGN2VEC, **{k: v for k, v in VARIANTS[variant].items() if k in kit.TINY_SIGN2VEC}}
    sd = _state(directory)
    pose = np.random.default_rng(0).normal(size=(41, 208)).astype(np.float32) * 3 + 1
    ref = original_sign2vec_states(sd, cfg, znorm(pose))
    for layer in (None, 0, 1, 2):
        out = load_sign2vec(str(directory), layer=layer).encode(pose)
        assert out.dtype == np.float32 and out.shape == ((41 - 5) // 2 - 1, 32)
        torch.testing.assert_close(torch.from_numpy(out), ref[2 if layer is None else layer], **TIGHT)


def test_sign2vec_lengths_padding_and_normalisation(tmp_path):
    directory = kit.make_tiny_sign2vec(tmp_path / "s2v")
    sd, cfg = _state(directory), kit.TINY_SIGN2VEC
    enc = load_sign2vec(str(directory))
    rng = np.random.default_rng(1)
    short = rng.normal(size=(3, 208)).astype(np.float32)
    padded = np.concatenate([znorm(short), np.zeros((32, 208), np.float32)])   # normalised, then 35 frames
    out = enc.encode(short)
    assert out.shape == ((35 - 5) // 2 - 1, 32) == (enc.output_length(3), 32)
    torch.testing.assert_close(torch.from_numpy(out), original_sign2vec_states(sd, cfg, padded)[-1], **TIGHT)
    tight = load_sign2vec(str(directory), min_frames=9)                        # the convolutions' own minimum
    assert tight.encode(short).shape == (1, 32) and tight.output_length(3) == 1
    long = rng.normal(size=(600, 208)).astype(np.float32)                      # past the original's 500-frame cut
    assert enc.encode(long).shape == ((600 - 5) // 2 - 1, 32)
    x = rng.normal(size=(50, 208)).astype(np.float32)
    torch.testing.assert_close(torch.from_numpy(enc.encode(2.5 * x - 7)), torch.from_numpy(enc.encode(x)),
                               rtol=1e-4, atol=1e-4)                           # z-normalised over the clip


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_sign2vec_batches_equal_single_clips(tmp_path, norm):
    directory = kit.make_tiny_sign2vec(tmp_path / "s2v", feat_extract_norm=norm)
    enc = load_sign2vec(str(directory), batch_size=3)
    rng = np.random.default_rng(2)
    poses = [rng.normal(size=(t, 208)).astype(np.float32) for t in (40, 3, 70, 36, 51)]
    batched = enc.encode_many(poses)
    for pose, out in zip(poses, batched):
        torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(enc.encode(pose)), **TIGHT)
    assert enc.encode_many([]) == []


def test_sign2vec_errors(tmp_path):
    assert "no readable config.json" in _checkpoint_error(load_sign2vec, tmp_path / "none")
    for name, change, expected in (("bert", {"model_type": "bert"}, "not a sign2vec config"),
                                   ("cues", {"num_multi_cue_layers": 3}, "num_multi_cue_layers 4, input_dim 208"),
                                   ("convs", {"conv_kernel": [5, 3]}, "does not make a wav2vec2 config")):
        directory = kit.make_tiny_sign2vec(tmp_path / name)
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, **change}))
        assert expected in _checkpoint_error(load_sign2vec, directory), name
    good = kit.make_tiny_sign2vec(tmp_path / "good")
    (good / "model.safetensors").rename(tmp_path / "weights.safetensors")
    assert "no weights (model.safetensors or pytorch_model.bin)" in _checkpoint_error(load_sign2vec, good)
    from safetensors.torch import load_file, save_file
    state = load_file(tmp_path / "weights.safetensors")
    for name, edit, expected in (
            ("missing", lambda s: s.pop("wav2vec2.encoder.layers.1.attention.k_proj.bias"),
             "missing keys encoder.layers.1.attention.k_proj.bias"),
            ("unexpected", lambda s: s.__setitem__("wav2vec2.encoder.extra", torch.zeros(1)),
             "unexpected keys encoder.extra"),
            ("shape", lambda s: s.__setitem__("wav2vec2.feature_projection.projection.bias", torch.zeros(5)),
             "feature_projection.projection.bias (5,) (config: (32,))")):
        broken = dict(state)
        edit(broken)
        directory = kit.make_tiny_sign2vec(tmp_path / name)
        save_file(broken, directory / "model.safetensors")
        assert expected in _checkpoint_error(load_sign2vec, directory), name
    ok = kit.make_tiny_sign2vec(tmp_path / "ok")
    with pytest.raises(CheckpointError, match="layer 3 is out of range: the model has 2 layers"):
        load_sign2vec(str(ok), layer=3)
    with pytest.raises(CheckpointError, match="min_frames 8 is below the 9 frames"):
        load_sign2vec(str(ok), min_frames=8)
    enc = load_sign2vec(str(ok))
    with pytest.raises(ValueError, match=r"must be \[T, 208\], got \(10, 207\)"):
        enc.encode(np.zeros((10, 207), np.float32))
    with pytest.raises(DataError, match="sign2vec: video1.clip3: no frames"):
        enc.encode(np.zeros((0, 208), np.float32), name="video1.clip3")
    nan = np.zeros((20, 208), np.float32)
    nan[4, 7] = math.nan
    with pytest.raises(DataError, match="NaN or infinite"):
        enc.encode(nan)
