"""extract.py's speed, stage by stage, against a frame-by-frame loop in the original's style, in one run.

    python bench/extract_speed.py --out bench/results/extract-speed-cpu-DATE.json        # real-size encoders
    python bench/extract_speed.py --tiny --out /tmp/x.json                                # tiny encoders, seconds

Ours is what extract.py runs: signllava/clip_inputs.prepare_clip (one pass of PyAV decoding, MediaPipe
Holistic, the crops and the 208 numbers, vectorised where the recipe allows) and encoder_bundle.Encoders
(frames of many clips in batches of --batch_size, clips of different lengths batched through sign2vec).
The baseline does what the original's scripts did, one frame at a time with the same models: OpenCV's
VideoCapture read loop, the same Holistic graph, each frame's signer crop / part crops / pose numbers on their
own, and every encoder called on that single frame (batch 1; sign2vec one clip at a time). It is generous to
the original: crops stay in memory (the original re-encoded them with mp4v and read them back seeking to
frame 0 for every frame), nothing is downloaded. Both must give the same features (checked, with the
tolerance the dtype allows) or the comparison would mean nothing.

Sections: 1. the astronaut clips (tests/video_kit.py) through both, CPU stages pinned to one core, so their
rates are per core; needs MediaPipe. 2. the encoders at large batches on clip inputs made from the same
photo (no MediaPipe needed): frames/s of each as the pipeline calls it, of the bare forward at several batch
sizes with MFU from FLOPs counted by torch's FlopCounterMode, and the batch-1 baseline. 3. arithmetic: the
cores that keep one GPU busy and projected wall times for How2Sign and YouTube-ASL (the hours and frame
rates are arguments, defaults cited in --help).

Encoders are the real architectures at real size with random weights built from configs: MAE ViT-B/16 at 224,
DINOv2 ViT-S/14 with 4 registers at 224 (257 positions, as the original's checkpoints), sign2vec's released
config (JSALT2024/sign2vec sign2vec/config.json: 768 wide, 12 layers, multi-cue 4 x 128 convolutions) over
the 208 pose numbers. --tiny uses tests/encoder_kit.py's tiny configs instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.synthetic import log  # noqa: E402
from signllava.clip_inputs import ClipInputs, ClipTask, prepare_clip  # noqa: E402
from signllava.clip_sources import ClipSpec  # noqa: E402
from signllava.encoder_bundle import EncoderChoice, Encoders  # noqa: E402

H200_BF16_PEAK = 989e12          # dense bf16 FLOP/s, the datasheet's (KINDS.md measured ~790 on random data)
CPU_STAGES = ("decode", "landmarks", "crops")
ENCODERS = ("mae", "dino", "sign2vec")
# Feature agreement of the baseline with ours: the worst frame's cosine similarity. fp32 differs only by
# summation order (batch 1 against batched kernels); bf16 kernels differ more between batch sizes.
MIN_COSINE = {"float32": 0.9999, "bfloat16": 0.99}

REAL_MAE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                patch_size=16, image_size=224, layer_norm_eps=1e-6)
REAL_DINO = dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, mlp_ratio=4, patch_size=14,
                 image_size=224, num_register_tokens=4, layer_norm_eps=1e-6, layerscale_value=1.0)
# JSALT2024/sign2vec sign2vec/config.json's architecture fields; input_dim 208, the pose stream it reads
# (the committed file says 170, a keypoint version the multi-cue front end's 50/42/42/74 groups do not fit).
REAL_SIGN2VEC = {
    "model_type": "wav2vec2", "input_dim": 208, "use_multi_cue": True, "num_multi_cue_layers": 4,
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 8, "intermediate_size": 3072,
    "conv_dim": [512, 512, 512], "conv_kernel": [5, 3, 1], "conv_stride": [2, 1, 1], "num_feat_extract_layers": 3,
    "conv_bias": True, "feat_extract_norm": "layer", "feat_extract_activation": "gelu", "hidden_act": "gelu",
    "do_stable_layer_norm": True, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16,
    "layer_norm_eps": 1e-5, "add_adapter": False, "adapter_attn_dim": None,
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny random encoders (tests/encoder_kit.py), small sizes")
    p.add_argument("--clips", type=int, default=3, help="section 1: astronaut clips")
    p.add_argument("--frames", type=int, default=48, help="section 1: frames a clip")
    p.add_argument("--size", default="640x480", help="section 1: frame size WxH")
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--encoder_frames", type=int, default=4096, help="section 2: frames through each encoder (0: skip)")
    p.add_argument("--baseline_frames", type=int, default=256, help="section 2: frames through the batch-1 loop")
    p.add_argument("--clip_frames", type=int, default=200,
                   help="section 2: frames a clip for sign2vec (How2Sign: ~80 h / ~35 k clips ~ 8 s ~ 200 frames)")
    p.add_argument("--batch_size", type=int, default=256, help="the pipeline's encoder batch (extract.py's default)")
    p.add_argument("--forward_batches", default="64,256,1024", help="section 2: bare forward batch sizes")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: per-core rates)")
    p.add_argument("--h2s_hours", type=float, default=80, help="How2Sign: 'more than 80 hours' (its paper)")
    p.add_argument("--h2s_fps", type=float, default=24, help="assumed frame rate of How2Sign's videos")
    p.add_argument("--yasl_hours", type=float, default=984, help="YouTube-ASL: 984 hours (its paper, sec. 1)")
    p.add_argument("--yasl_fps", type=float, default=30, help="assumed frame rate of YouTube-ASL's videos")
    p.add_argument("--cpu_core_fps", type=float,
                   help="decode+landmarks+crops frames/s of one core, for the projection when section 1 cannot run")
    p.add_argument("--node_cores", default="16,64", help="CPU cores of the nodes to project for")
    p.add_argument("--out", type=Path, required=True, help="the JSON to write")
    args = p.parse_args(argv)
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.tiny:
        args.clips, args.frames, args.size = min(args.clips, 1), min(args.frames, 6), "320x240"
        args.encoder_frames, args.baseline_frames = min(args.encoder_frames, 64), min(args.baseline_frames, 8)
        args.clip_frames, args.forward_batches = min(args.clip_frames, 40), "8,32"
    return args


def host_load() -> dict:
    """What else was running: this is a shared machine, so rates are only as clean as this says."""
    return {"loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count(),
            "pinned_to": sorted(os.sched_getaffinity(0))}


# ------------------------------------------------------------------------------------------ the models
def save_real_image_models(root: Path) -> dict:
    import transformers
    mae = transformers.ViTModel(transformers.ViTConfig(**REAL_MAE), add_pooling_layer=False)
    mae.save_pretrained(root / "mae")
    for name, seed in (("dino_face", 1), ("dino_hand", 2)):
        torch.manual_seed(seed)
        transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**REAL_DINO)).save_pretrained(root / name)
    return {"mae": root / "mae", "dino_face": root / "dino_face", "dino_hand": root / "dino_hand"}


def save_real_sign2vec(directory: Path) -> Path:
    """A sign2vec checkpoint directory as the original's HF repos hold it (config.json + safetensors)."""
    from safetensors.torch import save_file

    from signllava.sign2vec import Sign2VecModel, _config
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(REAL_SIGN2VEC, indent=1))
    model = Sign2VecModel(_config(str(directory)))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    return directory


