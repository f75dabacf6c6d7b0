"""The install is one `kiln` namespace: no bare `models`/`export`; the CLI shows examples."""

import subprocess
import sys

from conftest import run_kiln


def test_only_the_kiln_namespace_is_installed(tmp_path):
    script = (
        "import importlib.util as u, kiln.models, kiln.export, kiln.serve\n"
        "assert u.find_spec('models') is None and u.find_spec('export') is None and u.find_spec('serve') is None\n"
        "try:\n    import models\nexcept ImportError:\n    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_imports_point_one_way():
    """models imports nothing of export/serve; export nothing of serve."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for folder, forbidden in (("models", ("kiln.export", "kiln.serve")), ("export", ("kiln.serve",))):
        for path in (root / folder).glob("*.py"):
            text = path.read_text()
            for name in forbidden:
                assert f"import {name}" not in text and f"from {name}" not in text, f"{path} imports {name}"


def test_help_shows_examples():
    result = run_kiln("--help")
    assert result.returncode == 0
    assert "kiln export digits --out" in result.stdout
    result = run_kiln("export", "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--variants" in result.stdout
