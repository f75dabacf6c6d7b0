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


def _stages() -> dict[str, str]:
    """The Dockerfile's stages by name: `FROM image AS name` up to the next FROM."""
    parts = re.split(r"^FROM ", DOCKERFILE, flags=re.M)[1:]
    return {re.match(r"\S+ AS (\S+)", part).group(1): part for part in parts}


def test_two_stages_export_with_torch_and_serve_without():
    stages = _stages()
    assert list(stages) == ["export", "serve"]
    export, serve = stages["export"], stages["serve"]
    # export: torch from PyTorch's CPU wheel index, then the export extra; it exports digits and builds the wheel
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in export
    assert "-m pip install --quiet '.[export]'" in export
    assert "-m pip wheel --quiet --no-deps --wheel-dir /opt/kiln/dist ." in export
    assert re.search(r"kiln export digits --out /artifacts\b", export)
    # serve: only the wheel's base install and the artifact folder come across; no source, no torch, no extra
    assert re.findall(r"^COPY .*", serve, re.M) == [
        "COPY --from=export /opt/kiln/dist/ /opt/kiln/dist/",
        "COPY --from=export --chown=10001:10001 /artifacts /artifacts"]
    assert re.search(r"-m pip install --quiet /opt/kiln/dist/kiln-\*\.whl", serve)
    instructions = [line for line in serve.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in instructions if "torch" in line or "[export" in line]


def test_installs_like_the_makefile():
    import tomllib

    makefile = (ROOT / "Makefile").read_text()
    assert "python3.11 -m venv /opt/kiln/.venv" in DOCKERFILE and "$(PYTHON) -m venv $(VENV)" in makefile
    assert "-m pip install --quiet --upgrade pip" in DOCKERFILE and "-m pip install --quiet --upgrade pip" in makefile
    # make: the extras, editable; the image: the export extra to export, the base alone to serve
    assert "-m pip install --quiet -e '.[export,test,ray,tracing]'" in makefile
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    extras = project["optional-dependencies"]
    base = " ".join(project["dependencies"])
    assert "torch" not in base and "onnxruntime" in base and "litserve" in base and "pyyaml" in base
    # OpenVINO serves the fastest torch-free variants; its quantizer NNCF is for exporting only
    assert "openvino" in base and "nncf" not in base and any(d.startswith("nncf") for d in extras["export"])
    assert any(d.startswith("torch==") for d in extras["export"])
    torch_pin = next(d for d in extras["export"] if d.startswith("torch=="))
    assert f"torch=={torch_pin.split('==')[1]}" in _stages()["export"]  # the CPU wheel is the extra's pin
    assert not any("torch" in d or "kiln[" in d for d in extras["test"])  # tools only; make adds export itself
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    assert folders >= {"kiln", "core", "models", "export", "bench", "serve", "deploy"}
    for folder in folders:  # every room the package installs is copied into the stage that builds it
        assert f"COPY {folder} ./{folder}" in _stages()["export"]


def test_serves_on_all_interfaces_as_non_root_with_a_healthcheck():
    serve = _stages()["serve"]
    assert DOCKERFILE.count("FROM python:3.11-slim") == 2
    assert re.search(r"^USER 10001", serve, re.M)
    assert "HEALTHCHECK" in serve and "/v2/health/ready" in serve
    assert 'CMD ["serve", "/artifacts", "--host", "0.0.0.0", "--port", "8000"]' in serve


def test_entrypoint_takes_the_kserve_container_arguments():
    """KServe's container runs `command` + `args` (kiln deploy kserve); with ENTRYPOINT kiln the image's own CMD is
    `kiln serve ...` too, and `docker run IMAGE serve ...` passes kiln's arguments."""
    import json

    from kiln.deploy.kserve import COMMAND, serve_args

    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", DOCKERFILE, re.M).group(1))
    assert entrypoint == COMMAND == ["kiln"]
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", DOCKERFILE, re.M).group(1))
    args = serve_args("onnx-fp32", 1, api_key=False)
    assert cmd[0] == args[0] == "serve" and cmd[2:4] == args[2:4] == ["--host", "0.0.0.0"]
    from kiln.cli import build_parser

    parsed = build_parser().parse_args([*args, "--api-key-env", "KILN_API_KEY"])  # the parser takes them as given
    assert (parsed.command, parsed.artifact_dirs, parsed.port, parsed.threads) == ("serve", ["/mnt/models"], 8080, ["1"])


def test_cli_defaults_to_loopback():
    from kiln.serve.server import ServeConfig

    assert ServeConfig(artifact_dirs=("x",)).host == "127.0.0.1"
