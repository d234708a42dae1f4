"""Compare outputs of generate.py on the same clips: scores with intervals, differences with p-values, seeds.

    python -m signllava.compare A.json B.json [C.json ...] [--report cmp.html] [--json cmp.json]
                                [--group NAME=X.json,Y.json,...] [--names a,b,c] [--top 100]

The first output is the baseline. For each output: the metric suite of signllava/scoring.py (BLEU-4 and chrF
with 95 % intervals, BLEU-1, ROUGE-L, multi-reference BLEU), and for every output after the first its
difference to the baseline in BLEU and chrF with two p-values, both from sacreBLEU's own significance code
(`sacrebleu.significance.PairedTest`): paired bootstrap resampling (1,000 resamples) and approximate
randomisation (10,000 trials); seed SACREBLEU_SEED (default 12345). p is the chance of a difference at least
this large between two systems that are really the same: below 0.05 is the usual bar.

Seeds: outputs of one system trained with different --seed are aggregated as mean ± std (sample standard
deviation) of their corpus scores. A group is named with --group NAME=FILES, or found by the naming rule: files
whose names differ only in a `seed<N>` part (`run.seed1.json`, `run.seed2.json`, `run-seed3.json`) form the
group `run`. Groups of one output are not aggregated.

The printed table is Markdown. --report writes one self-contained HTML page: the tables, then the clips whose
sentence BLEU differs most from the baseline's, every output's hypothesis side by side.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from signllava.atomic import outputs_problems, write_atomic
from signllava.errors import DataError, run_command
from signllava.output_json import check_output_json, reference_field
from signllava.scoring import N_BOOTSTRAP, compute_metrics, sentence_scores

AR_TRIALS = 10000                 # sacreBLEU's default number of approximate-randomisation trials
# sacreBLEU's approximate randomisation (after multeval) counts the trials whose difference is strictly larger
# than the observed one. Two outputs that differ in a few clips only have few distinct trials, most of them
# tying with the observed difference, so its p falls to the minimum 1/(trials+1) however small the difference
# (two outputs differing in one clip: every trial ties). Below this many differing clips a note says so.
FEW_DIFFERING_CLIPS = 10
SEED_PART = re.compile(r"[._-]?seed[._-]?\d+", re.IGNORECASE)
# (metrics key, column title) of the scores aggregated over seeds
SEED_SCORES = (("bleu", "BLEU"), ("chrf", "chrF"), ("bleu1", "BLEU-1"), ("rouge_l", "ROUGE-L"),
               ("multiref_bleu", "BLEU multi-ref"))


@dataclass
class System:
    name: str
    path: Path
    keys: list[tuple[str, str]]                  # (video, clip) in the output's order
    hyps: dict[tuple[str, str], str]
    refs: dict[tuple[str, str], str]
    paraphrases: dict[tuple[str, str], list[str]]
    metrics: dict = field(default_factory=dict)
    sentence_bleu: dict[tuple[str, str], float] = field(default_factory=dict)


def read_output(path: Path, name: str) -> System:
    """A generate.py output JSON (translation task) as a System; a malformed one is one line naming it."""
    try:
        raw = check_output_json(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not an output JSON of generate.py ({e})") from None
    keys = [(video, clip) for video, vd in raw.items() for clip in vd["clip_order"]]
    entries = {k: raw[k[0]][k[1]] for k in keys}
    return System(name, path, keys, hyps={k: e["hypothesis"] for k, e in entries.items()},
                  refs={k: e[reference_field(e)] for k, e in entries.items()},
                  paraphrases={k: e.get("paraphrases") or [] for k, e in entries.items()})


def check_same_clips(base: System, other: System):
    """Paired tests need the same clips with the same references: the first difference, named."""
    missing = [k for k in base.keys if k not in other.hyps]
    extra = [k for k in other.keys if k not in base.hyps]
    for what, ks, where in (("lacks", missing, other.path), ("has extra", extra, other.path)):
        if ks:
            v, c = ks[0]
            raise DataError(f"{where}: {what} video {v} clip {c} (and {len(ks) - 1} more) against {base.path}; "
                            "compare needs outputs of the same clips (same --split, --limit)")
    for k in base.keys:
        if other.refs[k] != base.refs[k]:
            raise DataError(f"{other.path}: video {k[0]} clip {k[1]}: reference {other.refs[k]!r} differs from "
                            f"{base.path}'s {base.refs[k]!r}")


def seed_groups(systems: list[System], explicit: dict[str, list[str]]) -> dict[str, list[System]]:
    """name -> its outputs: --group first, then the naming rule for the others; only groups of two or more.
    Paths are matched as files (`./a.json` and its absolute path are one output)."""
    by_path = {os.path.realpath(s.path): s for s in systems}
    groups: dict[str, list[System]] = {}
    taken = set()
    for name, paths in explicit.items():
        unknown = [p for p in paths if os.path.realpath(p) not in by_path]
        if unknown:
            raise DataError(f"--group {name}: {unknown[0]} is not one of the outputs compared")
        groups[name] = [by_path[os.path.realpath(p)] for p in paths]
        taken.update(os.path.realpath(p) for p in paths)
    for s in systems:
        if os.path.realpath(s.path) not in taken and SEED_PART.search(s.path.stem):
            groups.setdefault(seed_group_name(s.path), []).append(s)
    return {k: v for k, v in groups.items() if len(v) > 1}


def seed_group_name(path: Path) -> str:
    """The naming rule's group of an output: its file name without the seed part (`run.seed2.json` -> `run`);
    a name that is only the seed part (`seed2.json`) takes its folder's name, so `seed1.json`, `seed2.json` beside
    each other are one group."""
    return SEED_PART.sub("", path.stem) or path.resolve().parent.name or "seeds"


def paired_tests(systems: list[System], n_bootstrap: int, n_trials: int) -> dict:
    """{metric: {"bs": [p per system], "ar": [...], "signature_bs", "signature_ar"}} for BLEU and chrF, the
    baseline's p None; sacreBLEU's PairedTest, one run per test type."""
    from sacrebleu.metrics import BLEU, CHRF
    from sacrebleu.significance import PairedTest
    base = systems[0]
    named = [(s.name, [s.hyps[k] for k in base.keys]) for s in systems]
    refs = [[base.refs[k] for k in base.keys]]
    out: dict = {}
    for test, n in (("bs", n_bootstrap), ("ar", n_trials)):
        signatures, scores = PairedTest(named, {"BLEU": BLEU(), "chrF": CHRF()}, refs, test_type=test, n_samples=n)()
        for metric, results in scores.items():
            if metric == "System":
                continue
            key = "bleu" if metric.startswith("BLEU") else "chrf"
            out.setdefault(key, {})[test] = [r.p_value for r in results]
            out[key][f"signature_{test}"] = str(signatures[metric])
    return out


def aggregate(members: list[System]) -> dict:
    """mean and sample std over the members' corpus scores."""
    out = {"n": len(members), "outputs": [str(s.path) for s in members]}
    for key, _ in SEED_SCORES:
        vals = [s.metrics[key] for s in members if key in s.metrics]
        if len(vals) == len(members):
            out[key] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals)}
    return out


