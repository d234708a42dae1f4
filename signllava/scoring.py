"""Scores of generated text, in one place for generate.py, training's evaluation and compare.py, so a score
logged while training, one printed by generate.py and one compared between runs are the same computation.

Translation (every score 0-100, each with what reproduces it -- sacreBLEU's signature or the package version):
  - BLEU-1..4: sacreBLEU corpus BLEU with maximum n-gram order 1..4 and its default tokenisation (13a), so
    BLEU-4 is the `bleu` logged since the start;
  - chrF (sacreBLEU's default chrF2);
  - ROUGE-L: the mean over clips of the `rouge-score` package's rougeL F-measure (no stemming);
  - multi-reference BLEU and chrF: the translation plus its paraphrases (`<none>` and empty ones dropped, as
    the data loader drops them), beside the single-reference scores;
  - a 95 % interval on corpus BLEU and chrF by bootstrap resampling of the clips, sacreBLEU's own
    (`corpus_score(n_bootstrap=N)`, seed SACREBLEU_SEED, default 12345): its mean and half-width;
  - breakdowns per video and per reference length (words), each a corpus BLEU / chrF of its clips.
Sentence BLEU / chrF per clip, and the yes/no tasks' accuracy / precision / recall / F1.
"""
from __future__ import annotations

import importlib.util
from importlib.metadata import version

from signllava.layout import clean_paraphrases

YES_NO_TASKS = ("one_word_present", "multi_word_present", "is_reversed")
BLEU_ORDERS = (1, 2, 3, 4)
N_BOOTSTRAP = 1000                 # sacreBLEU's own default number of resamples for its paired bootstrap
# Reference length in words: (first, last) of each bucket; None = open-ended. How2Sign runs past 60 words.
LENGTH_BUCKETS = ((1, 5), (6, 10), (11, 15), (16, 20), (21, 30), (31, None))


def _answers(text: str) -> list[str]:
    return [a.strip().strip(".").lower() for a in text.split(",")]


def yes_no_metrics(hyps: list[str], refs: list[str]) -> dict:
    """Over the comma-separated answers, aligned by position; positive class 'yes'. A missing or
    non-yes prediction counts as 'not yes'."""
    tp = fp = fn = correct = total = 0
    for h, r in zip(hyps, refs):
        hs, rs = _answers(h), _answers(r)
        for j, ra in enumerate(rs):
            ha = hs[j] if j < len(hs) else ""
            total += 1
            correct += ha == ra
            tp += ha == "yes" and ra == "yes"
            fp += ha == "yes" and ra != "yes"
            fn += ha != "yes" and ra == "yes"
    prec = tp / (tp + fp) if tp + fp else 0.0
    rec = tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": correct / total if total else 0.0, "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0, "answers": total}


def _float_scores_first(estimate_ci):
    """sacreBLEU 2.6's bootstrap takes statistics.mean over resampled scores, which mix Python floats (a sample
    with no match scores 0.0) and numpy float32s and then raise TypeError ("don't know how to coerce"): seen on
    small dev sets. The scores are made Python floats first; sacreBLEU's own resampling and interval stay."""
    def estimate(self, scores):
        for score in scores:
            score.score = float(score.score)
        return estimate_ci(self, scores)
    return estimate


def _patch_sacrebleu_ci():
    from sacrebleu.metrics.base import Score
    if not getattr(Score.estimate_ci, "_floats_first", False):
        Score.estimate_ci = _float_scores_first(Score.estimate_ci)
        Score.estimate_ci._floats_first = True


def bleu_chrf(hyps: list[str], streams: list[list], n_bootstrap: int = 0) -> tuple:
    """(BLEU-4 score, chrF score, BLEU metric, chrF metric) of sacreBLEU over reference streams; with
    n_bootstrap > 1 each score carries sacreBLEU's bootstrap mean and 95 % half-width (`_mean`, `_ci`)."""
    from sacrebleu.metrics import BLEU, CHRF
    _patch_sacrebleu_ci()
    bleu, chrf = BLEU(), CHRF()
    return (bleu.corpus_score(hyps, streams, n_bootstrap=max(1, n_bootstrap)),
            chrf.corpus_score(hyps, streams, n_bootstrap=max(1, n_bootstrap)), bleu, chrf)


