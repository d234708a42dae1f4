"""Helpers shared by the test files: a tiny dataset in the seed layout, a tiny LLM, script runners.

The tiny dataset is deliberately unlike the demo: other dims, three of the four modalities, several
shards, clip names whose plain text order is not their time order, and clips missing from one modality.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

REPO = Path(__file__).resolve().parent.parent
TINY_DIMS = {"mae": 12, "dino": 9, "pose": 6}
WORDS = ["red", "blue", "cat", "dog", "sees", "eats", "the", "a", "big", "small", "Anna", "runs"]


def write_json(path: Path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


def write_tiny_dataset(root: Path, dims: dict[str, int] = TINY_DIMS, videos_per_split=None, clips_per_video: int = 11,
                       missing: dict[str, int] | None = None, seed: int = 0, compression: str | None = None) -> Path:
    """Every clip's features encode its words (a prototype per word), so the data is learnable.
    `missing`: modality -> number of train clips left out of it. `compression`: h5py's, e.g. "gzip"."""
    rng = np.random.default_rng(seed)
    protos = {m: rng.normal(size=(len(WORDS), d)).astype(np.float32) for m, d in dims.items()}
    videos_per_split = videos_per_split or {"train": 4, "dev": 2, "test": 1}
    missing = missing if missing is not None else {"pose": 2}
    for split, n_videos in videos_per_split.items():
        ann, shards = {}, {}
        dropped = 0
        for v in range(n_videos):
            video = f"{split}vid{v}"
            clips = [f"{video}_{k}" for k in range(clips_per_video)]
            ann[video] = {"clip_order": sorted(clips)}          # plain text order: _10 before _2
            shards[video] = v % 3 if split == "train" else 0
            for clip in clips:
                words = [WORDS[i] for i in rng.integers(len(WORDS), size=int(rng.integers(2, 5)))]
                ann[video][clip] = {"translation": " ".join(words), "paraphrases": ["<none>"],
                                    "keywords": sorted(set(words))[:2]}
        write_json(root / f"annotation.{split}.json", ann)
        for m, d in dims.items():
            write_json(root / m / f"metadata_{m}.{split}.json", shards)
            handles = {}
            for video, shard in shards.items():
                path = root / m / f"{m}.{split}.{shard}.h5"
                h = handles.get(path) or handles.setdefault(path, h5py.File(path, "w"))
                g = h.create_group(video)
                for clip in ann[video]["clip_order"]:
                    if split == "train" and dropped < missing.get(m, 0) and clip.endswith("_3"):
                        dropped += 1
                        continue
                    words = ann[video][clip]["translation"].split()
                    frames = np.concatenate([protos[m][WORDS.index(w)][None].repeat(2, 0) for w in words])
                    frames = frames + 0.1 * rng.normal(size=frames.shape)
                    g.create_dataset(clip, data=frames.astype(np.float16), compression=compression)
            for h in handles.values():
                h.close()
    return root


def build_tiny_llm(path: Path, data_dir: Path, seed: int = 0) -> Path:
    """A 2-layer, hidden-64 Llama and its BPE tokenizer, trained on the dataset's sentences."""
    from signllava.layout import load_annotation
    from signllava.demo import build_default_llm
    texts = [c.translation for c in load_annotation(data_dir / "annotation.train.json").clips.values()]
    return build_default_llm(path, texts, seed=seed, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2)


def script_env(**extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), PYTHONWARNINGS="ignore")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_script(script: str, *args, launcher: bool = False, ranks: int = 1, env: dict | None = None,
               check: bool = True) -> subprocess.CompletedProcess:
    """Run one of the repo's scripts in a subprocess, as a user would (optionally via the deepspeed launcher)."""
    if launcher:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
               str(_free_port()), str(REPO / script), *map(str, args)]
    else:
        cmd = [sys.executable, str(REPO / script), *map(str, args)]
    res = subprocess.run(cmd, cwd=REPO, env=env or script_env(), capture_output=True, text=True, timeout=600)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n--- stdout\n{res.stdout[-4000:]}\n--- stderr\n{res.stderr[-6000:]}")
    return res


class Payload:
    """A pickled object that runs a shell command when an unsafe loader rebuilds it: `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(data: Path, model: Path, out: Path, steps: int, *extra, zero: int = 2, translate: bool = False) -> list:
    """A short training run's flags. Evaluation (at the last step) measures the dev loss only unless `translate`:
    the tests of translation at evaluation ask for it, the others would pay a beam search of the dev split."""
    return ["--data_dir", data, "--model", model, "--output_dir", out, "--max_steps", steps, "--batch_size", 4,
            "--deepspeed_config", REPO / f"ds_config_zero{zero}.json", "--num_workers", 0, "--logging_steps", 1,
            "--eval_steps", 1000, "--learning_rate", 3e-3, *(() if translate else ("--eval_generate", 0)), *extra]


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]


def chromium(tmp: Path, url: str, *flags: str) -> str:
    """Open `url` in headless Chromium (fresh profile) -> stdout (the DOM after scripts ran, with --dump-dom);
    the test is skipped where Chromium is not installed."""
    import shutil

    import pytest
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); the report's browser check is skipped")
    profile = tmp / f"profile{len(list(tmp.glob('profile*')))}"
    res = subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *flags, url], capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout
