"""The model card (signllava/model_card.py) of a stage-2 run laid out here: front matter that huggingface_hub
parses back, and every section with what it names. tests/test_finetune.py checks export.py's real folder.

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q tests/test_model_card.py
"""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from model import SignConfig
from signllava.model_card import write_model_card
from signllava.scoring import compute_metrics, format_table

HYPS = ["the cat sat on the mat", "a dog runs in a park", "hello there"]
REFS = ["the cat sat on a mat", "the dog runs in the park", "hello there friend"]


def fake_run(root: Path) -> tuple[Path, SignConfig, Path]:
    data = root / "h2s"
    data.mkdir(parents=True)
    (data / "extraction.json").write_text(json.dumps({"pose": {"extractor": "mediapipe holistic", "fps": 24}}))
    s1, s2 = root / "s1", root / "s2"
    for d, args in ((s1, {"data_dir": str(data), "learning_rate": 2e-3, "projector_type": "mlp2x_gelu"}),
                    (s2, {"data_dir": str(data), "projector": str(s1 / "checkpoint-300"), "lora_r": 64, "seed": 7})):
        (d / "checkpoint-300").mkdir(parents=True)
        (d / "args.yaml").write_text(yaml.safe_dump(args))
    dev = {"step": 250, **compute_metrics(HYPS, REFS, paraphrases=[[], [], []], n_bootstrap=100)}
    (s2 / "train_summary.json").write_text(json.dumps({"steps": 300, "best_dev_scores": dev}))
    test = {**compute_metrics(HYPS[::-1], REFS[::-1], n_bootstrap=100), "split": "test", "num_beams": 5,
            "context": "none"}
    (root / "test.metrics.json").write_text(json.dumps(test))
    cfg = SignConfig(base_model="meta-llama/Meta-Llama-3-8B-Instruct", tokenizer="meta-llama/Meta-Llama-3-8B-Instruct",
                     modalities=["mae", "pose"], dims={"mae": 768, "pose": 208},
                     projector_types={"mae": "mlp2x_gelu", "pose": "linear"}, stage=2, bits=4,
                     lora={"r": 64, "lora_alpha": 16, "target_modules": "all-linear"})
    return s2, cfg, root / "test.metrics.json"


def test_card_front_matter_and_sections(tmp_path):
    from huggingface_hub import ModelCard
    run, cfg, test_metrics = fake_run(tmp_path)
    path = write_model_card(run, cfg, cfg.base_model, run, [test_metrics], adapter=True)
    text = path.read_text()
    assert text.startswith("---\n")
    card = ModelCard.load(path)                                    # huggingface_hub's own parser
    data = card.data.to_dict()
    assert data["base_model"] == "meta-llama/Meta-Llama-3-8B-Instruct" and data["license"] == "other"
    assert {"sign-language-translation", "modality-mae", "modality-pose"} <= set(data["tags"])
    assert data["library_name"] == "peft" and {"bleu", "chrf", "rouge"} <= set(data["metrics"])
    results = {(r.dataset_split, r.metric_name): r for r in card.data.eval_results}
    dev = json.loads((run / "train_summary.json").read_text())["best_dev_scores"]
    test = json.loads(test_metrics.read_text())
    assert results[("dev", "BLEU-4")].metric_value == round(dev["bleu"], 2)
    assert results[("test", "ROUGE-L")].metric_value == round(test["rouge_l"], 2)
    assert results[("test", "chrF")].metric_config == test["chrf_signature"]
    assert "ngram:1" in results[("test", "BLEU-1")].metric_config                 # BLEU-n's own order, not "n"
    body = card.text
    for section in ("## Model", "## Features", "## Training recipe", "## Scores", "## How to load", "## Limitations"):
        assert section in body, section
    assert "`mae` (768-dim, mlp2x_gelu projector)" in body and "4-bit nf4" in body and "r 64" in body
    assert "mediapipe holistic" in body                                       # the extraction settings
    assert "learning_rate: 0.002" in body and "lora_r: 64" in body            # both stages' arguments
    assert "training's evaluation at step 250 (best; 3 clips)" in body and "test.metrics.json" in body
    assert "generate.py, 3 clips, 5 beams, context none" in body
    assert f"μ {dev['ci95']['bleu']['mean']:.2f} ± {dev['ci95']['bleu']['pm']:.2f}" in body
    assert dev["signature"].replace("|", "\\|") in body and dev["rouge_l_signature"].replace("|", "\\|") in body
    assert "Translator.from_checkpoint" in body and "PeftModel.from_pretrained" in body
    assert format_table(dev)        # the same rows as the printed table


def test_local_base_model_stays_out_of_the_front_matter(tmp_path):
    from huggingface_hub import ModelCard
    run, cfg, _ = fake_run(tmp_path)
    local = tmp_path / "my-llm"
    local.mkdir()
    cfg.base_model = str(local)
    card = ModelCard.load(write_model_card(tmp_path, cfg, cfg.base_model, None, [], adapter=False))
    assert "base_model" not in card.data.to_dict() and f"`{local}`" in card.text
    assert "No scores were recorded" in card.text and "its args.yaml was not found" in card.text
