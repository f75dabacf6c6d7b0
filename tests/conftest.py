"""Shared fixtures: real zoo exports (made once per session), a user model on real data, a CLI runner."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parent / "fixtures"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger().setLevel(logging.ERROR)


def _cached(name: str) -> Path | None:
    """A developer's shortcut, never set by CI: KILN_TEST_CACHE=DIR reuses DIR/<name> when it holds a manifest, so
    repeated local runs skip the session exports. A change to export must be tested without it."""
    cache = os.environ.get("KILN_TEST_CACHE")
    if cache and (Path(cache) / name / "manifest.json").is_file():
        return Path(cache) / name
    return None


def run_kiln(*args: str, cwd: Path | None = None, timeout: float = 600,
             env: dict | None = None) -> subprocess.CompletedProcess:
    """The real `kiln` command in a subprocess, as a user runs it (`env` adds to or overrides the environment)."""
    env = {**os.environ, "PYTHONPATH": str(FIXTURES), **(env or {})}
    return subprocess.run([sys.executable, "-m", "kiln", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def digits_artifacts(tmp_path_factory) -> Path:
    """The digits model's recommended set, exported once for the whole suite."""
    from kiln.export.pipeline import run_export
    from kiln.export.recipe import PruneConfig, Recipe
    from kiln.models.registry import get_model

    if _cached("digits"):
        return _cached("digits")
    bundle = get_model("digits")
    out = tmp_path_factory.mktemp("artifacts") / "digits"
    recipe = Recipe(variants=bundle.hints.recommended_variants, prune=PruneConfig(fine_tune_epochs=3))
    run_export(bundle, recipe, out, progress=lambda message: None)
    return out


@pytest.fixture(scope="session")
def minilm_artifacts(tmp_path_factory) -> Path:
    from kiln.export.pipeline import run_export
    from kiln.export.recipe import Recipe
    from kiln.models.registry import get_model

    if _cached("minilm"):
        return _cached("minilm")
    bundle = get_model("minilm")
    out = tmp_path_factory.mktemp("artifacts") / "minilm"
    run_export(bundle, Recipe(variants=bundle.hints.recommended_variants), out, progress=lambda message: None)
    return out


@pytest.fixture(scope="session")
def iris_user_model(tmp_path_factory) -> dict:
    """A user's MLP trained on scikit-learn's bundled iris data: checkpoint + .npz with labels."""
    import torch
    from sklearn.datasets import load_iris

    sys.path.insert(0, str(FIXTURES))
    from userpkg.nets import iris_mlp

    folder = tmp_path_factory.mktemp("user")
    iris = load_iris()
    rng = np.random.default_rng(0)
    order = rng.permutation(len(iris.target))
    x = ((iris.data - iris.data.mean(0)) / iris.data.std(0)).astype(np.float32)[order]
    y = iris.target.astype(np.int64)[order]
    torch.manual_seed(0)
    model = iris_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(x[:100])), torch.from_numpy(y[:100]))
        loss.backward()
        optimizer.step()
    torch.save(model.state_dict(), folder / "iris.pt")
    np.savez(folder / "iris.npz", features=x, labels=y)
    return {"folder": folder, "checkpoint": folder / "iris.pt", "data": folder / "iris.npz"}


@pytest.fixture(scope="module")
def digits_server(digits_artifacts):
    """A digits server per test module, so one module's hostile traffic never meets another's assertions."""
    from server_process import ServerProcess

    server = ServerProcess(digits_artifacts, "--threads", "1", "--max-batch-size", "8").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def minilm_server(minilm_artifacts):
    """A MiniLM server (onnx-fp32, one thread) per test module."""
    from server_process import ServerProcess

    server = ServerProcess(minilm_artifacts, "--variant", "onnx-fp32", "--threads", "1").wait_ready(180)
    yield server
    server.stop()
