"""A model card (README.md in the Hugging Face layout) for an export.py folder or a finished stage-2 run.

Front matter (huggingface_hub's ModelCardData): base_model (when it is a hub id), a license placeholder to set
before publishing, tags, library, metrics and a model-index of the scores. Then the sections: the model (base
LLM, modalities and their dims, projectors, LoRA), the features (the dataset's extraction.json when there is
one), the recipe (both stages' arguments, from their args.yaml), the scores with signatures and 95 % intervals
(training's dev evaluation from train_summary.json, and any generate.py metrics JSON given), how to load it
(Translator.from_checkpoint; PEFT for a stage-2 adapter), limitations.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import yaml

from signllava.errors import DataError
from signllava.scoring import bleu_n_signature, score_rows

TAGS = ["sign-language-translation", "sign-language", "video-to-text", "sign-llava", "llava"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# metrics key -> (model-index metric type, name) of the scores listed in the front matter
INDEX_METRICS = (("bleu", "bleu", "BLEU-4"), ("bleu1", "bleu", "BLEU-1"), ("chrf", "chrf", "chrF"),
                 ("rouge_l", "rouge", "ROUGE-L"), ("multiref_bleu", "bleu", "BLEU (multi-reference)"),
                 ("bleurt", "bleurt", "BLEURT"))


def read_yaml(path: Path) -> dict | None:
    return yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None


def stage1_args(stage2: dict | None) -> dict | None:
    """The stage-1 run's args.yaml, found from stage 2's --projector (an output dir, checkpoint dir or file)."""
    if not stage2 or not stage2.get("projector"):
        return None
    p = Path(stage2["projector"])
    for d in (p, p.parent, p.parent.parent):
        found = read_yaml(d / "args.yaml")
        if found:
            return found
    return None


def training_scores(run_dir: Path) -> list[tuple[str, str, dict]]:
    """(split, where from, metrics) of training's dev evaluation: the best one, else the last."""
    summary_file = run_dir / "train_summary.json"
    if not summary_file.is_file():
        return []
    summary = json.loads(summary_file.read_text())
    m = summary.get("best_dev_scores") or summary.get("dev_scores")
    if not m:
        return []
    which = "best" if summary.get("best_dev_scores") else "last"
    return [("dev", f"training's evaluation at step {m['step']} ({which}; {m['n']} clips)", m)]


def read_metrics_file(path: Path, checkpoint_dir: Path | None = None) -> dict:
    """A generate.py metrics JSON whose scores a card may list as this model's: a JSON object with a BLEU,
    made from `checkpoint_dir` when both it and the file name their checkpoint. Else a one-line DataError --
    checked before an export's merge, so that a wrong file costs seconds, not the merge."""
    try:
        m = json.loads(Path(path).read_text(encoding="utf-8"))
        if not isinstance(m, dict) or not isinstance(m.get("bleu"), (int, float)):
            raise ValueError("no corpus BLEU in it: give the --metrics_out file of generate.py, not its --output")
    except (OSError, ValueError) as e:
        raise DataError(f"--metrics {path}: not a metrics JSON of generate.py ({e})") from None
    made_by = m.get("checkpoint")
    if checkpoint_dir and isinstance(made_by, str) and os.path.realpath(made_by) != os.path.realpath(checkpoint_dir):
        raise DataError(f"--metrics {path}: scores {made_by}, not the checkpoint exported ({checkpoint_dir}); "
                        "a model card lists only the model's own scores")
    return m


def file_scores(paths: list[Path], checkpoint_dir: Path | None = None) -> list[tuple[str, str, dict]]:
    """(split, how they were made, metrics) of each metrics file: beams, context, clips and any --limit."""
    out = []
    for p in paths:
        m = read_metrics_file(p, checkpoint_dir)
        limit = f" (--limit {m['limit']})" if m.get("limit") else ""
        how = (f"generate.py, {m.get('n', '?')} clips{limit}, {m.get('num_beams', '?')} beams, "
               f"context {m.get('context', '?')}")
        out.append((str(m.get("split", "?")), f"{how} ({Path(p).name})", m))
    return out


def front_matter(cfg, base_model: str, scores: list, dataset: str, adapter: bool):
    from huggingface_hub import EvalResult, ModelCardData
    results = [EvalResult(task_type="translation", task_name="sign language translation", dataset_type=dataset,
                          dataset_name=dataset, dataset_split=split, metric_type=kind, metric_name=name,
                          metric_value=round(float(m[key]), 2), metric_config=signature(m, key))
               for split, _, m in scores for key, kind, name in INDEX_METRICS if key in m]
    present = {kind for _, _, m in scores for key, kind, _ in INDEX_METRICS if key in m}
    return ModelCardData(base_model=base_model if HUB_ID.match(base_model) and not Path(base_model).exists() else None,
                         license="other", license_name="set-before-publishing", library_name="peft" if adapter else None,
                         tags=TAGS + [f"modality-{m}" for m in cfg.modalities], language=["en"],
                         metrics=sorted(present) or None, model_name="Sign LLaVA" if results else None,
                         eval_results=results or None)


def signature(m: dict, key: str) -> str:
    """The signature recorded beside metrics key `key` (BLEU-1..3 each with its own n-gram order)."""
    if key in ("bleu1", "bleu2", "bleu3"):
        return bleu_n_signature(m, int(key[-1]))
    return m.get({"bleu": "signature", "chrf": "chrf_signature", "multiref_bleu": "multiref_signature"}.get(
        key, f"{key}_signature"), "")


