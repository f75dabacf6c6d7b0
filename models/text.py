"""Text preprocessing as a manifest describes it, in one place: the export, the server's workers and the
loadtest ceiling must tokenize identically, or parity checks and ceiling ratios compare different work."""

from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_MAX_LENGTH = 128


def load_tokenizer(tokenizer_file: Path | str, max_length: int = DEFAULT_MAX_LENGTH, pad_to: int | None = None):
    """Truncate to `max_length`; pad to the longest text of each batch, or to `pad_to`."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=pad_to) if pad_to else tokenizer.enable_padding()
    return tokenizer


def tokenizer_for(artifact_dir: Path | str, preprocessing: dict):
    """The tokenizer an artifact folder's manifest names (`preprocessing["tokenizer"]`, `max_length`)."""
    return load_tokenizer(Path(artifact_dir) / preprocessing["tokenizer"],
                          int(preprocessing.get("max_length", DEFAULT_MAX_LENGTH)))


def encode(tokenizer, texts: list[str]) -> dict[str, np.ndarray]:
    encoded = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
    }
