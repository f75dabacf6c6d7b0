"""What kiln knows about exporting each encoder family, in one table (as optimum keeps an `OnnxConfig` per
architecture): the tokenizer outputs its forward takes, the attention implementation the eager module is loaded
with and the one its ONNX export is traced with, ONNX Runtime's transformer-optimizer `model_type` for it (None:
ONNX Runtime's basic graph optimizations only), the opset, and tolerances that differ from the recipe's defaults.

Keyed by `config.json`'s `model_type`. A family not in the table still exports, through `GENERIC` (the inputs its
forward takes, sdpa with an eager fallback, basic graph optimization), and the export report says it used them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ATTENTION_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class Family:
    model_type: str
    # Tokenizer outputs the forward takes, in signature order. token_type_ids only where the family uses them:
    # RoBERTa-likes accept the argument but have one type, so their tokenizers do not return it.
    inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    # token_type_ids is an input only when config.json gives the model a token-type table (DeBERTa-v2/v3).
    token_types_if_table: bool = False
    attention: str = "sdpa"  # the eager module's (and torch.export's) attention implementation
    # ONNX is traced with eager attention where ONNX Runtime fuses it (its optimizer matches that pattern only).
    onnx_attention: str = "eager"
    ort_model_type: str | None = "bert"  # onnxruntime.transformers.optimizer model_type; None: basic optimization
    opset: int | None = None  # None: the recipe's (17)
    tolerances: dict[str, float] = field(default_factory=dict)  # Tolerances fields that differ for this family
    known: bool = True

    def input_names(self, config: dict[str, Any]) -> list[str]:
        names = list(self.inputs)
        if self.token_types_if_table and int(config.get("type_vocab_size") or 0) > 0:
            names.append("token_type_ids")
        return names


BERT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("bert", BERT_INPUTS),
    Family("distilbert"),
    Family("roberta"),
    Family("camembert"),
    Family("xlm-roberta"),
    Family("electra", BERT_INPUTS),
    Family("albert", BERT_INPUTS),
    Family("mpnet"),
    # Disentangled relative-position attention: transformers has no sdpa path for it, and ONNX Runtime's BERT
    # fusion does not match it (LayerNorm and Gelu still fuse through the BERT optimizer).
    Family("deberta-v2", token_types_if_table=True, attention="eager"),
    # Rotary embeddings, alternating local/global attention: no ONNX Runtime fusion pattern.
    Family("modernbert", onnx_attention="sdpa", ort_model_type=None),
)}

GENERIC = Family("generic", inputs=(), attention="sdpa", onnx_attention="sdpa", ort_model_type=None, known=False)


def family_for(config: dict[str, Any]) -> Family:
    """The table's row for a config.json, or GENERIC (whose inputs the caller reads from the forward)."""
    return FAMILIES.get(str(config.get("model_type", "")), GENERIC)


def other_attention(implementation: str) -> str:
    """The implementation to retry with when transformers refuses one for an architecture."""
    return "eager" if implementation != "eager" else "sdpa"
