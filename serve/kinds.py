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

    def v2_extra_specs(self) -> list[dict[str, Any]]:
        """V2 outputs this kind adds to the model's own tensors (metadata)."""
        return []

    def v2_extra_outputs(self, outputs: dict[str, np.ndarray], output_names: list[str]) -> list[dict[str, Any]]:
        """Those outputs' tensors for one answer."""
        return []

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


class TextClassification(Classification):
    """A classifier with class names (a Hugging Face folder's id2label): the label, its probability and every
    label's, per item; V2 answers add `label` (BYTES) and `probabilities` (FP32) beside the logits."""

    def __init__(self, labels: tuple[str, ...]) -> None:
        self.labels = labels

    def predict_response(self, outputs: dict[str, np.ndarray], output_names: list[str], single: bool) -> dict:
        probs = softmax(outputs[output_names[0]])
        items: list[dict[str, Any]] = []
        for p in probs:
            best = int(p.argmax())
            items.append({"label": self.labels[best], "score": float(p[best]),
                          "scores": {label: float(value) for label, value in zip(self.labels, p, strict=True)}})
        return items[0] if single else {"predictions": items}

    def v2_extra_specs(self) -> list[dict[str, Any]]:
        return [{"name": "label", "datatype": "BYTES", "shape": [-1]},
                {"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.labels)]}]

    def v2_extra_outputs(self, outputs: dict[str, np.ndarray], output_names: list[str]) -> list[dict[str, Any]]:
        probs = softmax(outputs[output_names[0]])
        labels = [self.labels[int(i)] for i in probs.argmax(1)]
        return [{"name": "label", "datatype": "BYTES", "shape": [len(labels)], "data": labels},
                {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape), "data": probs.reshape(-1)}]


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


def kind_for(task: str, labels: tuple[str, ...] = ()) -> ModelKind:
    if task == "classification" and labels:
        return TextClassification(labels)
    return KINDS.get(task, TENSORS)