def compare(systems: list[System], explicit_groups: dict[str, list[str]], n_bootstrap: int = N_BOOTSTRAP,
            n_trials: int = AR_TRIALS) -> dict:
    base = systems[0]
    for s in systems[1:]:
        check_same_clips(base, s)
    for s in systems:
        hyps, refs = [s.hyps[k] for k in base.keys], [base.refs[k] for k in base.keys]
        s.metrics = compute_metrics(hyps, refs, paraphrases=[base.paraphrases[k] for k in base.keys],
                                    n_bootstrap=n_bootstrap)
        s.sentence_bleu = {k: sentence_scores(s.hyps[k], base.refs[k])["sentence_bleu"] for k in base.keys}
    tests = paired_tests(systems, n_bootstrap, n_trials) if len(systems) > 1 else {}
    rows = []
    for i, s in enumerate(systems):
        row = {"name": s.name, "output": str(s.path), "metrics": s.metrics}
        row["differing_clips"] = sum(s.hyps[k] != base.hyps[k] for k in base.keys)
        for key in ("bleu", "chrf"):
            row[f"delta_{key}"] = s.metrics[key] - base.metrics[key]
            if i:
                # sacreBLEU's tests give their minimum p, (0 + 1) / (n + 1), to an output identical to the
                # baseline: no trial can differ less than no difference. Identical outputs are not different: p 1.
                same = row["differing_clips"] == 0
                row[f"p_{key}_bs"], row[f"p_{key}_ar"] = (1.0, 1.0) if same else (tests[key]["bs"][i],
                                                                                  tests[key]["ar"][i])
        rows.append(row)
    return {"baseline": base.name, "clips": len(base.keys), "systems": rows, "tests": tests,
            "seeds": {name: aggregate(m) for name, m in seed_groups(systems, explicit_groups).items()}}


def _ci(m: dict, key: str) -> str:
    c = m.get("ci95", {}).get(key)
    return f"{m[key]:.2f} ± {c['pm']:.2f}" if c else f"{m[key]:.2f}"


def _p(v) -> str:
    return "" if v is None else f"{v:.4f}"


