"""No Docker engine runs here: lint the Dockerfile, and keep its install and serve steps the same as make's."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def test_hadolint_passes():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_installs_like_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    assert "python3.11 -m venv /opt/kiln/.venv" in DOCKERFILE and "$(PYTHON) -m venv $(VENV)" in makefile
    assert "-m pip install --quiet --upgrade pip" in DOCKERFILE and "-m pip install --quiet --upgrade pip" in makefile
    assert re.search(r"-m pip install --quiet \.\s*$", DOCKERFILE, re.M)
    assert "-m pip install --quiet -e '.[test]'" in makefile
    import tomllib

    folders = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"].values())
    assert folders >= {"kiln", "core", "models", "export", "bench", "serve"}
    for folder in folders:  # every room the package installs is copied into the image
        assert f"COPY {folder} ./{folder}" in DOCKERFILE


def test_serves_on_all_interfaces_as_non_root_with_a_healthcheck():
    assert "FROM python:3.11" in DOCKERFILE
    assert re.search(r"^USER 10001", DOCKERFILE, re.M)
    assert '"--host", "0.0.0.0"' in DOCKERFILE
    assert "HEALTHCHECK" in DOCKERFILE and "/v2/health/ready" in DOCKERFILE
    assert "kiln export digits --out /artifacts" in DOCKERFILE


def test_cli_defaults_to_loopback():
    from kiln.serve.server import ServeConfig

    assert ServeConfig(artifact_dir="x").host == "127.0.0.1"
