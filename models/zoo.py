"""The built-in models, by name: each is one module of kiln.models with a `load() -> ModelBundle`."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kiln.core.errors import ModelSourceError, UsageError
from kiln.models.base import ModelBundle

if TYPE_CHECKING:
    from kiln.models.base import SourceRequest

ZOO = {"digits": "kiln.models.digits", "minilm": "kiln.models.minilm"}


def get_model(name: str) -> ModelBundle:
    if name not in ZOO:
        raise ModelSourceError(f"no zoo model named {name!r}; use one of {', '.join(ZOO)}")
    bundle: ModelBundle = importlib.import_module(ZOO[name]).load()
    return bundle


class ZooSource:
    """A zoo name: kiln ships the weights (digits) or takes them from an installed package (MiniLM)."""

    key = "zoo"

    def claims(self, reference: str) -> bool:
        return reference in ZOO

    def load(self, request: "SourceRequest") -> ModelBundle:
        if request.checkpoint or request.inputs or request.task or request.data:
            raise UsageError(f"{request.reference!r} is a zoo model: it takes no --checkpoint, --input, --data or "
                             "--task")
        bundle = get_model(request.reference)
        if request.name:
            bundle.name = request.name
        return bundle

    def rebuild(self, recorded: dict[str, Any]) -> ModelBundle:
        return get_model(recorded["zoo"])
