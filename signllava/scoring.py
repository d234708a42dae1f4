"""Scores of generated text: sacreBLEU corpus BLEU and chrF (with their signatures), the same per sentence,
and the yes/no tasks' accuracy / precision / recall / F1. One place, used by generate.py and by training's
evaluation, so a score logged while training and one printed by generate.py are the same computation."""
from __future__ import annotations

YES_NO_TASKS = ("one_word_present", "multi_word_present", "is_reversed")


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


def compute_metrics(hyps: list[str], refs: list[str], task: str = "translation") -> dict:
    """Corpus BLEU and chrF (sacreBLEU defaults, one reference) with their signatures, n, and the yes/no
    scores for those tasks."""
    from sacrebleu.metrics import BLEU, CHRF
    bleu, chrf = BLEU(), CHRF()
    b, c = bleu.corpus_score(hyps, [refs]), chrf.corpus_score(hyps, [refs])
    out = {"task": task, "n": len(hyps), "bleu": b.score, "chrf": c.score,
           "signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature())}
    if task in YES_NO_TASKS:
        out.update(yes_no_metrics(hyps, refs))
    return out


def sentence_scores(hyp: str, ref: str) -> dict:
    """sacreBLEU's sentence BLEU (exponential smoothing, its sentence default) and chrF of one clip."""
    from sacrebleu.metrics import BLEU, CHRF
    return {"sentence_bleu": BLEU(effective_order=True).sentence_score(hyp, [ref]).score,
            "sentence_chrf": CHRF().sentence_score(hyp, [ref]).score}


def format_table(m: dict) -> str:
    rows = [("BLEU", m["bleu"], m["signature"]), ("chrF", m["chrf"], m["chrf_signature"])]
    if "bleurt" in m:
        rows.append(("BLEURT", m["bleurt"], ""))
    for k in ("accuracy", "precision", "recall", "f1"):
        if k in m:
            rows.append((k, 100 * m[k], "%"))
    head = f"{m.get('split', '')} · task {m['task']} · {m['n']} clips"
    if m["task"] == "translation" and "context" in m:
        head += f" · context {m['context']}"
    return "\n".join([head] + [f"  {name:<10}{val:7.2f}  {note}".rstrip() for name, val, note in rows])
