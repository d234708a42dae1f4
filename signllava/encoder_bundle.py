"""The GPU half of extraction: the encoders one extraction needs, loaded once, run on a group of clips.

Frames of all clips in a group are encoded in shared batches (the encoders split them by their batch size),
then cut back into clips. extract.py groups the clips of one video, so a clip's features never depend on
which rank or which resumed run encoded it.

    mae       the signer crop -> ViT-B/16 MAE normed CLS                       [T, 768]
    dino      face | left hand | right hand crops -> DINOv2 normed CLS each    [T, 3 x 384]
    sign2vec  the 208 pose numbers -> the wav2vec2-style encoder               [about T/2, 768]
    pose      the 208 pose numbers themselves                                  [T, 208]
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from signllava.clip_inputs import ClipInputs
from signllava.errors import DataError, RunError

MODALITIES = ("mae", "sign2vec", "dino", "pose")
FLOAT16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class EncoderChoice:
    """Which models, on which device; the flags of extract.py."""
    mae: str | None = None
    dino_face: str | None = None
    dino_hand: str | None = None
    sign2vec: str | None = None
    sign2vec_layer: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 64
    channel_order: str = "rgb"            # "bgr": the released features' swapped colours (see extract.py)
    resize: str = "pil"                   # "torch": image encoders resize on their device (see encoders.py)


def needed_models(modalities: list[str], choice: EncoderChoice) -> list[str]:
    """The flags a modality list needs but was not given, e.g. ['--mae'] (empty when all are there)."""
    want = {"mae": ["mae"], "dino": ["dino_face", "dino_hand"], "sign2vec": ["sign2vec"], "pose": []}
    return [f"--{flag}" for m in modalities for flag in want[m] if getattr(choice, flag) is None]


class Encoders:
    def __init__(self, modalities: list[str], choice: EncoderChoice):
        from signllava.encoders import load_dino, load_mae
        from signllava.sign2vec import load_sign2vec

        self.modalities = list(modalities)
        dtype = getattr(torch, choice.dtype)
        image = dict(device=choice.device, dtype=dtype, batch_size=choice.batch_size,
                     channel_order=choice.channel_order, resize=choice.resize)
        self.mae = load_mae(choice.mae, **image) if "mae" in modalities else None
        self.dino_face = load_dino(choice.dino_face, **image) if "dino" in modalities else None
        self.dino_hand = load_dino(choice.dino_hand, **image) if "dino" in modalities else None
        self.sign2vec = (load_sign2vec(choice.sign2vec, choice.sign2vec_layer, device=choice.device, dtype=dtype)
                         if "sign2vec" in modalities else None)

    @property
    def mae_size(self) -> int | None:
        return self.mae.image_size if self.mae else None

    def describe(self) -> dict:
        models = {"mae": self.mae, "dino_face": self.dino_face, "dino_hand": self.dino_hand,
                  "sign2vec": self.sign2vec}
        return {name: enc.describe() for name, enc in models.items() if enc is not None}

    def encode(self, clips: list[ClipInputs]) -> tuple[list[dict[str, np.ndarray]], dict[str, float]]:
        """Each clip's features per modality (float16 [T, D]) and the seconds each encoder took."""
        out: list[dict[str, np.ndarray]] = [{} for _ in clips]
        seconds: dict[str, float] = {}
        lengths = [c.frames for c in clips]
        for m in self.modalities:
            start = time.perf_counter()
            if m == "pose":
                feats = [c.pose for c in clips]
            elif m == "mae":
                feats = _split(self.mae.encode(np.concatenate([c.mae for c in clips])), lengths)
            elif m == "dino":
                face = self.dino_face.encode(np.concatenate([c.face for c in clips]))
                hands = self.dino_hand.encode(np.concatenate([c.left_hand for c in clips] +
                                                             [c.right_hand for c in clips]))
                total = sum(lengths)
                feats = _split(np.concatenate([face, hands[:total], hands[total:]], axis=1), lengths)
            else:
                feats = self.sign2vec.encode_many([c.pose for c in clips], [f"{c.video}/{c.clip}" for c in clips])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[m] = time.perf_counter() - start
            for row, (clip, f) in enumerate(zip(clips, feats, strict=True)):
                out[row][m] = _as_float16(f, m, clip)
        return out, seconds


def _split(rows: np.ndarray, lengths: list[int]) -> list[np.ndarray]:
    return np.split(rows, np.cumsum(lengths)[:-1])


def _as_float16(feats: np.ndarray, modality: str, clip: ClipInputs) -> np.ndarray:
    """The stored dtype; a value float16 cannot hold is a fault to report, not an inf to write."""
    if not np.isfinite(feats).all() or np.abs(feats).max(initial=0) > FLOAT16_MAX:
        raise DataError(f"video {clip.video!r}, clip {clip.clip!r}: {modality} features are not finite in "
                        f"float16 (max |x| {np.nanmax(np.abs(feats)):.3g})")
    if len(feats) == 0:
        raise RunError(f"video {clip.video!r}, clip {clip.clip!r}: {modality} gave no frames")
    return feats.astype(np.float16)
