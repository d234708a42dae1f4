"""python -m signllava.compare on outputs written here in generate.py's layout: scores, differences and their
p-values, seed aggregation, refusals, and the side-by-side page in headless Chromium.

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q tests/test_compare.py
"""
from __future__ import annotations

import json
import random
import re
import statistics
from pathlib import Path

import pytest

from signllava import compare
from signllava.scoring import compute_metrics
from tests.kit import chromium

WORDS = "the a cat dog man woman sees eats reads book park home red blue big small runs walks".split()


def references(n_videos: int = 4, clips: int = 10) -> dict[tuple[str, str], str]:
    rng = random.Random(0)
    return {(f"v{v}", f"v{v}_{c}"): " ".join(rng.choices(WORDS, k=rng.randint(4, 12)))
            for v in range(n_videos) for c in range(clips)}


def corrupt(text: str, rng: random.Random, rate: float) -> str:
    """Each word replaced with chance `rate`: a system of that error rate."""
    return " ".join(rng.choice(WORDS) if rng.random() < rate else w for w in text.split())


def write_output(path: Path, refs: dict, hyps: dict) -> Path:
    out: dict = {}
    for (v, c), r in refs.items():
        vd = out.setdefault(v, {"clip_order": []})
        vd["clip_order"].append(c)
        vd[c] = {"translation": r, "paraphrases": ["<none>"], "keywords": [], "hypothesis": hyps[(v, c)]}
    path.write_text(json.dumps(out))
    return path


def system(tmp: Path, name: str, rate: float, seed: int) -> Path:
    refs = references()
    rng = random.Random(seed)
    return write_output(tmp / f"{name}.json", refs, {k: corrupt(r, rng, rate) for k, r in refs.items()})


def test_scores_differences_p_values_and_seeds(tmp_path, capsys):
    good = system(tmp_path, "good", 0.15, 1)
    bad = system(tmp_path, "bad", 0.5, 2)
    # one clip changed from `good`: a difference chance explains
    refs = references()
    near = json.loads(good.read_text())
    near["v0"]["v0_0"]["hypothesis"] = "small red"
    near_path = tmp_path / "near.json"
    near_path.write_text(json.dumps(near))
    seeds = [system(tmp_path, f"run.seed{s}", 0.3, 10 + s) for s in (1, 2, 3)]
    rc = compare.main([str(good), str(bad), str(near_path), *map(str, seeds), "--json", str(tmp_path / "cmp.json"),
                       "--bootstrap", "300", "--trials", "1000"])
    assert rc == 0
    res = json.loads((tmp_path / "cmp.json").read_text())
    rows = {r["name"]: r for r in res["systems"]}
    assert res["baseline"] == "good" and res["clips"] == len(refs) == 40
    for name, path in (("good", good), ("bad", bad)):
        out = json.loads(path.read_text())
        keys = list(refs)
        expected = compute_metrics([out[v][c]["hypothesis"] for v, c in keys], [refs[k] for k in keys])
        assert rows[name]["metrics"]["bleu"] == pytest.approx(expected["bleu"])
        assert rows[name]["metrics"]["rouge_l"] == pytest.approx(expected["rouge_l"])
    assert rows["bad"]["delta_bleu"] == pytest.approx(rows["bad"]["metrics"]["bleu"] - rows["good"]["metrics"]["bleu"])
    assert rows["bad"]["delta_bleu"] < -20
    # far worse: both tests say so; one clip of 40 changed: the bootstrap says it may be chance, and the
    # approximate randomisation, whose trials all tie with it, hits its minimum -- which a note says
    for test in ("bs", "ar"):
        assert rows["bad"][f"p_bleu_{test}"] < 0.01 and rows["bad"][f"p_chrf_{test}"] < 0.01
    assert rows["near"]["p_bleu_bs"] > 0.05 and rows["near"]["p_chrf_bs"] > 0.05
    assert rows["near"]["differing_clips"] == 1 and rows["near"]["p_bleu_ar"] == pytest.approx(1 / 1001)
    assert "p_bleu_bs" not in rows["good"]
    assert "bs:300" in res["tests"]["bleu"]["signature_bs"] and "ar:1000" in res["tests"]["bleu"]["signature_ar"]
    # seeds by the naming rule: run.seed1/2/3 -> "run", mean ± sample std of their corpus scores
    assert list(res["seeds"]) == ["run"] and res["seeds"]["run"]["n"] == 3
    bleus = [rows[f"run.seed{s}"]["metrics"]["bleu"] for s in (1, 2, 3)]
    assert res["seeds"]["run"]["bleu"]["mean"] == pytest.approx(statistics.mean(bleus))
    assert res["seeds"]["run"]["bleu"]["std"] == pytest.approx(statistics.stdev(bleus)) and statistics.stdev(bleus) > 0
    table = capsys.readouterr().out
    assert "note: near differs from good in 1 clips only" in table and "note: bad" not in table
    assert "| run | 3 seeds |" in table and "| bad |" in table and f"{rows['bad']['delta_bleu']:+.2f}" in table


