"""`python -m signllava.compare ... --report CMP.html`: one self-contained page comparing outputs.

The comparison table (scores with 95 % intervals, differences to the baseline, both p-values, sacreBLEU's
signatures), the seed groups, then the clips whose sentence BLEU differs most from the baseline's, largest
difference first, with every output's hypothesis and sentence BLEU side by side. No script, nothing fetched.
"""
from __future__ import annotations

import html
from pathlib import Path

from signllava.atomic import write_atomic
from signllava.report import STYLE

EXTRA_STYLE = """
td.better{background:#e7f6e7} td.worse{background:#fbe9e9} td.hyp{max-width:28em} span.bleu{font-weight:bold;margin-right:.3em}
table.cmp td,table.cmp th{padding:.2em .6em;border-bottom:1px solid #e4e4e4;text-align:left}
"""


def differing_clips(result: dict, systems: list, top: int) -> list[tuple[tuple[str, str], float]]:
    """(clip key, largest |sentence BLEU - the baseline's| over the other outputs) of the clips where some output's
    hypothesis differs from the baseline's, largest first."""
    base = systems[0]
    diffs = [(k, max((abs(s.sentence_bleu[k] - base.sentence_bleu[k]) for s in systems[1:]), default=0.0))
             for k in base.keys if any(s.hyps[k] != base.hyps[k] for s in systems[1:])]
    diffs.sort(key=lambda kd: -kd[1])
    return diffs[:top or None]


def _scores(result: dict) -> str:
    e = html.escape
    head = ("<tr><th>system</th><th>BLEU ± 95 %</th><th>Δ BLEU</th><th>p bootstrap</th><th>p approx. rand.</th>"
            "<th>chrF ± 95 %</th><th>Δ chrF</th><th>p bootstrap</th><th>p approx. rand.</th><th>BLEU-1</th>"
            "<th>ROUGE-L</th><th>BLEU multi-ref</th></tr>")
    body = []
    for i, r in enumerate(result["systems"]):
        m = r["metrics"]
        cells = [f'<td class="sys">{e(r["name"])}</td>']
        for k in ("bleu", "chrf"):
            ci = m.get("ci95", {}).get(k)
            cells.append(f'<td class="num">{m[k]:.2f}' + (f" ± {ci['pm']:.2f}" if ci else "") + "</td>")
            cells.append(f'<td class="num">{r[f"delta_{k}"]:+.2f}</td>' if i else "<td>–</td>")
            for test in ("bs", "ar"):
                pv = r.get(f"p_{k}_{test}")
                cells.append(f'<td class="num p">{pv:.4f}</td>' if pv is not None else "<td></td>")
        cells += [f'<td class="num">{m[k]:.2f}</td>' for k in ("bleu1", "rouge_l", "multiref_bleu")]
        body.append(f"<tr>{''.join(cells)}</tr>")
    sigs = [f'<p class="sig">{e(name)}: {e(sig)}</p>' for key, name in (("bleu", "BLEU"), ("chrf", "chrF"))
            for test in ("bs", "ar") if (sig := result["tests"].get(key, {}).get(f"signature_{test}"))]
    from signllava.compare import few_differences
    notes = "".join(f'<p class="meta note">{e(n)}</p>' for n in few_differences(result))
    return f'<table class="cmp" id="scores">{head}{"".join(body)}</table>{notes}{"".join(sigs)}'


def _seeds(result: dict) -> str:
    from signllava.compare import SEED_SCORES
    e = html.escape
    if not result["seeds"]:
        return ""
    head = "<tr><th>system</th><th>seeds</th>" + "".join(f"<th>{t}</th>" for _, t in SEED_SCORES) + "</tr>"
    rows = "".join(
        f'<tr><td>{e(name)}</td><td class="num">{g["n"]} seeds</td>'
        + "".join(f'<td class="num">{g[k]["mean"]:.2f} ± {g[k]["std"]:.2f}</td>' if k in g else "<td></td>"
                  for k, _ in SEED_SCORES) + "</tr>" for name, g in result["seeds"].items())
    return f'<h2>seeds: mean ± std</h2><table class="cmp" id="seeds">{head}{rows}</table>'


def render(result: dict, systems: list, top: int) -> str:
    e = html.escape
    base = systems[0]
    clips = differing_clips(result, systems, top)
    head = "<tr><th>#</th><th>video</th><th>clip</th><th>largest Δ</th><th>reference</th>" + "".join(
        f"<th>{e(s.name)}</th>" for s in systems) + "</tr>"
    rows = []
    for n, (k, d) in enumerate(clips, start=1):
        cells = []
        for i, s in enumerate(systems):
            b = s.sentence_bleu[k]
            cls = "" if i == 0 or b == base.sentence_bleu[k] else "better" if b > base.sentence_bleu[k] else "worse"
            cells.append(f'<td class="hyp {cls}"><span class="bleu">{b:.1f}</span> {e(s.hyps[k])}</td>')
        rows.append(f'<tr class="clip" data-clip="{e(k[1])}"><td class="num">{n}</td><td>{e(k[0])}</td><td>{e(k[1])}</td>'
                    f'<td class="num delta">{d:.1f}</td><td>{e(base.refs[k])}</td>{"".join(cells)}</tr>')
    title = f"{len(systems)} outputs on {result['clips']} clips · baseline {result['baseline']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{STYLE}{EXTRA_STYLE}</style></head>
<body><h1>{e(title)}</h1>
{_scores(result)}
{_seeds(result)}
<h2>the {len(clips)} clips whose sentence BLEU differs most from {e(base.name)}'s (of {sum(1 for _ in differing_clips(result, systems, 0))} whose hypotheses differ)</h2>
<p class="meta">each cell: sentence BLEU, then the hypothesis; green better than the baseline, red worse</p>
<table class="cmp" id="clips"><thead>{head}</thead><tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""


def write_compare_report(path: str | Path, result: dict, systems: list, top: int) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(p, render(result, systems, top))
    return p