def model_section(cfg, base_model: str) -> str:
    lines = ["## Model", "", f"- base LLM: `{base_model}` ({'4-bit nf4' if cfg.bits == 4 else '16-bit'} in training)",
             f"- stage {cfg.stage}; modalities (in the prompt's order): "
             + ", ".join(f"`{m}` ({cfg.dims[m]}-dim, {cfg.projector_types[m]} projector)" for m in cfg.modalities),
             f"- frames: cap {cfg.max_frames or 'none'} ({cfg.frame_cap}); context window {cfg.context_window}, "
             f"prelude {cfg.prelude_window}; learned modality / absent rows: {'yes' if cfg.modality_embeddings else 'no'}"]
    if cfg.lora:
        lines.append("- LoRA: " + ", ".join(f"{k} {v}" for k, v in cfg.lora.items()))
    return "\n".join(lines)


def yaml_block(title: str, data) -> str:
    return f"{title}\n\n```yaml\n{yaml.safe_dump(data, sort_keys=False, default_flow_style=False).rstrip()}\n```"


def features_section(data_dir: str | None) -> str:
    extraction = Path(data_dir) / "extraction.json" if data_dir else None
    if extraction and extraction.is_file():
        return yaml_block(f"## Features\n\nExtracted as `{extraction}` records:",
                          json.loads(extraction.read_text(encoding="utf-8")))
    return ("## Features\n\nPre-extracted per-frame features in the original Sign LLaVA layout (the modalities "
            f"above); no extraction.json was found{f' in `{data_dir}`' if data_dir else ''}, so how they were "
            "extracted is not recorded here.")


def recipe_section(s1: dict | None, s2: dict | None) -> str:
    parts = ["## Training recipe"]
    for name, args in (("Stage 1 (`pretrain.py`: projectors, LLM frozen)", s1), ("Stage 2 (`finetune.py`: QLoRA)", s2)):
        parts.append(yaml_block(f"{name}:", args) if args else f"{name}: its args.yaml was not found.")
    return "\n\n".join(parts)


def scores_section(scores: list) -> str:
    if not scores:
        return "## Scores\n\nNo scores were recorded (run `generate.py ... --metrics_out M.json` and pass `--metrics M.json`)."
    parts = ["## Scores"]
    for split, where, m in scores:
        # A '|' splits a Markdown table cell even inside backticks; GitHub and the Hub read '\|' as the character.
        rows = "\n".join(f"| {name} | {val:.2f} | {ci or '–'} | `{sig.replace('|', chr(92) + '|')}` |"
                         for name, val, ci, sig in score_rows(m))
        parts.append(f"**{split}**, {where}:\n\n| metric | score | 95 % interval | signature |\n|---|---|---|---|\n{rows}")
    parts.append("Intervals: sacreBLEU's bootstrap over the clips (mean ± half-width). Compare runs with "
                 "`python -m signllava.compare` (paired tests, seeds).")
    return "\n\n".join(parts)


def loading_section(adapter: bool) -> str:
    text = ("## How to load\n\n```python\nfrom generate import Translator       # this repository's generate.py\n"
            "tr = Translator.from_checkpoint(\"path/to/this/folder\")\n"
            "text = tr.translate({\"pose\": pose_frames, ...}, context=[\"The previous sentence.\"])\n```\n\n"
            "or `python generate.py --checkpoint path/to/this/folder --data_dir D --split test --output out.json`.")
    if adapter:
        text += ("\n\nThe LoRA adapter alone is in PEFT's format: `PeftModel.from_pretrained(base_llm, "
                 "\"checkpoint-N/adapter\")`; the projectors and marker rows are in `projectors.safetensors`.")
    else:
        text += "\n\nThe LLM is a plain Hugging Face model in `model/` (LoRA merged); projectors in `projectors.safetensors`."
    return text


LIMITATIONS = """## Limitations

- It translates what its training data covered: one sign language into English, signers and recording conditions
  like its training set's; expect much worse output elsewhere.
- The features must be extracted exactly as in training (same encoders, frame rate and crops).
- Corpus BLEU of sign language translation is low and noisy; read the intervals, and compare runs with paired
  tests over several seeds, not single numbers.
- Generation can loop on clips unlike the training data (`--no_repeat_ngram_size` cuts loops).
- The license field is a placeholder: set it from the base LLM's and the data's licenses before publishing."""


def write_model_card(directory: Path, cfg, base_model: str, run_dir: Path | None, metrics_files: list[Path],
                     adapter: bool, checkpoint_dir: Path | None = None) -> Path:
    """README.md in `directory`; the run directory gives the recipe and training's dev scores; metrics files
    must score `checkpoint_dir` when given (read_metrics_file)."""
    from huggingface_hub import ModelCard
    s2 = read_yaml(run_dir / "args.yaml") if run_dir else None
    s1 = stage1_args(s2)
    scores = (training_scores(run_dir) if run_dir else []) + file_scores(metrics_files, checkpoint_dir)
    data_dir = (s2 or s1 or {}).get("data_dir")
    dataset = Path(data_dir).name if data_dir else "unknown"
    body = "\n\n".join([f"# Sign LLaVA: {', '.join(cfg.modalities)} → English on {dataset}",
                        "A sign-language translation model: per-frame video features projected into a chat LLM, "
                        "trained with the Sign LLaVA trainer's two-stage recipe (projectors, then QLoRA).",
                        model_section(cfg, base_model), features_section(data_dir), recipe_section(s1, s2),
                        scores_section(scores), loading_section(adapter), LIMITATIONS])
    card = ModelCard(f"---\n{front_matter(cfg, base_model, scores, dataset, adapter).to_yaml()}\n---\n\n{body}\n")
    path = Path(directory) / "README.md"
    card.save(str(path))
    return path