def build_encoders(args, root: Path) -> Encoders:
    torch.manual_seed(0)
    if args.tiny:
        from tests.video_kit import tiny_encoders
        flags = tiny_encoders(root)
        paths = {flags[i].lstrip("-"): flags[i + 1] for i in range(0, len(flags), 2)}
    else:
        paths = {**save_real_image_models(root), "sign2vec": save_real_sign2vec(root / "s2v")}
    choice = EncoderChoice(**{k: str(v) for k, v in paths.items()}, device=args.device, dtype=args.dtype,
                           batch_size=args.batch_size)
    return Encoders(["mae", "sign2vec", "dino", "pose"], choice)


# ------------------------------------------------------------------------------------------ section 1
def astronaut_clips(root: Path, args) -> list[ClipSpec]:
    from signllava.video_io import write_video
    from tests.video_kit import film_astronaut
    width, height = (int(v) for v in args.size.split("x"))
    specs = []
    for k in range(args.clips):
        path = write_video(root / "clips" / f"clip{k}.mp4", film_astronaut(args.frames, width, height, seed=k),
                           fps=args.fps)
        specs.append(ClipSpec("bench", f"clip{k}", path, None, None, None))
    return specs


def ours_cpu(specs, mae_size: int) -> tuple[list[ClipInputs], dict]:
    clips, seconds = [], dict.fromkeys(CPU_STAGES, 0.0)
    for spec in specs:
        out = prepare_clip(ClipTask(spec, None, mae_size, True, "selected", 600.0))
        if not isinstance(out, ClipInputs):
            raise SystemExit(f"extract_speed: {out.reason}")
        clips.append(out)
        for stage in CPU_STAGES:
            seconds[stage] += out.seconds[stage]
    return clips, seconds


def decode_frame_by_frame(path: Path) -> np.ndarray:
    """The original's read loop: OpenCV's VideoCapture, one BGR frame at a time, made RGB."""
    import cv2
    capture, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
    capture.release()
    return np.stack(frames)


def one_frame(lm, t: int):
    """Landmarks of frame t alone (arrays [1, ...]), for the per-frame calls."""
    arrays = {f.name: getattr(lm, f.name)[t:t + 1] for f in dataclasses.fields(lm)
              if isinstance(getattr(lm, f.name), np.ndarray)}
    return dataclasses.replace(lm, **arrays)


def crops_frame_by_frame(frames: np.ndarray, lm, mae_size: int) -> dict:
    """The signer crop, its landmarks, the part crops and the 208 numbers of each frame on its own (the
    signing space is the clip's median box, as in the original); a missing part repeats its last crop."""
    from signllava import pose_features as pf
    box = pf.signing_space(lm)
    rows = {k: [] for k in ("pose", "mae", "face", "left_hand", "right_hand")}
    found = {"face": lm.face_found, "left_hand": lm.left_found, "right_hand": lm.right_found}
    for t, frame in enumerate(frames):
        signer = pf.crop_signer(frame[None], box)
        in_crop = pf.landmarks_in_crop(one_frame(lm, t), box)
        rows["pose"].append(pf.pose_features(in_crop)[0])
        rows["mae"].append(pf.mae_input(signer, mae_size)[0])
        for part, crop in zip(("face", "left_hand", "right_hand"), pf.part_crops(signer, in_crop)):
            keep_last = not found[part][t] and t > 0
            rows[part].append(rows[part][-1] if keep_last else crop[0])
    return {k: np.stack(v) for k, v in rows.items()}


def baseline_cpu(specs, mae_size: int) -> tuple[list[ClipInputs], dict]:
    from signllava import landmarks
    clips, seconds = [], dict.fromkeys(CPU_STAGES, 0.0)
    for spec in specs:
        t0 = time.perf_counter()
        frames = decode_frame_by_frame(spec.file)
        t1 = time.perf_counter()
        lm = landmarks.detect(frames, 25.0, spec.where())    # Holistic is per frame in both: the same call
        t2 = time.perf_counter()
        rows = crops_frame_by_frame(frames, lm, mae_size)
        seconds["decode"] += t1 - t0
        seconds["landmarks"] += t2 - t1
        seconds["crops"] += time.perf_counter() - t2
        clips.append(ClipInputs(spec.video, spec.clip, 25.0, rows["pose"].astype(np.float32), rows["mae"],
                                rows["face"], rows["left_hand"], rows["right_hand"]))
    return clips, seconds


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def encode_frame_by_frame(enc: Encoders, clips: list[ClipInputs], warm_up: bool = True) -> tuple[list[dict], dict]:
    """Every image encoder on one frame at a time, sign2vec on one clip at a time (the original's calls)."""
    seconds, feats = dict.fromkeys(ENCODERS, 0.0), []
    if warm_up:
        encode_frame_by_frame(enc, [head(clips[0], 2)], warm_up=False)
    for c in clips:
        out = {"pose": c.pose.astype(np.float16)}
        t0 = time.perf_counter()
        out["mae"] = np.concatenate([enc.mae.encode(c.mae[t:t + 1]) for t in range(c.frames)])
        sync()
        t1 = time.perf_counter()
        out["dino"] = np.concatenate([np.concatenate([enc.dino_face.encode(c.face[t:t + 1]),
                                                      enc.dino_hand.encode(c.left_hand[t:t + 1]),
                                                      enc.dino_hand.encode(c.right_hand[t:t + 1])], axis=1)
                                      for t in range(c.frames)])
        sync()
        t2 = time.perf_counter()
        out["sign2vec"] = enc.sign2vec.encode(c.pose, c.clip)
        sync()
        seconds["mae"] += t1 - t0
        seconds["dino"] += t2 - t1
        seconds["sign2vec"] += time.perf_counter() - t2
        feats.append({k: v.astype(np.float16) for k, v in out.items()})
    return feats, seconds