def reference_streams(refs: list[str], paraphrases: list[list[str]]) -> list[list]:
    """sacreBLEU's layout for a variable number of references: stream k holds each clip's k-th reference
    (the translation first, then its paraphrases), None where a clip has fewer."""
    per_clip = [[r, *clean_paraphrases(p)] for r, p in zip(refs, paraphrases)]
    width = max(map(len, per_clip), default=1)
    return [[c[k] if k < len(c) else None for c in per_clip] for k in range(width)]


METRIC_PACKAGES = ("sacrebleu", "rouge_score")


def check_metric_packages() -> None:
    """Found before a generation, not after its beam search: a missing metrics package is one line at start."""
    from signllava.errors import RunError
    missing = [m for m in METRIC_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise RunError(f"{' and '.join(missing)} not installed, and the metrics need them: "
                       "pip install -r requirements.txt")


def rouge_l(hyps: list[str], refs: list[str]) -> tuple[float, list[float]]:
    """(mean, per clip) rougeL F-measure x 100 of the rouge-score package, no stemming."""
    from rouge_score import rouge_scorer
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    per = [100 * scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)]
    return (sum(per) / len(per) if per else 0.0), per


def translation_suite(hyps: list[str], refs: list[str], paraphrases: list[list[str]] | None = None,
                      n_bootstrap: int = 0) -> dict:
    """The field's metric suite over one output, each score with its signature (see the module doc)."""
    from sacrebleu.metrics import BLEU
    b, c, bleu, chrf = bleu_chrf(hyps, [refs])
    out = {"bleu": b.score, "chrf": c.score, "signature": str(bleu.get_signature()),
           "chrf_signature": str(chrf.get_signature())}
    if n_bootstrap > 1:     # a run of its own: its signatures name the resamples and the seed (bs:N|rs:S)
        bb, bc, bbleu, bchrf = bleu_chrf(hyps, [refs], n_bootstrap)
        out["ci95"] = {"n_bootstrap": n_bootstrap, "seed": bbleu.seed,
                       "bleu": {"mean": float(bb._mean), "pm": float(bb._ci), "signature": str(bbleu.get_signature())},
                       "chrf": {"mean": float(bc._mean), "pm": float(bc._ci), "signature": str(bchrf.get_signature())}}
    for n in BLEU_ORDERS:
        out[f"bleu{n}"] = b.score if n == 4 else BLEU(max_ngram_order=n).corpus_score(hyps, [refs]).score
    out["bleu_n_signature"] = out["signature"] + "|ngram:n"      # BLEU-n: n-grams up to n, uniform weights
    out["rouge_l"], _ = rouge_l(hyps, refs)
    out["rouge_l_signature"] = f"rouge-score:{version('rouge-score')}|rougeL|F1|stem:no|mean over clips"
    if paraphrases is not None:
        streams = reference_streams(refs, paraphrases)
        mb, mc, mbleu, mchrf = bleu_chrf(hyps, streams)
        out.update({"multiref_bleu": mb.score, "multiref_chrf": mc.score,
                    "multiref_signature": str(mbleu.get_signature()),
                    "multiref_chrf_signature": str(mchrf.get_signature()),
                    "multiref_refs": sum(r is not None for s in streams for r in s) / max(len(hyps), 1)})
    return out


def compute_metrics(hyps: list[str], refs: list[str], task: str = "translation",
                    paraphrases: list[list[str]] | None = None, n_bootstrap: int = 0) -> dict:
    """Corpus scores with their signatures and n: for translation the suite above (multi-reference with
    `paraphrases`, one list per clip; a 95 % interval with n_bootstrap > 1), for the yes/no tasks BLEU and
    chrF plus their accuracy / precision / recall / F1."""
    out = {"task": task, "n": len(hyps)}
    if task in YES_NO_TASKS:
        b, c, bleu, chrf = bleu_chrf(hyps, [refs])
        out.update({"bleu": b.score, "chrf": c.score, "signature": str(bleu.get_signature()),
                    "chrf_signature": str(chrf.get_signature())}, **yes_no_metrics(hyps, refs))
        return out
    out.update(translation_suite(hyps, refs, paraphrases, n_bootstrap))
    return out


