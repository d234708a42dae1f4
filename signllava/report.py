"""generate.py --report OUT.html: one self-contained page to read a split's translations.

The corpus scores (BLEU-1..4, chrF, ROUGE-L, multi-reference BLEU / chrF, BLEURT when scored) with their 95 %
intervals and signatures, how the output was made (checkpoint, context, beams), BLEU / chrF by reference length
and by video; then every clip -- video, clip, sentence BLEU and chrF, reference, hypothesis and the context sentences it
was given -- worst first. Two filters (a video, a text matched in reference / hypothesis / context / clip
name) hide the other rows; the filter lives in the address too (`report.html#video=V&q=TEXT`), so a filtered
view can be bookmarked or shared. Every row is written into the HTML itself (the page is readable with
scripts off); the script only hides rows. No server, nothing fetched from the network.
"""
from __future__ import annotations

import html

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em} .meta{color:#555;margin:.2em 0}
table.scores td,table.scores th{padding:.1em .8em .1em 0;text-align:left}
.sig{color:#777;font-family:monospace;font-size:12px} details.breakdown{margin:.4em 0} summary{cursor:pointer}
.filters{margin:1em 0;position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ddd}
.filters input{width:22em} #count{margin-left:1em;color:#555}
table.clips{border-collapse:collapse;width:100%} table.clips th{text-align:left;border-bottom:2px solid #999}
table.clips td{border-bottom:1px solid #e4e4e4;padding:.3em .5em;vertical-align:top}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap} td.ctx{color:#666;font-size:12px}
tr.bad td.num{color:#b00} tr.good td.num{color:#070}
"""

SCRIPT = """
const rows = Array.from(document.querySelectorAll('table.clips tbody tr'));
const video = document.getElementById('video'), text = document.getElementById('text');
function apply(fromHash) {
  if (fromHash) {
    const h = new URLSearchParams(location.hash.slice(1));
    video.value = h.get('video') || ''; text.value = h.get('q') || '';
  }
  const v = video.value, q = text.value.trim().toLowerCase();
  let shown = 0;
  for (const r of rows) {
    const ok = (!v || r.dataset.video === v) && (!q || r.dataset.text.includes(q));
    r.hidden = !ok; shown += ok;
  }
  document.getElementById('count').textContent = `showing ${shown} of ${rows.length} clips`;
  if (!fromHash) {
    const h = new URLSearchParams(); if (v) h.set('video', v); if (q) h.set('q', text.value.trim());
    history.replaceState(null, '', h.toString() ? '#' + h.toString() : location.pathname);
  }
}
video.addEventListener('change', () => apply(false)); text.addEventListener('input', () => apply(false));
window.addEventListener('hashchange', () => apply(true));
apply(true);
"""


def clip_rows(output: dict) -> list[dict]:
    """Every clip of an output JSON, worst first (sentence BLEU, then chrF; yes/no tasks: wrong answers first)."""
    rows = []
    for video, vd in output.items():
        for clip in vd["clip_order"]:
            e = vd[clip]
            ref = e.get("reference", e["translation"])
            bleu, chrf = e.get("sentence_bleu"), e.get("sentence_chrf")
            if bleu is None:         # yes/no tasks: right or wrong
                bleu = chrf = 100.0 if e["hypothesis"].strip().lower() == ref.strip().lower() else 0.0
            rows.append({"video": video, "clip": clip, "reference": ref, "hypothesis": e["hypothesis"],
                         "context": e.get("context") or ([e["prompt"]] if "prompt" in e else []),
                         "bleu": bleu, "chrf": chrf})
    return sorted(rows, key=lambda r: (r["bleu"], r["chrf"]))


def _row(n: int, r: dict) -> str:
    e = html.escape
    search = " ".join([r["clip"], r["reference"], r["hypothesis"], *r["context"]]).lower()
    cls = "bad" if r["bleu"] < 20 else "good" if r["bleu"] >= 60 else ""
    ctx = "<br>".join(e(c) for c in r["context"])
    return (f'<tr class="{cls}" data-video="{e(r["video"])}" data-text="{e(search)}"><td class="num">{n}</td>'
            f'<td>{e(r["video"])}</td><td>{e(r["clip"])}</td><td class="num">{r["bleu"]:.1f}</td>'
            f'<td class="num">{r["chrf"]:.1f}</td><td>{e(r["reference"])}</td><td>{e(r["hypothesis"])}</td>'
            f'<td class="ctx">{ctx}</td></tr>')


def _scores_table(metrics: dict) -> str:
    """Every corpus score with its 95 % interval (when computed) and its signature: scoring.score_rows."""
    from signllava.scoring import score_rows
    e = html.escape
    if "bleu" not in metrics:
        return ""
    rows = "".join(f'<tr><td>{e(name)}</td><td class="num"><b>{val:.2f}</b></td><td class="num">{e(ci)}</td>'
                   f'<td class="sig">{e(str(sig))}</td></tr>' for name, val, ci, sig in score_rows(metrics))
    ci = metrics.get("ci95")
    note = (f'<p class="meta">95 % intervals: sacreBLEU\'s bootstrap over the clips, {ci["n_bootstrap"]} resamples, '
            f'seed {e(str(ci["seed"]))} (μ = bootstrap mean ± half-width)</p>' if ci else "")
    return f'<table class="scores">{rows}</table>{note}'


def _breakdowns(metrics: dict) -> str:
    """BLEU / chrF per reference length, and per video (folded), as generate.py's metrics hold them."""
    e = html.escape

    def table(title: str, groups: dict, open_: bool) -> str:
        body = "".join(f'<tr><td>{e(k)}</td><td class="num">{g["n"]}</td><td class="num">{g["bleu"]:.2f}</td>'
                       f'<td class="num">{g["chrf"]:.2f}</td></tr>' for k, g in groups.items())
        return (f'<details class="breakdown"{" open" if open_ else ""}><summary>{e(title)}</summary>'
                f'<table class="scores"><tr><th></th><th>clips</th><th>BLEU</th><th>chrF</th></tr>{body}</table>'
                f'</details>')
    parts = []
    if metrics.get("per_length"):
        parts.append(table("by reference length (words)", metrics["per_length"], True))
    if metrics.get("per_video"):
        parts.append(table(f"by video ({len(metrics['per_video'])})", metrics["per_video"], False))
    return "".join(parts)


def _header(metrics: dict) -> str:
    e = html.escape
    context = metrics.get("context", "unknown")
    if context not in ("none", "unknown"):
        context += f" (window {metrics.get('context_window')}, prelude {metrics.get('prelude_window')})"
    made = [f"split <b>{e(str(metrics.get('split', '?')))}</b>", f"task {e(str(metrics.get('task', '?')))}",
            f"{metrics.get('n', '?')} clips", f"context <b id=\"context\">{e(context)}</b>"]
    made += [f"{k.replace('_', ' ')} {e(str(metrics[k]))}" for k in ("num_beams", "max_new_tokens") if k in metrics]
    ckpt = f'<p class="meta">checkpoint {e(str(metrics["checkpoint"]))}</p>' if "checkpoint" in metrics else ""
    return f'{_scores_table(metrics)}<p class="meta">{" · ".join(made)}</p>{ckpt}{_breakdowns(metrics)}'


def render(output: dict, metrics: dict) -> str:
    e = html.escape
    rows = clip_rows(output)
    videos = "".join(f'<option value="{e(v)}">{e(v)} ({len(vd["clip_order"])})</option>' for v, vd in output.items())
    body = "\n".join(_row(n, r) for n, r in enumerate(rows, start=1))
    title = f"{metrics.get('split', '')} translations · BLEU {metrics.get('bleu', 0):.2f}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{e(title)}</title><style>{STYLE}</style></head>
<body><h1>{e(title)}</h1>
{_header(metrics)}
<div class="filters"><label>video <select id="video"><option value="">all videos</option>{videos}</select></label>
<label> text <input id="text" type="search" placeholder="words in reference, hypothesis, context, clip"></label>
<span id="count">showing {len(rows)} of {len(rows)} clips</span></div>
<table class="clips"><thead><tr><th>#</th><th>video</th><th>clip</th><th>BLEU</th><th>chrF</th><th>reference</th>
<th>hypothesis</th><th>context</th></tr></thead>
<tbody>
{body}
</tbody></table>
<script>{SCRIPT}</script></body></html>
"""