def head(clip: ClipInputs, n: int) -> ClipInputs:
    """The first n frames of a clip (warm-ups: libraries initialised, kernels chosen, before any timing)."""
    cut = {k: getattr(clip, k)[:n] for k in ("pose", "mae", "face", "left_hand", "right_hand")}
    return dataclasses.replace(clip, **cut)


def encode_ours(enc: Encoders, clips: list[ClipInputs]) -> tuple[list[dict], dict]:
    enc.encode([head(clips[0], 4)])
    feats, seconds = enc.encode(clips)
    return feats, {m: seconds[m] for m in ENCODERS}


def agreement(ours: list[dict], base: list[dict], dtype: str) -> dict:
    """Per modality: the worst frame's cosine similarity and the largest absolute difference, baseline vs ours."""
    out = {}
    for m in ("pose", *ENCODERS):
        a = np.concatenate([f[m] for f in base]).astype(np.float64)
        b = np.concatenate([f[m] for f in ours]).astype(np.float64)
        if a.shape != b.shape:
            out[m] = {"ok": False, "why": f"shapes {a.shape} vs {b.shape}"}
            continue
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        exact_needed = m == "pose"             # no model: the per-frame numbers must be the very same
        diff = float(np.abs(a - b).max())
        ok = diff == 0.0 if exact_needed else float(cos.min()) >= MIN_COSINE[dtype]
        out[m] = {"min_cosine": round(float(cos.min()), 6), "max_abs_diff": diff, "ok": bool(ok)}
    return out


def rates(frames: int, seconds: dict) -> dict:
    return {k: round(frames / s, 2) if s > 0 else None for k, s in seconds.items()}


def ratio_table(ours: dict, base: dict) -> dict:
    return {k: round(ours[k] / base[k], 2) if ours.get(k) and base.get(k) else None for k in ours}


def section_pipeline(args, enc: Encoders, root: Path) -> dict:
    specs = astronaut_clips(root, args)
    warm = dataclasses.replace(specs[0], end=4 / args.fps, start=0.0)
    ours_cpu([warm], enc.mae_size)              # imports (MediaPipe, PyAV), the first graph: not timed
    baseline_cpu([warm], enc.mae_size)
    ours_clips, ours_cpu_s = ours_cpu(specs, enc.mae_size)
    base_clips, base_cpu_s = baseline_cpu(specs, enc.mae_size)
    frames = sum(c.frames for c in ours_clips)
    log(f"section 1: {len(specs)} clips x {args.frames} frames at {args.size}, CPU stages done; {host_load()}")
    ours_feats, ours_enc_s = encode_ours(enc, ours_clips)
    base_feats, base_enc_s = encode_frame_by_frame(enc, base_clips)
    ours_s, base_s = {**ours_cpu_s, **ours_enc_s}, {**base_cpu_s, **base_enc_s}
    for s in (ours_s, base_s):
        s["cpu_stages"] = sum(s[k] for k in CPU_STAGES)
        s["encoders"] = sum(s[k] for k in ENCODERS)
        s["clip_to_features"] = s["cpu_stages"] + s["encoders"]
    same_inputs = all(np.array_equal(getattr(a, k), getattr(b, k)) for a, b in zip(ours_clips, base_clips)
                      for k in ("pose", "mae", "face", "left_hand", "right_hand"))
    result = {"clips": len(specs), "frames": frames, "size": args.size,
              "seconds": {"ours": ours_s, "baseline": base_s},
              "frames_per_s": {"ours": rates(frames, ours_s), "baseline": rates(frames, base_s)},
              "encoder_inputs_identical": bool(same_inputs),
              "features_agree": agreement(ours_feats, base_feats, args.dtype), "load_after": host_load()}
    result["speedup"] = ratio_table(result["frames_per_s"]["ours"], result["frames_per_s"]["baseline"])
    return result