def length_bucket(ref: str) -> str:
    words = len(ref.split())
    for first, last in LENGTH_BUCKETS:
        if last is None or words <= last:
            return f"{first}-{last}" if last is not None else f"{first}+"
    raise AssertionError("unreachable: the last bucket is open-ended")


def breakdowns(videos: list[str], hyps: list[str], refs: list[str]) -> dict:
    """Corpus BLEU / chrF of each video's clips and of each reference-length bucket's clips."""
    def groups(keys):
        by: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            by.setdefault(k, []).append(i)
        return by

    def score(idx):
        b, c, _, _ = bleu_chrf([hyps[i] for i in idx], [[refs[i] for i in idx]])
        return {"n": len(idx), "bleu": b.score, "chrf": c.score}

    lengths = groups([length_bucket(r) for r in refs])
    order = [f"{a}-{b}" if b is not None else f"{a}+" for a, b in LENGTH_BUCKETS]
    return {"per_video": {v: score(idx) for v, idx in groups(videos).items()},
            "per_length": {k: score(lengths[k]) for k in order if k in lengths}}


def sentence_scores(hyp: str, ref: str) -> dict:
    """sacreBLEU's sentence BLEU (exponential smoothing, its sentence default) and chrF of one clip."""
    from sacrebleu.metrics import BLEU, CHRF
    return {"sentence_bleu": BLEU(effective_order=True).sentence_score(hyp, [ref]).score,
            "sentence_chrf": CHRF().sentence_score(hyp, [ref]).score}


def bleu_n_signature(m: dict, n: int) -> str:
    """BLEU-n's own signature: BLEU-1..3 share one recorded signature with the order left as `ngram:n`."""
    return m["bleu_n_signature"].replace("ngram:n", f"ngram:{n}")


def score_rows(m: dict) -> list[tuple[str, float, str, str]]:
    """(name, score, 95 % interval text or '', signature) of every corpus score present in a metrics dict,
    in the order tables show them: what format_table prints and the HTML report's header lists."""
    ci = m.get("ci95", {})

    def interval(key):
        return f"μ {ci[key]['mean']:.2f} ± {ci[key]['pm']:.2f}" if key in ci else ""

    rows = [(f"BLEU-{n}", m[f"bleu{n}"], "", bleu_n_signature(m, n)) for n in (1, 2, 3) if f"bleu{n}" in m]
    rows += [("BLEU-4" if "bleu1" in m else "BLEU", m["bleu"], interval("bleu"), m["signature"]),
             ("chrF", m["chrf"], interval("chrf"), m["chrf_signature"])]
    if "rouge_l" in m:
        rows.append(("ROUGE-L", m["rouge_l"], "", m["rouge_l_signature"]))
    if "multiref_bleu" in m:
        refs = f"{m['multiref_refs']:.2f} refs/clip · "
        rows += [("BLEU multi-ref", m["multiref_bleu"], "", refs + m["multiref_signature"]),
                 ("chrF multi-ref", m["multiref_chrf"], "", refs + m["multiref_chrf_signature"])]
    if "bleurt" in m:
        rows.append(("BLEURT", m["bleurt"], "", m.get("bleurt_signature", "")))
    rows += [(k, 100 * m[k], "", "%") for k in ("accuracy", "precision", "recall", "f1") if k in m]
    return rows


def format_table(m: dict) -> str:
    head = f"{m.get('split', '')} · task {m['task']} · {m['n']} clips"
    if m["task"] == "translation" and "context" in m:
        head += f" · context {m['context']}"
    lines = [f"  {name:<15}{val:7.2f}  {ci:<16}{sig}".rstrip() for name, val, ci, sig in score_rows(m)]
    if m.get("ci95"):
        lines.append(f"  (95 % intervals: sacreBLEU's bootstrap, {m['ci95']['n_bootstrap']} resamples, "
                     f"seed {m['ci95']['seed']})")
    return "\n".join([head] + lines)
