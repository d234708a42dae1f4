"""bench/extract_speed.py's --tiny mode on the CPU: it finishes, and its frame-by-frame baseline (the
original's style) gives the features ours gives, so its ratios compare like with like. No timing is checked."""
from __future__ import annotations

import json
import os

from bench import extract_speed


def test_tiny_run_baseline_equals_ours(tmp_path):
    out = tmp_path / "speed.json"
    affinity = os.sched_getaffinity(0)
    assert extract_speed.main(["--tiny", "--device", "cpu", "--out", str(out)]) == 0
    assert os.sched_getaffinity(0) == affinity              # the one-core pin is undone
    r = json.loads(out.read_text())
    pipe = r["pipeline"]
    assert pipe["encoder_inputs_identical"] is True          # decode, crops and 208 numbers: the same arrays
    for section in (pipe, r["encoders"]):
        agree = section["features_agree"]
        assert set(agree) == {"pose", "mae", "dino", "sign2vec"}
        assert all(a["ok"] for a in agree.values()), agree
    assert pipe["features_agree"]["pose"]["max_abs_diff"] == 0.0
    for side in ("ours", "baseline"):
        rates = pipe["frames_per_s"][side]
        assert all(rates[k] > 0 for k in ("decode", "landmarks", "crops", "mae", "dino", "sign2vec",
                                          "clip_to_features"))
    assert r["encoders"]["forward"]["mae"]["flops_per_frame"] > 0
    assert r["encoders"]["sign2vec_flops_per_frame"] > 0
    assert r["projection"]["cpu_frames_per_s_per_core"] > 0