def test_explicit_group_and_refusals(tmp_path, capsys):
    a, b, c = (system(tmp_path, n, 0.2, s) for n, s in (("a", 1), ("b", 2), ("c", 3)))
    assert compare.main([str(a), str(b), str(c), "--group", f"mine={b},{c}", "--json", str(tmp_path / "g.json"),
                         "--bootstrap", "100", "--trials", "100"]) == 0
    seeds = json.loads((tmp_path / "g.json").read_text())["seeds"]
    assert list(seeds) == ["mine"] and seeds["mine"]["outputs"] == [str(b), str(c)]
    # another set of clips: one line naming the file and the first clip, exit status 2
    other = json.loads(a.read_text())
    del other["v1"]["v1_3"]
    other["v1"]["clip_order"].remove("v1_3")
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps(other))
    capsys.readouterr()
    assert compare.main([str(a), str(fewer)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer.json: lacks video v1 clip v1_3" in err[0]
    other = json.loads(a.read_text())
    other["v2"]["v2_1"]["translation"] = "another sentence"
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(other))
    assert compare.main([str(a), str(changed)]) == 2
    assert "changed.json: video v2 clip v2_1: reference" in capsys.readouterr().err
    (tmp_path / "junk.json").write_text('{"v": [1, 2]}')
    assert compare.main([str(a), str(tmp_path / "junk.json")]) == 2
    assert "junk.json: not an output JSON of generate.py" in capsys.readouterr().err


def test_identical_outputs_seed_only_names_and_paths_spelled_two_ways(tmp_path, capsys, monkeypatch):
    """An output identical to the baseline is not "significantly different" (sacreBLEU's tests give it their
    minimum p): p 1 and a note. seed1.json / seed2.json in one folder are one group named after the folder, and
    --group finds an output however its path is spelled."""
    a = system(tmp_path, "a", 0.2, 1)
    same = tmp_path / "same.json"
    same.write_text(a.read_text())
    assert compare.main([str(a), str(same), "--json", str(tmp_path / "s.json"), "--bootstrap", "100",
                         "--trials", "100"]) == 0
    row = json.loads((tmp_path / "s.json").read_text())["systems"][1]
    assert row["differing_clips"] == 0 and row["p_bleu_bs"] == row["p_bleu_ar"] == row["p_chrf_ar"] == 1.0
    assert "same is identical to a (every hypothesis the same): p 1" in capsys.readouterr().out
    runs = tmp_path / "myrun"
    runs.mkdir()
    seeds = [system(runs, f"seed{s}", 0.3, 10 + s) for s in (1, 2)]
    assert compare.main([*map(str, seeds), "--json", str(tmp_path / "g.json"), "--bootstrap", "100",
                         "--trials", "100"]) == 0
    assert list(json.loads((tmp_path / "g.json").read_text())["seeds"]) == ["myrun"]
    monkeypatch.chdir(runs)
    assert compare.main(["seed1.json", str(seeds[1]), "--group", f"g=./seed1.json,{seeds[1]}", "--json",
                         str(tmp_path / "h.json"), "--bootstrap", "100", "--trials", "100"]) == 0
    assert json.loads((tmp_path / "h.json").read_text())["seeds"]["g"]["n"] == 2


def test_outputs_are_checked_before_the_work_and_never_overwrite_an_input(tmp_path, capsys):
    """--report or --json naming an output compared would replace it (the user's only copy of the hypotheses):
    refused before anything runs, as is a path under a file; a clip listed twice (it would be scored twice) is
    a fault of its file."""
    a, b = system(tmp_path, "a", 0.2, 1), system(tmp_path, "b", 0.3, 2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    (tmp_path / "afile").write_text("x")
    for flags, why in ((["--report", str(b)], f"--report {b}: is one of the outputs compared, which this would "
                                                  "overwrite"),
                       (["--json", str(a)], f"--json {a}: is one of the outputs compared"),
                       (["--json", str(tmp_path / "afile" / "x.json")], "afile is not a directory")):
        with pytest.raises(SystemExit) as e:
            compare.main([str(a), str(b), *flags])
        assert e.value.code == 2 and why in capsys.readouterr().err
    assert all((tmp_path / n).read_bytes() == data for n, data in before.items())
    dup = json.loads(a.read_text())
    dup["v1"]["clip_order"].append("v1_2")
    (tmp_path / "dup.json").write_text(json.dumps(dup))
    assert compare.main([str(tmp_path / "dup.json"), str(b)]) == 2
    assert "video 'v1' clip 'v1_2': listed twice in clip_order" in capsys.readouterr().err


def test_side_by_side_page_in_a_real_browser(tmp_path):
    good, bad = system(tmp_path, "good", 0.1, 1), system(tmp_path, "bad", 0.4, 2)
    seeds = [system(tmp_path, f"s-seed{s}", 0.2, 20 + s) for s in (1, 2)]
    page = tmp_path / "cmp.html"
    assert compare.main([str(good), str(bad), *map(str, seeds), "--report", str(page), "--top", "12",
                         "--json", str(tmp_path / "c.json"), "--bootstrap", "100", "--trials", "200"]) == 0
    res = json.loads((tmp_path / "c.json").read_text())
    dom = chromium(tmp_path, page.as_uri(), "--dump-dom")
    rows = re.findall(r'<tr class="clip" data-clip="([^"]+)">(.*?)</tr>', dom, re.S)
    assert len(rows) == 12
    deltas = [float(re.search(r'class="num delta">([\d.]+)<', cells).group(1)) for _, cells in rows]
    assert deltas == sorted(deltas, reverse=True) and deltas[0] > 0        # the most different clips first
    good_out, bad_out = json.loads(good.read_text()), json.loads(bad.read_text())
    first_clip = rows[0][0]
    video = first_clip.split("_")[0]
    assert good_out[video][first_clip]["hypothesis"] in rows[0][1] and bad_out[video][first_clip]["hypothesis"] in rows[0][1]
    bad_row = next(r for r in res["systems"] if r["name"] == "bad")
    assert f"{bad_row['p_bleu_bs']:.4f}" in dom and f"{bad_row['p_chrf_ar']:.4f}" in dom
    assert f"{bad_row['delta_bleu']:+.2f}" in dom and "2 seeds" in dom and res["tests"]["bleu"]["signature_ar"] in dom
    assert "https://" not in dom and "http://" not in dom.replace("http://www.w3.org", "")
    shot = tmp_path / "cmp.png"
    chromium(tmp_path, page.as_uri(), f"--screenshot={shot}", "--window-size=1200,900")
    from PIL import Image
    img = Image.open(shot).convert("L")
    assert img.size == (1200, 900) and len(set(img.get_flattened_data())) > 10