def markdown(result: dict) -> str:
    """The comparison (and the seeds) as Markdown tables."""
    head = ("| system | BLEU ± 95 % | Δ BLEU | p (bootstrap) | p (approx. rand.) | chrF ± 95 % | Δ chrF | "
            "p (bootstrap) | p (approx. rand.) | BLEU-1 | ROUGE-L | BLEU multi-ref |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for i, r in enumerate(result["systems"]):
        m = r["metrics"]
        delta = [f"{r[f'delta_{k}']:+.2f}" if i else "–" for k in ("bleu", "chrf")]
        lines.append(f"| {r['name']} | {_ci(m, 'bleu')} | {delta[0]} | {_p(r.get('p_bleu_bs'))} | "
                     f"{_p(r.get('p_bleu_ar'))} | {_ci(m, 'chrf')} | {delta[1]} | {_p(r.get('p_chrf_bs'))} | "
                     f"{_p(r.get('p_chrf_ar'))} | {m['bleu1']:.2f} | {m['rouge_l']:.2f} | {m['multiref_bleu']:.2f} |")
    text = [f"{result['clips']} clips; baseline {result['baseline']}; p-values: sacreBLEU's paired tests", *lines]
    text += [f"note: {n}" for n in few_differences(result)]
    if result["seeds"]:
        cols = [t for k, t in SEED_SCORES]
        text += ["", "| system | seeds | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
        for name, g in result["seeds"].items():
            cells = [f"{g[k]['mean']:.2f} ± {g[k]['std']:.2f}" if k in g else "" for k, _ in SEED_SCORES]
            text.append(f"| {name} | {g['n']} seeds | " + " | ".join(cells) + " |")
    return "\n".join(text)


def few_differences(result: dict) -> list[str]:
    """A warning for each output whose approximate-randomisation p is unreliable (FEW_DIFFERING_CLIPS)."""
    notes = [f"{r['name']} is identical to {result['baseline']} (every hypothesis the same): p 1, no test run"
             for r in result["systems"][1:] if r["differing_clips"] == 0]
    return notes + [f"{r['name']} differs from {result['baseline']} in {r['differing_clips']} clips only: its "
                    "approximate randomisation p ties at the minimum (sacreBLEU counts strictly larger trial "
                    "differences); read the bootstrap p"
                    for r in result["systems"][1:] if 0 < r["differing_clips"] < FEW_DIFFERING_CLIPS]


def parse_groups(items: list[str]) -> dict[str, list[str]]:
    groups = {}
    for item in items:
        name, sep, files = item.partition("=")
        if not sep or not name or not files:
            raise DataError(f"--group {item}: write NAME=A.json,B.json")
        groups[name] = [str(Path(f)) for f in files.split(",") if f]
    return groups


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m signllava.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("outputs", nargs="+", metavar="OUT.json", help="generate.py outputs of the same clips; the first "
                                                                   "is the baseline")
    p.add_argument("--names", help="comma-separated names of the outputs (default: their file names)")
    p.add_argument("--group", action="append", default=[], metavar="NAME=A.json,B.json",
                   help="outputs of one system with different seeds, aggregated as mean ± std (repeatable; default: "
                        "the naming rule, files differing only in seed<N>)")
    p.add_argument("--report", metavar="CMP.html", help="a self-contained HTML page: the tables and the clips side by side")
    p.add_argument("--json", metavar="CMP.json", help="everything computed, as JSON")
    p.add_argument("--top", type=int, default=100, help="clips on the page, those whose sentence BLEU differs most "
                                                         "from the baseline's first (0: all)")
    p.add_argument("--bootstrap", type=int, default=N_BOOTSTRAP, help="resamples of the intervals and the paired "
                                                                       "bootstrap test")
    p.add_argument("--trials", type=int, default=AR_TRIALS, help="trials of the approximate randomisation test")
    args = p.parse_args(argv)
    problems = [f"{o}: no such file" for o in args.outputs if not Path(o).is_file()]
    names = args.names.split(",") if args.names else [Path(o).stem for o in args.outputs]
    if len(names) != len(args.outputs):
        problems.append(f"--names gives {len(names)} names for {len(args.outputs)} outputs")
    if len(set(names)) != len(names):
        problems.append("the outputs need distinct names (give --names)")
    problems += [f"--{n} must be >= 2" for n in ("bootstrap", "trials") if getattr(args, n) < 2]
    if args.top < 0:
        problems.append("--top must be >= 0")
    # checked before the tests run, and never onto an output compared (--report a.json would overwrite it)
    problems += outputs_problems([(f"--{n}", getattr(args, n)) for n in ("json", "report") if getattr(args, n)],
                                 [("one of the outputs compared", o) for o in args.outputs])
    if problems:
        p.error("; ".join(problems))
    return run_command(lambda: run(args, names))


def run(args, names: list[str]) -> int:
    systems = [read_output(Path(o), n) for o, n in zip(args.outputs, names)]
    result = compare(systems, parse_groups(args.group), args.bootstrap, args.trials)
    print(markdown(result))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    if args.report:
        from signllava.compare_report import write_compare_report
        print(f"report: {write_compare_report(args.report, result, systems, args.top)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
