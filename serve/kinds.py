"""What each kind of model answers on `/predict`: the response shaping that depends on the model's task.

serve.protocol parses and validates requests for every model alike; how outputs become a `/predict` answer is
the model kind's business. `ServedModel.kind` looks the kind up here by the manifest's task; a task with no
entry answers with its raw output tensors. Adding a kind is one class and one row in KINDS.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ModelKind:
    """Any model: the raw output tensors, by name."""

    task = ""

    def predict_response(self, outputs: dict[str, np.ndarray], output_names: list[str], single: bool) -> dict:
        """`outputs` hold one row per item; `single` answers the one item a single-item request sent, unwrapped."""
        named = {k: np.ascontiguousarray(v) for k, v in outputs.items()}
        if single:
            return {k: v[0] for k, v in named.items()}
        return {"outputs": named}


class Classification(ModelKind):
    """Logits -> the most likely class and the softmax probabilities, per item."""

    task = "classification"

    def predict_response(self, outputs: dict[str, np.ndarray], output_names: list[str], single: bool) -> dict:
        probs = softmax(outputs[output_names[0]])
        items: list[dict[str, Any]] = [{"class": int(p.argmax()), "probabilities": p} for p in probs]
        return items[0] if single else {"predictions": items}


class Embedding(ModelKind):
    """One vector per item."""

    task = "embedding"

    def predict_response(self, outputs: dict[str, np.ndarray], output_names: list[str], single: bool) -> dict:
        emb = outputs[output_names[0]]
        if single:
            return {"embedding": np.ascontiguousarray(emb[0])}
        return {"embeddings": np.ascontiguousarray(emb)}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, computed in float64 and answered in float32."""
    wide = logits.astype(np.float64)
    shifted = np.exp(wide - wide.max(1, keepdims=True))
    probs = shifted / shifted.sum(1, keepdims=True)
    return probs.astype(np.float32)


TENSORS = ModelKind()
KINDS: dict[str, ModelKind] = {kind.task: kind for kind in (Classification(), Embedding())}


def kind_for(task: str) -> ModelKind:
    return KINDS.get(task, TENSORS)