# ------------------------------------------------------------------------------------------ section 2
def photo_clips(frames: int, clip_frames: int, mae_size: int) -> list[ClipInputs]:
    """Encoder inputs cut from the astronaut photo without MediaPipe (for the encoders, content is only
    numbers): the signer crop at MAE's size, face and hand boxes at 56, random pose numbers."""
    import cv2
    from skimage import data
    photo, rng = data.astronaut(), np.random.default_rng(0)
    clips = []
    for k in range(max(1, frames // clip_frames)):
        shift = [(t + k) % 40 for t in range(clip_frames)]
        crop = lambda y, x, s, out: np.stack([cv2.resize(photo[y + d:y + d + s, x + d:x + d + s], (out, out))  # noqa: E731
                                              for d in shift])
        clips.append(ClipInputs("photo", f"c{k}", 25.0, rng.normal(size=(clip_frames, 208)).astype(np.float32),
                                crop(0, 0, 460, mae_size), crop(60, 150, 120, 56), crop(300, 40, 90, 56),
                                crop(300, 330, 90, 56)))
    return clips


def flops_per_call(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    # no_grad, not inference_mode: under inference_mode the counter's module tracking breaks weight norm's
    # parametrization (sign2vec's positional convolution), torch 2.13
    with torch.no_grad(), counter:
        fn()
    return counter.get_total_flops()


def timed(fn, min_seconds: float = 1.0, max_reps: int = 50) -> float:
    """Seconds per call: one warm-up, then calls until min_seconds have passed."""
    fn()
    sync()
    start, reps = time.perf_counter(), 0
    while reps < max_reps and (reps == 0 or time.perf_counter() - start < min_seconds):
        fn()
        reps += 1
    sync()
    return (time.perf_counter() - start) / reps


def bare_forward(image_encoder, batches: list[int], images_per_frame: int) -> dict:
    """The model alone on inputs already on the device: frames/s and MFU at each batch size."""
    model, size, dev = image_encoder.model, image_encoder.image_size, image_encoder.device
    pixels = torch.randn(max(batches), 3, size, size, device=dev, dtype=image_encoder.dtype)
    per_image = flops_per_call(lambda: model(pixel_values=pixels[:1]))
    rows = {}
    for b in batches:
        with torch.inference_mode():
            s = timed(lambda: model(pixel_values=pixels[:b]))
        fps = b / s / images_per_frame
        rows[b] = {"frames_per_s": round(fps, 1),
                   "mfu_of_h200_bf16_peak": round(fps * images_per_frame * per_image / H200_BF16_PEAK, 4)}
        log(f"  forward {image_encoder.kind} batch {b}: {fps:.0f} frames/s, MFU {100 * rows[b]['mfu_of_h200_bf16_peak']:.1f}%")
    return {"flops_per_frame": per_image * images_per_frame, "by_batch": rows}


def sign2vec_flops_per_frame(enc: Encoders, clip_frames: int) -> float:
    x = torch.zeros(1, enc.sign2vec.input_dim, clip_frames, device=enc.sign2vec.device, dtype=enc.sign2vec.dtype)
    lengths = torch.tensor([clip_frames], device=x.device)
    return flops_per_call(lambda: enc.sign2vec.model(x, lengths, enc.sign2vec.layer)) / clip_frames


def torch_resize_variant(enc: Encoders):
    """The DINO face encoder resizing 56 -> 224 on the device (resize='torch') instead of PIL on the host."""
    from signllava.encoders import ImageEncoder
    e = enc.dino_face
    return ImageEncoder(e.model, "dino", e.source, device=e.device, dtype=e.dtype, batch_size=e.batch_size,
                        resize="torch")


def section_encoders(args, enc: Encoders) -> dict:
    clips = photo_clips(args.encoder_frames, args.clip_frames, enc.mae_size)
    frames = sum(c.frames for c in clips)
    ours_feats, ours_s = encode_ours(enc, clips)
    few = photo_clips(args.baseline_frames, min(args.clip_frames, args.baseline_frames), enc.mae_size)
    few_frames = sum(c.frames for c in few)
    base_feats, base_s = encode_frame_by_frame(enc, few)
    ours_few, _ = enc.encode(few)
    batches = [int(b) for b in args.forward_batches.split(",")]
    faces = np.concatenate([c.face for c in clips])
    pil_s = timed(lambda: enc.dino_face.encode(faces), max_reps=3)
    on_gpu = torch_resize_variant(enc)
    gpu_s = timed(lambda: on_gpu.encode(faces), max_reps=3)
    resize_diff = np.abs(on_gpu.encode(faces[:256]) - enc.dino_face.encode(faces[:256]))
    out = {"frames": frames, "baseline_frames": few_frames, "batch_size": args.batch_size,
           "pipeline_frames_per_s": {"ours": rates(frames, ours_s), "baseline": rates(few_frames, base_s)},
           "features_agree": agreement(ours_few, base_feats, args.dtype),
           "forward": {"mae": bare_forward(enc.mae, batches, 1), "dino": bare_forward(enc.dino_face, batches, 3)},
           "sign2vec_flops_per_frame": sign2vec_flops_per_frame(enc, args.clip_frames),
           "dino_face_images_per_s": {"pil_resize_on_host": round(len(faces) / pil_s, 1),
                                      "torch_resize_on_device": round(len(faces) / gpu_s, 1),
                                      "max_abs_feature_diff": float(resize_diff.max())}}
    p = out["pipeline_frames_per_s"]
    p["speedup"] = ratio_table(p["ours"], p["baseline"])
    p["ours"]["all_encoders"] = round(1 / sum(1 / p["ours"][m] for m in ENCODERS), 1)
    p["baseline"]["all_encoders"] = round(1 / sum(1 / p["baseline"][m] for m in ENCODERS), 1)
    flops = out["forward"]["mae"]["flops_per_frame"] + out["forward"]["dino"]["flops_per_frame"] + \
        out["sign2vec_flops_per_frame"]
    out["pipeline_mfu_all_encoders_of_h200_bf16_peak"] = round(p["ours"]["all_encoders"] * flops / H200_BF16_PEAK, 4)
    return out


# ------------------------------------------------------------------------------------------ section 3
def projection(args, cpu_core_fps: float | None, gpu_fps: float | None) -> dict:
    """Cores that keep one GPU busy, and wall hours for the two data sets on one GPU and N cores (one CPU
    process a core, the encoders in the main process): arithmetic from the measured rates, not runs."""
    sets = {"How2Sign": (args.h2s_hours, args.h2s_fps), "YouTube-ASL": (args.yasl_hours, args.yasl_fps)}
    out = {"assumptions": {k: {"hours": h, "fps": f, "frames": int(h * 3600 * f)} for k, (h, f) in sets.items()},
           "cpu_frames_per_s_per_core": cpu_core_fps, "gpu_frames_per_s_all_encoders": gpu_fps}
    if not (cpu_core_fps and gpu_fps):
        return out
    out["cores_to_keep_one_gpu_busy"] = round(gpu_fps / cpu_core_fps, 1)
    for cores in (int(c) for c in args.node_cores.split(",")):
        rate = min(gpu_fps, cores * cpu_core_fps)
        out[f"{cores}_cores"] = {"frames_per_s": round(rate, 1), "gpu_busy": round(rate / gpu_fps, 3),
                                 **{f"{k}_hours": round(v["frames"] / rate / 3600, 1)
                                    for k, v in out["assumptions"].items()}}
    return out


# ------------------------------------------------------------------------------------------ the run
def mediapipe_problem() -> str | None:
    try:
        import av  # noqa: F401
        import mediapipe  # noqa: F401
    except Exception as e:          # the device image may lack them: section 1 is then skipped, said
        return f"{type(e).__name__}: {e}"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    threads, affinity = torch.get_num_threads(), os.sched_getaffinity(0)
    torch.set_num_threads(args.threads)
    os.sched_setaffinity(0, {min(affinity)})   # every thread started from here on stays on this one core
    try:
        result = run(args)
    finally:                                    # in-process callers (the test) get their process back
        os.sched_setaffinity(0, affinity)
        torch.set_num_threads(threads)
    save(args.out, result)
    sections = [result[k] for k in ("pipeline", "encoders") if k in result]
    agree = [v for sec in sections for v in sec.get("features_agree", {}).values()]
    ok = bool(agree) and all(a["ok"] for a in agree) and not any("failed" in sec for sec in sections)
    log(f"wrote {args.out}; the baseline's features agree with ours: {ok}")
    return 0 if ok else 1


def save(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


def section(measure, report) -> dict:
    """One section's results, or why it failed (the other section still runs: device time is scarce)."""
    try:
        out = measure()
    except Exception as e:                  # noqa: BLE001 (recorded and printed whole, never hidden)
        traceback.print_exc()
        return {"failed": f"{type(e).__name__}: {e}"}
    report(out)
    return out


def run(args) -> dict:
    cuda = args.device.startswith("cuda")
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    result = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "device": device_name, "dtype": args.dtype,
              "torch": torch.__version__, "python": platform.python_version(), "tiny": args.tiny,
              "load_before": host_load(), "args": {k: str(v) for k, v in vars(args).items()}}
    log(f"{device_name}, {args.dtype}, torch {torch.__version__}; {result['load_before']}")
    with tempfile.TemporaryDirectory(prefix="extract_speed_") as tmp:
        enc = build_encoders(args, Path(tmp))
        log(f"encoders built ({'tiny' if args.tiny else 'real size'})")
        problem = mediapipe_problem()
        if problem:
            log(f"section 1 skipped: MediaPipe / PyAV not importable here ({problem})")
            result["pipeline"] = {"skipped": problem}
        else:
            result["pipeline"] = section(lambda: section_pipeline(args, enc, Path(tmp)), report_pipeline)
        save(args.out, result)              # what a later section's crash or a time limit cannot take away
        if args.encoder_frames > 0:
            result["encoders"] = section(lambda: section_encoders(args, enc), report_encoders)
    pipe, encs = result["pipeline"], result.get("encoders")
    encs = encs if encs and "failed" not in encs else None
    core_fps = (round(pipe["frames"] / pipe["seconds"]["ours"]["cpu_stages"], 2) if "frames" in pipe
                else args.cpu_core_fps)
    if cuda and encs:
        result["projection"] = projection(args, core_fps, encs["pipeline_frames_per_s"]["ours"]["all_encoders"])
    else:
        result["projection"] = {"skipped": "no GPU encoders in this run", "cpu_frames_per_s_per_core": core_fps}
    log(f"projection: {json.dumps(result['projection'])}")
    result["load_after"] = host_load()
    return result


def report_pipeline(r: dict):
    o, b, s = r["frames_per_s"]["ours"], r["frames_per_s"]["baseline"], r["speedup"]
    log(f"section 1: {r['frames']} frames; frames/s  ours | frame-by-frame baseline | ratio")
    for k in (*CPU_STAGES, *ENCODERS, "cpu_stages", "encoders", "clip_to_features"):
        log(f"  {k:17s} {o[k]:10.1f} | {b[k]:10.1f} | {s[k]}x")
    log(f"  encoder inputs identical: {r['encoder_inputs_identical']}; features: {json.dumps(r['features_agree'])}")


def report_encoders(r: dict):
    p = r["pipeline_frames_per_s"]
    log(f"section 2: {r['frames']} frames (baseline {r['baseline_frames']}); frames/s  ours | batch 1 | ratio")
    for k in ENCODERS:
        log(f"  {k:9s} {p['ours'][k]:10.1f} | {p['baseline'][k]:8.1f} | {p['speedup'][k]}x")
    log(f"  all encoders: {p['ours']['all_encoders']} frames/s (MFU {100 * r['pipeline_mfu_all_encoders_of_h200_bf16_peak']:.1f}%), "
        f"baseline {p['baseline']['all_encoders']}")
    log(f"  dino face images/s: {json.dumps(r['dino_face_images_per_s'])}")
    log(f"  features: {json.dumps(r['features_agree'])}")


if __name__ == "__main__":
    sys.exit(main())
