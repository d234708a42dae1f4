"""`pip install -e .` makes the Python API and the commands importable from any folder, while the flat scripts
keep running from the repository as they are. The scratch venv sees the test environment's packages through a
.pth file and the install runs with --no-deps --no-build-isolation, so nothing is downloaded or reinstalled."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.kit import REPO, script_env


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    pytest.importorskip("setuptools")
    root = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    Path(purelib, "test_environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    res = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "-e", str(REPO)], capture_output=True, text=True, env=script_env())
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return root


def test_api_and_commands_from_another_folder(venv, tmp_path):
    python, bin_dir = venv / "bin" / "python", venv / "bin"
    code = ("from generate import Translator; import generate, signllava.migrate_config, training; "
            "print(generate.__file__); print(Path(training.__file__).with_name('ds_config_zero2.json').is_file())")
    res = subprocess.run([str(python), "-c", "from pathlib import Path; " + code], cwd=tmp_path, env=script_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split() == [str(REPO / "generate.py"), "True"]            # the repository's own files
    for command in ("signllava-pretrain", "signllava-finetune", "signllava-generate", "signllava-export",
                    "signllava-data", "signllava-migrate-config", "signllava-extract", "signllava-translate",
                    "signllava-app"):
        assert os.access(bin_dir / command, os.X_OK), command
    res = subprocess.run([str(bin_dir / "signllava-pretrain"), "-h"], cwd=tmp_path, env=script_env(),
                         capture_output=True, text=True)
    assert res.returncode == 0 and "usage: signllava-pretrain [options]" in res.stdout, res.stderr[-2000:]
    res = subprocess.run([sys.executable, str(REPO / "data.py"), "-h"], cwd=REPO, env=script_env(),
                         capture_output=True, text=True)                   # the flat script, as before
    assert res.returncode == 0 and "--annotation_file" in res.stdout
