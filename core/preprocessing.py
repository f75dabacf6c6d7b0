"""Text preprocessing as a manifest describes it, in one place: the export, the server's workers, the benchmark
and the loadtest ceiling must tokenize identically, or parity checks and ceiling ratios compare different work.

The manifest's `preprocessing` names the tokenizer file that travels in the artifact folder and its
`max_length`; the tensors produced are the signature's inputs, by name, so no input name is hard-coded here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from kiln.core.errors import KilnError, ManifestError, ModelSourceError, one_line
from kiln.core.paths import MAX_CONFIG_BYTES, MAX_TOKENIZER_BYTES, read_capped

DEFAULT_MAX_LENGTH = 128
# What a Hugging Face fast tokenizer's encoding gives, by the input name a transformer takes it as.
ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


def parse_tokenizer(data: bytes, shown: str, max_length: int = DEFAULT_MAX_LENGTH, pad_to: int | None = None,
                    error: type[KilnError] = ModelSourceError,
                    fix: str = "save the tokenizer again with save_pretrained", pad_token: str | None = None) -> Any:
    """A fast tokenizer from tokenizer.json's bytes: truncate to `max_length`; pad to the longest text of each batch,
    or to `pad_to`. Bytes that do not parse are one `error` naming `shown`, never the library's own exception."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:  # the Rust side raises plain Exception for every kind of damage
        raise error(f"tokenizer {shown!r} is not a valid Hugging Face tokenizer.json ({one_line(exc, 160)}); "
                    f"{fix}") from exc
    tokenizer.enable_truncation(max_length)
    pad_id, pad = pad_of(tokenizer, pad_token)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad, length=pad_to or None)
    return tokenizer


def load_tokenizer(tokenizer_file: Path | str, max_length: int = DEFAULT_MAX_LENGTH, pad_to: int | None = None,
                   config_file: Path | str | None = None) -> Any:
    """A model folder's tokenizer.json (size-capped: kiln.core.paths), as `parse_tokenizer` makes it, with the pad
    token its tokenizer_config.json names (`config_file`, a path its caller checked; default: the one beside it)."""
    data = read_capped(Path(tokenizer_file), MAX_TOKENIZER_BYTES, "tokenizer", ModelSourceError)
    config = Path(config_file) if config_file else Path(tokenizer_file).parent / "tokenizer_config.json"
    settings = read_capped(config, MAX_CONFIG_BYTES, "tokenizer config", ModelSourceError) if config.is_file() else None
    return parse_tokenizer(data, str(tokenizer_file), max_length, pad_to, pad_token=configured_pad(settings))


PAD_TOKENS = ("[PAD]", "<pad>", "<|padding|>", "[pad]")


def configured_pad(config: bytes | None) -> str | None:
    """The pad token a tokenizer_config.json names (a string or an AddedToken object), or None."""
    import json

    if config is None:
        return None
    try:
        pad = json.loads(config).get("pad_token")
    except (ValueError, AttributeError):
        return None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return pad if isinstance(pad, str) else None


def pad_of(tokenizer: Any, pad_token: str | None = None) -> tuple[int, str]:
    """The tokenizer's own pad token (RoBERTa-likes pad with id 1, not 0): its padding settings, else the pad token
    its tokenizer_config.json names, else a usual pad token in its vocabulary, else id 0."""
    if tokenizer.padding:
        return int(tokenizer.padding["pad_id"]), str(tokenizer.padding["pad_token"])
    for token in (*([pad_token] if pad_token else []), *PAD_TOKENS):
        found = tokenizer.token_to_id(token)
        if found is not None:
            return int(found), token
    return 0, "[PAD]"


