"""The metric suite (signllava/scoring.py) against the libraries it stands on, and BLEURT (signllava/bleurt.py)
on a tiny random checkpoint written here in bleurt-pytorch's layout, against a forward pass written out.

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q tests/test_metrics.py
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from signllava.errors import CheckpointError
from signllava.scoring import breakdowns, compute_metrics, format_table, length_bucket

HYPS = ["the cat sat on the mat", "a dog runs in a park", "hello there", "", "my brother reads a long book today"]
REFS = ["the cat sat on a mat", "the dog runs in the park", "hello there friend", "nothing at all",
        "my brother reads a long book"]
PARAS = [["a cat was sitting on the mat", "<none>"], ["", "a dog is running in the park"], [], ["<none>"],
         ["my brother is reading a long book"]]


def test_suite_equals_its_libraries():
    import sacrebleu
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import BLEU, CHRF
    m = compute_metrics(HYPS, REFS, paraphrases=PARAS, n_bootstrap=200)
    for n in (1, 2, 3, 4):
        assert m[f"bleu{n}"] == pytest.approx(BLEU(max_ngram_order=n).corpus_score(HYPS, [REFS]).score)
    assert m["bleu1"] > m["bleu2"] > m["bleu3"] > m["bleu4"] > 0
    assert m["bleu"] == m["bleu4"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert m["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    assert m["rouge_l"] == pytest.approx(100 * sum(scorer.score(r, h)["rougeL"].fmeasure
                                                   for h, r in zip(HYPS, REFS)) / len(HYPS))
    # multi-reference: '<none>' and '' are no references; clips keep a variable number of them
    streams = [REFS, ["a cat was sitting on the mat", "a dog is running in the park", None, None,
                      "my brother is reading a long book"]]
    assert m["multiref_bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, streams).score)
    assert m["multiref_chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, streams).score)
    assert m["multiref_bleu"] > m["bleu"] and m["multiref_refs"] == pytest.approx(8 / 5)
    assert m["multiref_signature"].startswith("nrefs:var|") and m["signature"].startswith("nrefs:1|")
    # the interval is sacreBLEU's own bootstrap (same resamples, same seed)
    b = BLEU().corpus_score(HYPS, [REFS], n_bootstrap=200)
    c = CHRF().corpus_score(HYPS, [REFS], n_bootstrap=200)
    assert (m["ci95"]["bleu"]["mean"], m["ci95"]["bleu"]["pm"]) == pytest.approx((b._mean, b._ci))
    assert (m["ci95"]["chrf"]["mean"], m["ci95"]["chrf"]["pm"]) == pytest.approx((c._mean, c._ci))
    assert "bs:200|seed:12345" in m["ci95"]["bleu"]["signature"] and "bs:" not in m["signature"]
    assert m["rouge_l_signature"].startswith("rouge-score:0.1.2|rougeL")
    table = format_table(m)
    for name in ("BLEU-1", "BLEU-4", "chrF", "ROUGE-L", "BLEU multi-ref", "μ ", "200 resamples"):
        assert name in table


def test_breakdowns_per_video_and_length():
    import sacrebleu
    videos = ["v1", "v1", "v2", "v2", "v2"]
    bd = breakdowns(videos, HYPS, REFS)
    assert list(bd["per_video"]) == ["v1", "v2"] and bd["per_video"]["v1"]["n"] == 2
    assert bd["per_video"]["v2"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS[2:], [REFS[2:]]).score)
    assert [length_bucket(r) for r in REFS] == ["6-10", "6-10", "1-5", "1-5", "6-10"]
    assert length_bucket(" ".join(["w"] * 40)) == "31+" and length_bucket("one") == "1-5"
    assert list(bd["per_length"]) == ["1-5", "6-10"]
    assert bd["per_length"]["1-5"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS[2:4], [REFS[2:4]]).score)


# ------------------------------------------------------------------------------------------------ BLEURT
TINY = {"vocab_size": None, "embedding_size": 8, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
        "intermediate_size": 32, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
        "max_position_embeddings": 64, "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
        "pad_token_id": 0, "num_labels": 1, "model_type": "bleurt", "architectures": ["BleurtForSequenceClassification"]}


def port_tensor_shapes(cfg: dict) -> dict[str, tuple]:
    """Every tensor of bleurt-pytorch's BleurtForSequenceClassification, named as its modules name them
    (modeling_bleurt.py: embeddings with a saved position_ids buffer, encoder.embedding_projection, BERT layers,
    pooler, classifier) -- written out here, independently of signllava/bleurt.py's renaming."""
    e, h, i, v = cfg["embedding_size"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    t = {"bleurt.embeddings.word_embeddings.weight": (v, e),
         "bleurt.embeddings.position_embeddings.weight": (cfg["max_position_embeddings"], e),
         "bleurt.embeddings.token_type_embeddings.weight": (cfg["type_vocab_size"], e),
         "bleurt.embeddings.LayerNorm.weight": (e,), "bleurt.embeddings.LayerNorm.bias": (e,),
         "bleurt.encoder.embedding_projection.weight": (h, e), "bleurt.encoder.embedding_projection.bias": (h,),
         "bleurt.pooler.dense.weight": (h, h), "bleurt.pooler.dense.bias": (h,),
         "classifier.weight": (1, h), "classifier.bias": (1,)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"bleurt.encoder.layer.{n}."
        for lin, shape in (("attention.self.query", (h, h)), ("attention.self.key", (h, h)),
                           ("attention.self.value", (h, h)), ("attention.output.dense", (h, h)),
                           ("intermediate.dense", (i, h)), ("output.dense", (h, i))):
            t[p + lin + ".weight"], t[p + lin + ".bias"] = shape, shape[:1]
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + norm + ".weight"], t[p + norm + ".bias"] = (h,), (h,)
    return t


def make_tiny_bleurt(root: Path, texts: list[str], seed: int = 0) -> Path:
    """A random BLEURT-20-shaped checkpoint (RemBERT-style factorised embeddings) in bleurt-pytorch's files:
    config.json, model.safetensors, spm.model (a tiny sentencepiece vocabulary trained on `texts`)."""
    import sentencepiece
    from safetensors.torch import save_file
    root.mkdir(parents=True)
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=60,
                                             pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece="[PAD]",
                                             user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"],
                                             hard_vocab_limit=False, minloglevel=2)
    (root / "spm.model").write_bytes(buf.getvalue())
    cfg = dict(TINY, vocab_size=sentencepiece.SentencePieceProcessor(model_file=str(root / "spm.model")).vocab_size())
    (root / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(seed)
    weights = {k: torch.randn(s, generator=g) * (0.5 if len(s) > 1 else 0.1) for k, s in port_tensor_shapes(cfg).items()}
    weights["bleurt.embeddings.position_ids"] = torch.arange(cfg["max_position_embeddings"])[None]
    save_file(weights, str(root / "model.safetensors"))
    return root


def written_out_bleurt(w: dict, cfg: dict, ids: list[int], seg: list[int]) -> float:
    """BLEURT's forward for one unpadded pair, from the port's tensors: BERT's post-norm layers on projected
    factorised embeddings, tanh pooler on the first position, one linear unit."""
    def lin(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def norm(x, name):
        return F.layer_norm(x, x.shape[-1:], w[name + ".weight"], w[name + ".bias"], cfg["layer_norm_eps"])

    n, heads = len(ids), cfg["num_attention_heads"]
    x = (w["bleurt.embeddings.word_embeddings.weight"][ids] + w["bleurt.embeddings.position_embeddings.weight"][:n]
         + w["bleurt.embeddings.token_type_embeddings.weight"][seg])
    x = lin(norm(x, "bleurt.embeddings.LayerNorm"), "bleurt.encoder.embedding_projection")
    for layer in range(cfg["num_hidden_layers"]):
        p = f"bleurt.encoder.layer.{layer}."
        q, k, v = (lin(x, p + f"attention.self.{m}").view(n, heads, -1).transpose(0, 1) for m in ("query", "key", "value"))
        att = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1) @ v
        x = norm(x + lin(att.transpose(0, 1).reshape(n, -1), p + "attention.output.dense"), p + "attention.output.LayerNorm")
        x = norm(x + lin(F.gelu(lin(x, p + "intermediate.dense")), p + "output.dense"), p + "output.LayerNorm")
    return float(lin(torch.tanh(lin(x[0], "bleurt.pooler.dense")), "classifier")[0])


@pytest.fixture(scope="module")
def tiny_bleurt(tmp_path_factory):
    return make_tiny_bleurt(tmp_path_factory.mktemp("bleurt") / "BLEURT-tiny", REFS + HYPS + [p for ps in PARAS for p in ps])


def test_bleurt_equals_the_written_out_forward(tiny_bleurt):
    from safetensors.torch import load_file

    from signllava.bleurt import BleurtScorer
    torch.manual_seed(0)
    scorer = BleurtScorer.load(str(tiny_bleurt))
    w, cfg = load_file(str(tiny_bleurt / "model.safetensors")), json.loads((tiny_bleurt / "config.json").read_text())
    ids, seg = scorer.encode(HYPS[0], REFS[0])
    piece = scorer.spm.id_to_piece
    # [CLS] reference [SEP] candidate [SEP], segments 0 then 1
    assert piece(ids[0]) == "[CLS]" and [piece(i) for i in ids].count("[SEP]") == 2 and piece(ids[-1]) == "[SEP]"
    assert ids[1:len(scorer.spm.encode(REFS[0])) + 1] == scorer.spm.encode(REFS[0])
    assert seg == [0] * (len(scorer.spm.encode(REFS[0])) + 2) + [1] * (len(scorer.spm.encode(HYPS[0])) + 1)
    batched = scorer.score(HYPS, REFS, batch_size=3)          # padded batches, eval mode (no dropout)
    expected = [written_out_bleurt(w, cfg, *scorer.encode(h, r)) for h, r in zip(HYPS, REFS)]
    assert batched == pytest.approx(expected, abs=1e-5)
    assert len(set(round(b, 6) for b in batched)) == len(batched)          # the score depends on the pair
    # too long for the 64 positions: the longer side is cut first, and it still scores
    long_ids, long_seg = scorer.encode("the cat " * 60, "a dog")
    assert len(long_ids) == cfg["max_position_embeddings"] and long_seg.count(0) == len(scorer.spm.encode("a dog")) + 2
    assert scorer.score(["the cat " * 60], ["a dog"])[0] == pytest.approx(written_out_bleurt(w, cfg, long_ids, long_seg), abs=1e-5)
    assert "RemBertForSequenceClassification" in scorer.signature and str(tiny_bleurt) in scorer.signature


def test_bleurt_refuses_what_is_not_a_bleurt_checkpoint(tiny_bleurt, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from signllava.bleurt import BleurtScorer
    with pytest.raises(CheckpointError, match="not a checkpoint directory nor a hub id"):
        BleurtScorer.load(str(tmp_path / "missing"))
    with pytest.raises(CheckpointError, match="cannot fetch"):       # HF_HUB_OFFLINE and not cached
        BleurtScorer.load("nobody-here/BLEURT-none")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_bleurt, broken)
    w = load_file(str(broken / "model.safetensors"))
    del w["bleurt.pooler.dense.weight"]
    save_file(w, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing rembert.pooler.dense.weight"):
        BleurtScorer.load(str(broken))
    cfg = json.loads((tiny_bleurt / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        BleurtScorer.load(str(broken))


def test_a_missing_metrics_package_is_found_before_generation(monkeypatch):
    """generate.py checks the metrics' packages before its beam search (on the H200 a demo once translated the whole
    dev split, then stopped at ROUGE-L's missing package)."""
    import importlib.util

    from signllava import scoring
    from signllava.errors import RunError
    scoring.check_metric_packages()                       # installed here: nothing to say
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "rouge_score" else real(name, *a))
    with pytest.raises(RunError, match=r"^rouge_score not installed, .*pip install -r requirements.txt"):
        scoring.check_metric_packages()
