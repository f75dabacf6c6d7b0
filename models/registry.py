"""Finds a model by zoo name, or by a `package.module:factory` reference, and rebuilds one from a manifest."""

from __future__ import annotations

from pathlib import Path

from kiln.models.base import ModelBundle
from kiln.models.errors import ModelSourceError, UsageError

ZOO = ("digits", "minilm")


def get_model(name: str) -> ModelBundle:
    if name == "digits":
        from kiln.models import digits

        return digits.load()
    if name == "minilm":
        from kiln.models import minilm

        return minilm.load()
    raise ModelSourceError(
        f"no zoo model named {name!r}; use one of {', '.join(ZOO)} or --model package.module:factory"
    )


def resolve(model: str, checkpoint: str | Path | None = None, inputs: list[str] | None = None,
            outputs: list[str] | None = None, data: str | Path | None = None,
            name: str | None = None) -> ModelBundle:
    """A zoo name or a factory reference, from CLI flags."""
    from kiln.models import user

    if model in ZOO:
        if checkpoint or inputs:
            raise UsageError(f"{model!r} is a zoo model: it takes no --checkpoint or --input")
        bundle = get_model(model)
        if name:
            bundle.name = name
        return bundle
    if user.is_factory_reference(model):
        return user.load(model, checkpoint, inputs or [], outputs, data, name=name)
    raise ModelSourceError(
        f"no zoo model named {model!r}; use one of {', '.join(ZOO)} or --model package.module:factory"
    )


def from_source(source: dict) -> ModelBundle:
    """Rebuild the eager fp32 model recorded in a manifest (the benchmark's baseline)."""
    if "zoo" in source:
        return get_model(source["zoo"])
    if "factory" in source:
        return resolve(source["factory"], source.get("checkpoint"), source.get("inputs"),
                       source.get("outputs"), source.get("data"))
    raise ModelSourceError("the manifest's model source names neither a zoo model nor a factory; re-export it")