def encode(tokenizer: Any, texts: list[str], input_names: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    """The named int64 arrays a transformer takes, for `input_names` (the signature's inputs)."""
    return _arrays(tokenizer.encode_batch(texts), input_names)


def _arrays(encoded: list, input_names: list[str] | tuple[str, ...]) -> dict[str, np.ndarray]:
    unknown = [n for n in input_names if n not in ENCODING_FIELDS]
    if unknown:
        raise ManifestError(f"text input(s) {unknown} are not produced by a tokenizer (it gives "
                            f"{', '.join(ENCODING_FIELDS)}); re-export with those input names")
    return {name: np.array([getattr(e, ENCODING_FIELDS[name]) for e in encoded], dtype=np.int64)
            for name in input_names}


class TextPreprocessor:
    """Raw texts -> the signature's input arrays, exactly as the manifest says."""

    def __init__(self, manifest: Any, pad_to: int | None = None) -> None:
        spec = manifest.preprocessing_spec
        self.max_length = int(spec.max_length if spec.max_length is not None else DEFAULT_MAX_LENGTH)
        self.input_names = manifest.signature.input_names
        # The bytes parsed are the bytes hashed: listed in the manifest's files, inside the folder, size-capped.
        name = spec.tokenizer
        data = manifest.read_listed(name, MAX_TOKENIZER_BYTES, "tokenizer")
        config = "tokenizer_config.json"  # its pad token, where the export copied it (hashed like the tokenizer)
        listed = any(entry["file"] == config for entry in manifest.files)
        self.tokenizer = parse_tokenizer(data, str(manifest.folder / name), self.max_length, pad_to, ManifestError,
                                         "re-export the folder", configured_pad(
                                             manifest.read_listed(config, MAX_CONFIG_BYTES, "tokenizer config")
                                             if listed else None))
        self._unpadded: Any = None  # the same tokenizer without padding (measure), made when first needed
        self.pad_id = self.pad_type_id = 0
        self.pad_length: int | None = None

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        return encode_capped(self.tokenizer, texts, self.input_names, self.max_length)

    def measure(self, texts: list[str]) -> tuple[dict[str, np.ndarray], list[int]]:
        """`texts` tokenized and truncated, as the signature's arrays padded to the longest of them, and each text's
        own length: lengths are known before a batch is cut, and `pad` later gives exactly the arrays `__call__`
        would have for the batch.

        The tokenizer's Encodings are not kept: each holds a string per token and the tokens truncation cut off
        (`overflowing`), thousands of small allocations per long text. Kept on requests for the seconds they wait
        in a window, they interleaved with the runtime's batches on the heap, and after bursts of long texts the
        worker stayed up to 30% above its size, where MemoryKeeper could no longer give the pages back."""
        if self._unpadded is None:
            from tokenizers import Tokenizer

            self._unpadded = Tokenizer.from_str(self.tokenizer.to_str())
            self._unpadded.no_padding()
            padding = self.tokenizer.padding or {}
            self.pad_id = pad_of(self.tokenizer)[0]
            self.pad_type_id = int(padding.get("pad_type_id") or 0)
            self.pad_length = padding.get("length")  # a fixed length (pad_to), else None: the longest
        encodings = capped_encodings(self._unpadded, texts, self.max_length)
        lengths = [len(e.ids) for e in encodings]
        return pad_encodings(encodings, self.input_names, self.pad_id, self.pad_type_id), lengths

    def pad(self, blocks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The signature's arrays for a batch of requests measured apart (each request's rows from `measure`, cut to
        its own longest), padded to the batch's longest as the tokenizer pads."""
        return pad_blocks(blocks, self.input_names, self.pad_id, self.pad_type_id, self.pad_length)


# Characters per token a text may spend before kiln tokenizes only its head (encode_capped): real text spends 3-6.
CHARS_PER_TOKEN = 16
# The last ASCII space, tab or line break followed only by other characters: whitespace to every tokenizer (Python's
# \s would also take characters that BERT's normalizer deletes, joining the words around them).
LAST_BREAK = re.compile(r"[ \t\n\r](?=[^ \t\n\r]*\Z)")


def encode_capped(tokenizer: Any, texts: list[str], input_names: list[str] | tuple[str, ...],
                  max_length: int) -> dict[str, np.ndarray]:
    """`encode`, but a text longer than max_length x CHARS_PER_TOKEN characters is tokenized from its head alone
    where that provably gives the same tokens, since the tokenizer normalizes and splits the whole text before
    truncating (64 texts of 20,000 characters took seconds of a worker that others wait on).

    The head gives the same tokens when it filled all max_length positions and the last token kept ends before
    the head's last whitespace: the words before that whitespace are complete, and tokenizers split words
    without looking past them. Otherwise (a head of spaces, marks or one huge word) the whole text is tokenized,
    so no answer changes."""
    if not any(len(text) > max_length * CHARS_PER_TOKEN for text in texts):
        return encode(tokenizer, texts, input_names)
    return _arrays(capped_encodings(tokenizer, texts, max_length), input_names)


def capped_encodings(tokenizer: Any, texts: list[str], max_length: int) -> list:
    """The Encodings of `encode_capped` (the same head rule), as the tokenizer gives them."""
    cap = max_length * CHARS_PER_TOKEN
    long = [i for i, text in enumerate(texts) if len(text) > cap]
    if not long:
        return tokenizer.encode_batch(texts)
    heads = [text[:cap] if len(text) > cap else text for text in texts]
    encoded = tokenizer.encode_batch(heads)
    unsafe = []
    for i in long:
        e = encoded[i]
        last_break = LAST_BREAK.search(heads[i])
        if (last_break is None or sum(e.attention_mask) < max_length
                or max(end for _, end in e.offsets) > last_break.start()):
            unsafe.append(i)
    if unsafe:
        for i in unsafe:
            heads[i] = texts[i]
        encoded = tokenizer.encode_batch(heads)
    return encoded


def pad_encodings(encodings: list, input_names: list[str] | tuple[str, ...], pad_id: int, pad_type_id: int = 0,
                  length: int | None = None) -> dict[str, np.ndarray]:
    """Unpadded Encodings as the signature's int64 arrays, each row padded on the right (as the tokenizer pads) to
    the longest, or to `length`."""
    unknown = [n for n in input_names if n not in ENCODING_FIELDS]
    if unknown:
        return _arrays(encodings, input_names)  # the same clear error
    longest = max(max((len(e.ids) for e in encodings), default=0), length or 0)
    fills = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": pad_type_id}
    arrays = {}
    for name in input_names:
        field, fill = ENCODING_FIELDS[name], fills[name]
        rows = [getattr(e, field) for e in encodings]
        arrays[name] = np.array([row + [fill] * (longest - len(row)) for row in rows], dtype=np.int64)
    return arrays


def pad_blocks(blocks: list[dict[str, np.ndarray]], input_names: list[str] | tuple[str, ...], pad_id: int,
               pad_type_id: int = 0, length: int | None = None) -> dict[str, np.ndarray]:
    """Blocks of rows (each a dict of the signature's arrays, padded on the right to its own longest) as one batch's
    arrays, padded on the right to the longest of them, or to `length`."""
    fills = {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": pad_type_id}
    first = input_names[0]
    rows = sum(block[first].shape[0] for block in blocks)
    longest = max(max(block[first].shape[1] for block in blocks), length or 0)
    arrays = {}
    for name in input_names:
        if len(blocks) == 1 and blocks[0][name].shape[1] == longest:
            arrays[name] = np.ascontiguousarray(blocks[0][name], dtype=np.int64)
            continue
        out = np.full((rows, longest), fills[name], dtype=np.int64)
        row = 0
        for block in blocks:
            part = block[name]
            out[row:row + part.shape[0], :part.shape[1]] = part
            row += part.shape[0]
        arrays[name] = out
    return arrays


def text_preprocessor(manifest: Any, pad_to: int | None = None) -> TextPreprocessor | None:
    """The manifest's text preprocessor, or None for tensor models (clients send the tensors themselves)."""
    if not manifest.is_text:
        return None
    return TextPreprocessor(manifest, pad_to)
