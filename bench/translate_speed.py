"""translate.py's real-time factor: seconds of signing video per second of work, and each stage's share.

    python bench/translate_speed.py                       # this CPU: tiny LLM, tiny encoders (what the tests run)
    python bench/translate_speed.py --shape 8b --encoders real --device cuda     # an H200: Llama-3-8B shape,
                                                          # ViT-B/16 MAE, DINOv2 ViT-S/14 reg, sign2vec at real size

The video is the demo language's (signllava/visual_language.py: the astronaut photo signing sentences with
rests between them) at --size pixels, so automatic segmentation has real sentences to find. The models are
random-init at the named shapes (nothing to download): the work per frame and per token is the real one, the
words are not. A random LLM never says its end-of-turn token, so every segment is generated to
--new_tokens (about a How2Sign sentence), with beams and predicted context (window 2) as a trained checkpoint
would be used. The first video warms up (graphs, compiles, caches) and is not counted; the second is measured.
Writes bench/results/translate-speed-<device>-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

MODALITIES = ["mae", "sign2vec", "dino", "pose"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny", help="LLM shape of bench/synthetic.py (tiny, 8b, ...)")
    p.add_argument("--encoders", choices=("tiny", "real"), default="tiny")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--sentences", type=int, default=8, help="sentences in the measured video")
    p.add_argument("--size", type=int, default=384, help="frame side in pixels")
    p.add_argument("--num_beams", type=int, default=5)
    p.add_argument("--new_tokens", type=int, default=24)
    p.add_argument("--workers", type=int, default=0, help="translate.py --workers")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    return p.parse_args(argv)


def film(root: Path, sentences: int, size: int) -> dict[str, Path]:
    """A warm-up video (2 sentences) and the measured one, in the demo language."""
    from signllava.visual_language import Filming, write_corpus
    paths = {}
    for name, n in (("warmup", 2), ("measured", sentences)):
        record = write_corpus(root / name, {"bench": 1}, sentences_per_video=(n, n), seed=7, filming=Filming(size=size))
        paths[name] = root / name / "bench" / "videos" / f"{next(iter(record['videos']))}.mp4"
    return paths


def encoder_paths(kind: str, root: Path) -> dict[str, str]:
    if kind == "tiny":
        from tests.video_kit import tiny_encoders
        flags = tiny_encoders(root)
        return {flags[i].lstrip("-"): str(flags[i + 1]) for i in range(0, len(flags), 2)}
    from bench.extract_speed import save_real_image_models, save_real_sign2vec
    return {**{k: str(v) for k, v in save_real_image_models(root).items()},
            "sign2vec": str(save_real_sign2vec(root / "s2v"))}


def make_checkpoint(root: Path, args, llm, tokenizer) -> Path:
    """A stage-1 checkpoint directory whose config records the extraction the encoders make."""
    from model import SignConfig, compute_dtype, save_projectors
    from signllava.encoder_bundle import EncoderChoice, Encoders
    from signllava.extraction_record import settings_record
    from bench.synthetic import assemble_with
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    paths = encoder_paths(args.encoders, root / "encoders")
    encoders = Encoders(MODALITIES, EncoderChoice(**paths, device=args.device, dtype=dtype))
    record = settings_record(MODALITIES, "selected", False, dtype, encoders)
    dims = {"mae": encoders.mae.dim, "dino": 3 * encoders.dino_face.dim, "sign2vec": encoders.sign2vec.dim, "pose": 208}
    ckpt = root / "checkpoint"
    ckpt.mkdir(parents=True)
    tokenizer.save_pretrained(ckpt / "tokenizer")
    cfg = SignConfig(base_model=str(ckpt / "tokenizer"), tokenizer=str(ckpt / "tokenizer"), modalities=MODALITIES,
                     dims=dims, projector_types={m: "mlp2x_gelu" for m in MODALITIES}, context_window=2,
                     modality_embeddings=True, extraction=record)
    model = assemble_with(llm, cfg, tokenizer, torch.device(args.device), compute_dtype(torch.device(args.device)))
    save_projectors(model.projector_state(), ckpt)
    cfg.save(ckpt)
    return ckpt


def measure(args) -> dict:
    from bench.synthetic import build_llm, make_tokenizer, patched_load_llm
    from model import compute_dtype
    from signllava.video_translate import VideoTranslator
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        videos = film(root, args.sentences, args.size)
        tokenizer = make_tokenizer()
        ckpt = make_checkpoint(root, args, build_llm(args.shape, torch.device(args.device), compute_dtype(torch.device(args.device))),
                               tokenizer)
        llm = build_llm(args.shape, torch.device(args.device), compute_dtype(torch.device(args.device)), seed=1)
        with patched_load_llm(llm):
            vt = VideoTranslator(ckpt, device=args.device, segments="auto", num_beams=args.num_beams,
                                 workers=args.workers, max_new_tokens=args.new_tokens)
        vt.min_new_tokens = args.new_tokens        # a random LLM may say end-of-turn early: every segment runs to length
        vt.translate_video(videos["warmup"])
        start = time.perf_counter()
        result = vt.translate_video(videos["measured"])
        wall = time.perf_counter() - start
    work = sum(result.seconds.values())
    return {"video_seconds": round(result.duration, 2), "segments": len(result.segments), "wall_seconds": round(wall, 2),
            "real_time_factor": round(result.duration / wall, 3),
            "phase_seconds": {k: round(v, 2) for k, v in result.seconds.items()},
            "phase_share": {k: round(v / work, 3) for k, v in result.seconds.items()},
            "stage_seconds": {k: round(v, 2) for k, v in result.stage_seconds.items()},
            "generated_tokens_per_segment": args.new_tokens}


def main(argv=None) -> int:
    args = parse_args(argv)
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "host": {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "cpus": os.cpu_count(), "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__}, **measure(args)}
    args.out.mkdir(parents=True, exist_ok=True)
    name = result["host"]["device"].lower().replace(" ", "-")
    path = args.out / f"translate-speed-{name}-{args.shape}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"real-time factor {result['real_time_factor']}x ({result['video_seconds']} s of video in "
          f"{result['wall_seconds']} s); written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
