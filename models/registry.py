"""Model sources behind one interface: a reference from the command line (or a manifest's recorded source)
becomes a `ModelBundle`. A new kind of source is one module with a class like these and one row in SOURCES."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from kiln.core.errors import ModelSourceError, UsageError
from kiln.core.paths import check_model_name
from kiln.models.base import ModelBundle, SourceRequest
from kiln.models.hf_folder import HFFolderSource
from kiln.models.user import FactorySource
from kiln.models.zoo import ZOO, ZooSource, get_model


class ModelSource(Protocol):
    key: str  # the key of the manifest's `source` record that names this kind of source

    def claims(self, reference: str) -> bool: ...

    def load(self, request: SourceRequest) -> ModelBundle: ...

    def rebuild(self, recorded: dict[str, Any]) -> ModelBundle: ...


SOURCES: tuple[ModelSource, ...] = (ZooSource(), HFFolderSource(), FactorySource())


def resolve(model: str, checkpoint: str | Path | None = None, inputs: list[str] | None = None,
            outputs: list[str] | None = None, data: str | Path | None = None,
            name: str | None = None, task: str | None = None) -> ModelBundle:
    """The first source that claims `model` loads it."""
    if name is not None:
        check_model_name(name, UsageError)  # refused before any model is loaded
    request = SourceRequest(model, checkpoint, tuple(inputs or ()), tuple(outputs or ()), data, name, task)
    for source in SOURCES:
        if source.claims(model):
            return source.load(request)
    raise ModelSourceError(f"no model source recognises {model!r}; name a zoo model ({', '.join(ZOO)}), "
                           "a Hugging Face model folder (a path), or package.module:factory")


def from_source(recorded: dict[str, Any]) -> ModelBundle:
    """Rebuild the eager fp32 model recorded in a manifest (the benchmark's baseline)."""
    for source in SOURCES:
        if source.key in recorded:
            return source.rebuild(recorded)
    raise ModelSourceError("the manifest's model source names no source this kiln knows "
                           f"({', '.join(s.key for s in SOURCES)}); re-export it")


__all__ = ["SOURCES", "ModelSource", "SourceRequest", "from_source", "get_model", "resolve"]
