"""Texts to verify a text model on: the user's own (`.txt`, one text a line; `.jsonl`, `{"text", "label"}`), or,
without `--data`, a built-in set chosen to exercise a tokenizer: plain sentences plus long, nearly empty,
non-ASCII and emoji texts. Parity is then checked on those; task accuracy needs labels, so it is not measured."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kiln.core.errors import DataError

SENTENCES = Path(__file__).resolve().parent / "data" / "sentences.txt"
NOT_MEASURED = "task accuracy: not measured (no --data)"
NO_LABELS = ("task accuracy: not measured (the texts in --data carry no labels; give .jsonl lines "
             "{\"text\": ..., \"label\": ...} to measure it)")
UNLABELLED_EMBEDDER = ("task accuracy: none for an embedder (its texts carry no labels); parity to eager fp32 "
                       "checked on your {count} texts")
EDGE_CASES = (
    "a",
    " . ",
    "?",
    "Ünïcödé façade naïve café — “quotes” and ‘apostrophes’",
    "中文测试：今天天气很好。日本語のテキスト。한국어 문장입니다.",
    "Emoji 🙂🚀🔥 and a family 👩‍👩‍👧‍👦 in one sentence",
    "Ελληνικά και русский текст и العربية",
    "word " * 300,  # past any max_length: truncation must behave as at serving time
    "Numbers 3.14159, 2e10, -42 and symbols #@$%^&*()[]{}<>",
    "URL https://example.com/path?q=1&r=two and e-mail someone@example.org",
)


def sentences() -> list[str]:
    """The bundled English sentences (MiniLM's evaluation data and the start of the built-in text set)."""
    return [line.strip() for line in SENTENCES.read_text().splitlines() if line.strip()]


def builtin_texts() -> list[str]:
    return [*sentences(), *EDGE_CASES]


def load_text_data(data: str | Path | list[str] | None,
                   labels: list[str]) -> tuple[list[str], np.ndarray | None, str | None]:
    """(texts, label ids or None, a note for the manifest when accuracy cannot be measured)."""
    if data is None:
        return builtin_texts(), None, NOT_MEASURED
    if isinstance(data, list):
        return list(data), None, None
    path = Path(data)
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; pass --data FILE.txt (one text a line) or "
                        "FILE.jsonl ({\"text\": ..., \"label\": ...} a line)")
    if path.suffix == ".txt":
        texts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        found_labels = None
    elif path.suffix == ".jsonl":
        texts, raw = [], []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path.name} line {number} is not JSON ({exc}); write one object a line") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise DataError(f"{path.name} line {number} has no string 'text'; write {{\"text\": ..., "
                                "\"label\": ...}} a line")
            texts.append(record["text"])
            raw.append(record.get("label"))
        found_labels = _label_ids(raw, labels, path) if any(r is not None for r in raw) else None
    else:
        raise DataError(f"data file {path.name!r} is neither .txt nor .jsonl; a text model takes one text a line "
                        "(.txt) or {\"text\", \"label\"} a line (.jsonl)")
    if len(texts) < 2:
        raise DataError(f"data file {path.name!r} holds {len(texts)} text(s); give at least 2 (more is better)")
    if found_labels is not None:
        return texts, found_labels, None
    if not labels:  # an embedder: parity is what its texts measure
        return texts, None, UNLABELLED_EMBEDDER.format(count=len(texts))
    return texts, None, NO_LABELS


def _label_ids(raw: list[object], labels: list[str], path: Path) -> np.ndarray:
    ids = []
    for number, label in enumerate(raw, 1):
        if isinstance(label, bool) or label is None:
            raise DataError(f"{path.name}: record {number} has no label while others do; label every line or none")
        if isinstance(label, int) and 0 <= label < max(len(labels), 1):
            ids.append(label)
        elif isinstance(label, str) and label in labels:
            ids.append(labels.index(label))
        else:
            raise DataError(f"{path.name}: record {number} has label {label!r}, not one of the model's labels "
                            f"{labels} (or their index)")
    return np.asarray(ids, dtype=np.int64)
