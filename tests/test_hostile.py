"""A hostile or careless user (issue 25): nothing the user owns is destroyed, one run per output folder, huge
or broken inputs cost what they should and end in one line. Each test reproduces one probe at small scale.

    DS_ACCELERATOR=cpu HF_HUB_OFFLINE=1 python -m pytest -q tests/test_hostile.py
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from tests.kit import REPO, script_env


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` (names relative to it) -> sha256 of its bytes: to prove nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(stderr: str) -> str:
    """The last line, which must be the house's `error: ...`, with no traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") or ": error: " in line, line
    return line


def python(code: str, *args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env or script_env(),
                          capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------ outputs: checked first, atomic
def scored_output(path: Path) -> Path:
    path.write_text(json.dumps({"v": {"clip_order": ["c1", "c2"],
                                      "c1": {"translation": "the cat eats", "hypothesis": "the cat eats"},
                                      "c2": {"translation": "a dog runs", "hypothesis": "a dog"}}}))
    return path


@pytest.mark.parametrize("flag", ["--output", "--report", "--metrics_out"])
def test_generate_checks_every_output_path_before_any_work(tmp_path, monkeypatch, capsys, flag):
    import generate
    monkeypatch.setattr(generate, "run", lambda args: pytest.fail("generation started"))
    (tmp_path / "a_file").write_text("mine")
    bad = {"--output": tmp_path, "--report": tmp_path / "a_file" / "r.html", "--metrics_out": tmp_path}[flag]
    argv = ["--checkpoint", tmp_path, "--data_dir", tmp_path, "--output", tmp_path / "o.json", flag, bad]
    with pytest.raises(SystemExit) as e:
        generate.main([str(a) for a in argv])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"{flag} {bad}" in err and ("is a directory" in err or "is not a directory" in err), err
    assert (tmp_path / "a_file").read_text() == "mine"


def test_score_only_on_a_full_disk_keeps_the_hypotheses(tmp_path):
    """The file size limit stands in for a full disk: a write past 100 bytes fails. In place, OUT.json was
    truncated; now its rewrite fails whole, OUT.json stays byte-identical and no temporary is left."""
    out = scored_output(tmp_path / "out.json")
    before = snapshot(tmp_path)
    limit = ("import resource, runpy, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
             "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100)); sys.argv = sys.argv[1:]; "
             "runpy.run_path(sys.argv[0], run_name='__main__')")
    res = python(limit, REPO / "generate.py", "--score_only", out, env=script_env(PYTHONDONTWRITEBYTECODE=1))
    assert res.returncode == 2, res.stderr[-3000:]
    err = one_line(res.stderr)
    assert f"{out}: not written (File too large" in err and "as it was" in err, err
    assert snapshot(tmp_path) == before
