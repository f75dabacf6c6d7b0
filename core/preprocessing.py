"""Text preprocessing as a manifest describes it, in one place: the export, the server's workers, the benchmark
and the loadtest ceiling must tokenize identically, or parity checks and ceiling ratios compare different work.

The manifest's `preprocessing` names the tokenizer file that travels in the artifact folder and its
`max_length`; the tensors produced are the signature's inputs, by name, so no input name is hard-coded here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kiln.core.errors import ManifestError
from kiln.core.signature import Signature

DEFAULT_MAX_LENGTH = 128
# What a Hugging Face fast tokenizer's encoding gives, by the input name a transformer takes it as.
ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


def load_tokenizer(tokenizer_file: Path | str, max_length: int = DEFAULT_MAX_LENGTH, pad_to: int | None = None) -> Any:
    """Truncate to `max_length`; pad to the longest text of each batch, or to `pad_to`."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.enable_truncation(max_length)
    pad_id, pad_token = pad_of(tokenizer, Path(tokenizer_file).parent)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token, length=pad_to or None)
    return tokenizer


PAD_TOKENS = ("[PAD]", "<pad>", "<|padding|>", "[pad]")


def pad_of(tokenizer: Any, folder: Path) -> tuple[int, str]:
    """The tokenizer's own pad token (RoBERTa-likes pad with id 1, not 0): its padding settings, else the
    tokenizer_config.json beside it, else a usual pad token in its vocabulary, else id 0."""
    import json

    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"]), str(tokenizer.padding["pad_token"])
    candidates: list[str] = []
    config = folder / "tokenizer_config.json"
    if config.is_file():
        try:
            pad = json.loads(config.read_text()).get("pad_token")
        except (OSError, ValueError):
            pad = None
        pad = pad.get("content") if isinstance(pad, dict) else pad
        if isinstance(pad, str):
            candidates.append(pad)
    for token in (*candidates, *PAD_TOKENS):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found), token
    return 0, "[PAD]"


def encode(tokenizer: Any, texts: list[str], input_names: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named int64 arrays a transformer takes, for `input_names` (the signature's inputs)."""
    unknown = [n for n in input_names if n not in ENCODING_FIELDS]
    if unknown:
        raise ManifestError(f"text input(s) {unknown} are not produced by a tokenizer (it gives "
                            f"{', '.join(ENCODING_FIELDS)}); re-export with those input names")
    encoded = tokenizer.encode_batch(texts)
    return {name: np.array([getattr(e, ENCODING_FIELDS[name]) for e in encoded], dtype=np.int64)
            for name in input_names}


class TextPreprocessor:
    """Raw texts -> the signature's input arrays, exactly as the manifest says."""

    def __init__(self, folder: str | Path, preprocessing: dict[str, Any], signature: Signature,
                 pad_to: int | None = None) -> None:
        self.max_length = int(preprocessing.get("max_length", DEFAULT_MAX_LENGTH))
        self.input_names = signature.input_names
        self.tokenizer = load_tokenizer(Path(folder) / preprocessing["tokenizer"], self.max_length, pad_to)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        return encode(self.tokenizer, texts, self.input_names)


def text_preprocessor(manifest: Any, pad_to: int | None = None) -> TextPreprocessor | None:
    """The manifest's text preprocessor, or None for tensor models (clients send the tensors themselves)."""
    if not manifest.is_text:
        return None
    return TextPreprocessor(manifest.folder, manifest.preprocessing, manifest.signature, pad_to)
