"""A local Hugging Face folder (saved by transformers or sentence-transformers) as a model source.

Nothing is downloaded (HF_HUB_OFFLINE, local files only) and nothing from the folder is executed: a folder that
asks for remote code (`auto_map` in its config) is refused. The task is read from the folder:

- `*ForSequenceClassification` -> text classification (`classification`), labels from `id2label`;
- `*ForTokenClassification` -> token classification (`token-classification`), logits per token;
- a bare encoder, or a sentence-transformers folder -> sentence embeddings (`embedding`), pooled as
  `1_Pooling/config.json` says (mean, CLS or max) and L2-normalized when `modules.json` lists a Normalize module.

The inputs are the ones the architecture really takes (`token_type_ids` where it has them), the tokenizer files
travel into the artifact folder, and the manifest's preprocessing records everything the server, the bench and the
load test need to tokenize exactly as the export did.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import pickle
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from kiln.core.errors import ModelSourceError, UsageError, one_line
from kiln.core.paths import MAX_CONFIG_BYTES, check_tree, inside, read_json, regular_file, safe_name
from kiln.core.preprocessing import DEFAULT_MAX_LENGTH, ENCODING_FIELDS, encode, load_tokenizer
from kiln.core.signature import Signature, TensorSpec
from kiln.models.base import Dataset, ExportHints, ModelBundle, unsafe_pickle
from kiln.models.families import ATTENTION_IMPLEMENTATIONS, Family, family_for, other_attention
from kiln.models.text_data import load_text_data

if TYPE_CHECKING:
    from kiln.models.base import SourceRequest

TASKS = ("classification", "embedding", "token-classification")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "sentencepiece.bpe.model", "spiece.model", "merges.txt", "vocab.json", "added_tokens.json")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}
CALIBRATION_FRACTION = 0.3
MAX_CALIBRATION = 32


@dataclass
class FolderInfo:
    """What the folder says about itself, read without loading any weights."""

    path: Path
    config: dict[str, Any]
    architecture: str
    task: str
    pooling: str = "mean"
    normalize: bool = False
    max_length: int = DEFAULT_MAX_LENGTH
    labels: list[str] = field(default_factory=list)
    tokenizer_files: dict[str, Path] = field(default_factory=dict)

    @property
    def family(self) -> Family:
        return family_for(self.config)


def _read_json(folder: Path, relative: str | Path, what: str, kind: type = dict) -> Any:
    """A JSON object (or list) of the folder: inside it after symlinks, a regular file, size-capped (kiln.core.paths)."""
    path = regular_file(folder, relative, what, ModelSourceError)
    data = read_json(path, MAX_CONFIG_BYTES, what, ModelSourceError, "save the folder again with save_pretrained")
    if not isinstance(data, kind) or (kind is list and not all(isinstance(item, dict) for item in data)):
        raise ModelSourceError(f"{what} {str(path)!r} is not a JSON {'object' if kind is dict else 'list of objects'}; "
                               "save the folder again with save_pretrained")
    return data


def looks_like_folder(reference: str) -> bool:
    """A path: an existing folder, or text shaped like one (a factory reference has a ':' and no '/')."""
    if not reference or (":" in reference and os.sep not in reference):
        return False
    return Path(reference).is_dir() or reference.startswith((".", "/", "~")) or os.sep in reference


def inspect_folder(path: Path, task: str | None = None) -> FolderInfo:
    """Read config, modules and tokenizer files; every problem becomes one ModelSourceError naming the fix."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ModelSourceError(f"model folder {str(path)!r} does not exist; pass a folder saved with "
                               "save_pretrained, a zoo name or package.module:factory")
    if not (path / "config.json").is_file():
        raise ModelSourceError(f"{str(path)!r} has no config.json, so it is not a transformers folder; save it with "
                               "model.save_pretrained(folder) (or SentenceTransformer.save)")
    # transformers reads weights, shards and configs by names of its own choosing: no symlink may lead outside,
    # and no shard a weights index names either.
    check_tree(path, "model folder file", ModelSourceError)
    for index in WEIGHT_INDEXES:
        if (path / index).exists():
            shards = _read_json(path, index, "weights index").get("weight_map")
            for shard in set(shards.values()) if isinstance(shards, dict) else ():
                inside(path, shard, f"weights shard named by {index}", ModelSourceError)
    config = _read_json(path, "config.json", "config")
    if config.get("auto_map") or config.get("trust_remote_code"):
        raise ModelSourceError(f"{str(path)!r} asks for remote code (config.json has auto_map), and kiln never runs "
                               "code from a model folder; use a folder of a built-in transformers architecture")
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures else ""
    modules = _read_json(path, "modules.json", "modules", list) if (path / "modules.json").is_file() else None
    detected = ("classification" if architecture.endswith("ForSequenceClassification") else
                "token-classification" if architecture.endswith("ForTokenClassification") else "embedding")
    task = task or detected
    if task not in TASKS:
        raise UsageError(f"--task {task!r} is not one of {', '.join(TASKS)}")
    info = FolderInfo(path, config, architecture, task)
    if task in ("classification", "token-classification"):
        id2label = config.get("id2label") or {}
        count = int(config.get("num_labels") or len(id2label) or 2)
        info.labels = [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(count)]
    if modules is not None:
        for module in modules:
            kind = str(module.get("type", ""))
            if kind.endswith("Pooling"):
                folder = inside(path, module.get("path", "1_Pooling"), "pooling module folder", ModelSourceError)
                pooling = _read_json(folder, "config.json", "pooling config")
                chosen = [mode for key, mode in POOLING_MODES.items() if pooling.get(key)]
                if isinstance(pooling.get("pooling_mode"), str):  # sentence-transformers >= 5 writes one name
                    chosen = [pooling["pooling_mode"].lower()] if pooling["pooling_mode"].lower() in \
                        POOLING_MODES.values() else []
                if len(chosen) != 1:
                    raise ModelSourceError(f"{str(path)!r}: pooling {pooling} is not exactly one of mean, CLS or max, "
                                           "which kiln supports")
                info.pooling = chosen[0]
            if kind.endswith("Normalize"):
                info.normalize = True
    tokenizer = path / "tokenizer.json"
    if not tokenizer.is_file():
        raise ModelSourceError(f"{str(path)!r} has no tokenizer.json (a fast tokenizer file); save the tokenizer into "
                               "the folder with AutoTokenizer.from_pretrained(...).save_pretrained(folder)")
    # Copied into the artifact folder: regular files inside the model folder only (kiln.core.paths).
    info.tokenizer_files = {name: regular_file(path, name, "tokenizer file", ModelSourceError)
                            for name in TOKENIZER_FILES if (path / name).exists() or (path / name).is_symlink()}
    info.max_length = _max_length(path, config)
    return info


def _max_length(path: Path, config: dict[str, Any]) -> int:
    """sentence-transformers' max_seq_length, else the tokenizer's model_max_length, within the position table."""
    limit = int(config.get("max_position_embeddings") or 512)
    if (path / "sentence_bert_config.json").is_file():
        wanted = _read_json(path, "sentence_bert_config.json", "sentence-transformers config").get("max_seq_length")
        if wanted:
            return min(int(wanted), limit)
    if (path / "tokenizer_config.json").is_file():
        wanted = _read_json(path, "tokenizer_config.json", "tokenizer config").get("model_max_length")
        if isinstance(wanted, int) and 0 < wanted < 100_000:
            return min(wanted, limit)
    return min(DEFAULT_MAX_LENGTH, limit)


def _load_transformer(info: FolderInfo, attn_implementation: str) -> Any:
    """The model with `attn_implementation`, or with the other one where transformers refuses it for the
    architecture (DeBERTa-v2 has no sdpa path); an error names the implementations tried, not the architecture."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import transformers
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    auto = {"classification": transformers.AutoModelForSequenceClassification,
            "token-classification": transformers.AutoModelForTokenClassification,
            "embedding": transformers.AutoModel}[info.task]
    name = info.architecture or info.config.get("model_type")
    refused: list[str] = []
    for implementation in (attn_implementation, other_attention(attn_implementation)):
        try:
            model, loading = auto.from_pretrained(str(info.path), local_files_only=True, trust_remote_code=False,
                                                  attn_implementation=implementation, output_loading_info=True)
            break
        except ValueError as exc:
            if "attention" not in str(exc).lower() and "attn" not in str(exc).lower():
                raise ModelSourceError(f"{str(info.path)!r}: architecture {name!r} is not one transformers knows "
                                       f"for {info.task} ({one_line(exc, 160)}); use a built-in architecture or "
                                       "--task") from exc
            refused.append(f"{implementation}: {one_line(exc, 120)}")
        except pickle.UnpicklingError:
            weights = ", ".join(sorted(p.name for p in info.path.glob("*.bin"))) or "its weights file"
            raise unsafe_pickle(f"{str(info.path)!r}: {weights}", "save the model as safetensors "
                                "(model.save_pretrained(folder, safe_serialization=True)) and export that") from None
        except (OSError, RuntimeError) as exc:
            raise ModelSourceError(f"{str(info.path)!r}: the weights do not load ({one_line(exc, 200)}); save the "
                                   "model again with save_pretrained") from exc
    else:
        raise ModelSourceError(f"{str(info.path)!r}: transformers knows {name!r} but loads it with neither attention "
                               f"implementation kiln exports ({'; '.join(refused)}); upgrade transformers or export "
                               "a folder whose architecture supports sdpa or eager attention")
    missing = [k for k in loading.get("missing_keys", ()) if not k.startswith(("pooler.", "bert.pooler."))]
    if missing or loading.get("mismatched_keys"):
        raise ModelSourceError(f"{str(info.path)!r}: the weights do not match config.json (missing {sorted(missing)[:5]}, "
                               f"mismatched {sorted(map(str, loading.get('mismatched_keys', ())))[:3]}); save the "
                               "model and its config together with save_pretrained")
    return model.eval()


def input_names(model: Any, info: FolderInfo | None = None) -> list[str]:
    """The tokenizer outputs the architecture takes, in a fixed order: the family table's, else (a family kiln does
    not know) the ones its forward names."""
    if info is not None and info.family.known:
        return info.family.input_names(info.config)
    taken = inspect.signature(model.forward).parameters
    return [name for name in ENCODING_FIELDS if name in taken]


@contextlib.contextmanager
def attention_switched(module: Any, implementation: str) -> Iterator[Any]:
    """The same module (the same weights) with another attention implementation while the context lasts."""
    inner = module.inner
    before = inner.config._attn_implementation
    if implementation == before:
        yield module
        return
    try:
        inner.set_attn_implementation(implementation)
    except (ValueError, ImportError, AttributeError):
        yield module  # transformers refuses it here: export with the implementation the model has
        return
    try:
        yield module
    finally:
        inner.set_attn_implementation(before)


def build_module(info: FolderInfo, attn_implementation: str | None = None) -> Any:
    """The transformer wrapped to take the signature's inputs positionally and return one tensor."""
    import torch
    from torch import nn

    attn_implementation = attn_implementation or info.family.attention
    if attn_implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ModelSourceError(f"attention implementation {attn_implementation!r} is not one of "
                               f"{ATTENTION_IMPLEMENTATIONS}")
    model = _load_transformer(info, attn_implementation)
    names = input_names(model, info)
    pooling, normalize, task = info.pooling, info.normalize, info.task

    class TextModel(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
            named = dict(zip(names, inputs, strict=True))
            if task != "embedding":
                return self.inner(**named, return_dict=False)[0]
            hidden = self.inner(**named, return_dict=False)[0]
            mask = named["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            if pooling == "cls":
                pooled = hidden[:, 0]
            elif pooling == "max":
                pooled = hidden.masked_fill(mask == 0, torch.finfo(hidden.dtype).min).max(1).values
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2.0, dim=1) if normalize else pooled

    module = TextModel(model).eval()
    module.input_names = names  # type: ignore[assignment]
    return module


def signature_for(info: FolderInfo, names: list[str]) -> Signature:
    inputs = tuple(TensorSpec(n, "int64", ("batch", "sequence")) for n in names)
    hidden = int(info.config.get("hidden_size") or info.config.get("dim") or info.config.get("d_model") or 0)
    if info.task == "classification":
        output = TensorSpec("logits", "float32", ("batch", len(info.labels)))
    elif info.task == "token-classification":
        output = TensorSpec("logits", "float32", ("batch", "sequence", len(info.labels)))
    else:
        # Not `embedding`: that name collides with a value inside exported BERT graphs.
        output = TensorSpec("sentence_embedding", "float32", ("batch", hidden) if hidden else ("batch", "hidden"))
    return Signature(inputs, (output,))


def load(path: str | Path, data: str | Path | list[str] | None = None, name: str | None = None,
         task: str | None = None, source: dict[str, Any] | None = None,
         calibration_count: int | None = None) -> ModelBundle:
    """The folder as a bundle: the eager module, its signature, tokenized real (or built-in) texts, export hints."""
    info = inspect_folder(Path(path), task)
    module = build_module(info)
    names = module.input_names
    signature = signature_for(info, names)
    tokenizer_files = info.tokenizer_files["tokenizer.json"], info.tokenizer_files.get("tokenizer_config.json")
    tokenizer = load_tokenizer(tokenizer_files[0], info.max_length, config_file=tokenizer_files[1])
    texts, labels, data_note = load_text_data(data, info.labels)
    arrays = encode(tokenizer, texts, names)
    dataset = Dataset(arrays, labels if info.task == "classification" else None)
    if calibration_count is None:
        calibration_count = max(1, min(MAX_CALIBRATION, int(len(texts) * CALIBRATION_FRACTION)))
    held_out = len(texts) > calibration_count + 1
    evaluation = dataset.take(slice(calibration_count, None)) if held_out else dataset

    def example_batch(batch_size: int, seq_len: int | None = None) -> dict[str, np.ndarray]:
        picked = [texts[i % len(texts)] for i in range(batch_size)]
        padded = load_tokenizer(tokenizer_files[0], seq_len or info.max_length, pad_to=seq_len,
                                config_file=tokenizer_files[1]) if seq_len else tokenizer
        return encode(padded, picked, names)

    family = info.family
    optimizer = {}
    if family.ort_model_type:
        optimizer = {"model_type": family.ort_model_type,
                     "num_heads": int(info.config.get("num_attention_heads") or info.config.get("n_heads") or 0),
                     "hidden_size": int(info.config.get("hidden_size") or info.config.get("dim") or 0)}
    preprocessing = {
        "kind": "text", "tokenizer": "tokenizer.json", "max_length": info.max_length, "truncation": True,
        "padding": "longest", "input_names": names, "task": info.task,
    }
    if info.labels:
        preprocessing["labels"] = info.labels
    if info.task == "embedding":
        preprocessing.update({"pooling": info.pooling, "normalize": info.normalize})
    recommended = ("onnx-fp32", "onnx-int8", "pt2-bf16", "pt2-int8")
    return ModelBundle(
        name=name or safe_name(str(info.path.absolute())),
        module=module,
        signature=signature,
        task=info.task,
        source={**(source or {"hf_folder": str(info.path.resolve()), "task": info.task,
                              "data": None if data is None or isinstance(data, list) else str(Path(data).resolve())}),
                "family": family_note(info)},
        calibration=dataset.take(slice(0, calibration_count)),
        evaluation=evaluation,
        preprocessing=preprocessing,
        extra_files=dict(info.tokenizer_files),
        example_batch=example_batch,
        data_note=data_note,
        evaluation_texts=texts[calibration_count:] if held_out else list(texts),
        hints=ExportHints(
            recommended_variants=recommended,
            int8_mode="dynamic",  # transformer activations vary per input: no fixed calibrated ranges
            int8_activations="asymmetric",  # GELU outputs are one-sided (kiln.export.precision.torchao_int8_copy)
            onnx_module=lambda module: attention_switched(module, family.onnx_attention),
            onnx_optimizer=optimizer,
            recipe_defaults={**({"opset": family.opset} if family.opset else {}),
                             **({"tolerances": dict(family.tolerances)} if family.tolerances else {})},
        ),
    )


def family_note(info: FolderInfo) -> str:
    """The family table's row the export used, or a note that it used the generic defaults."""
    model_type = info.config.get("model_type")
    if info.family.known:
        return str(model_type)
    return (f"generic defaults (model_type {model_type!r} is not in kiln's family table: inputs from its forward, "
            "sdpa attention, ONNX Runtime's basic graph optimization)")


class HFFolderSource:
    """A local folder saved by transformers or sentence-transformers."""

    key = "hf_folder"

    def claims(self, reference: str) -> bool:
        return looks_like_folder(reference)

    def load(self, request: "SourceRequest") -> ModelBundle:
        if request.checkpoint or request.inputs:
            raise UsageError(f"{request.reference!r} is a model folder: its weights and inputs come from the folder, "
                             "so it takes no --checkpoint or --input")
        return load(request.reference, request.data, request.name, request.task)

    def rebuild(self, recorded: dict[str, Any]) -> ModelBundle:
        return load(recorded["hf_folder"], recorded.get("data"), task=recorded.get("task"))
