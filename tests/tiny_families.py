"""Tiny encoder folders of every family kiln supports, made here: random weights from each family's config class,
and a tokenizer of the family's real kind trained by the `tokenizers` library on kiln's bundled sentences (WordPiece
with token types for BERT-likes, byte-level BPE with pad id 1 for RoBERTa, Unigram for XLM-R and DeBERTa-v2...).
Nothing is downloaded. Saved as transformers saves them (classifiers) or as sentence-transformers does (embedders).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.models.text_data import builtin_texts

HIDDEN, LAYERS, HEADS, FFN, POSITIONS = 32, 2, 2, 64, 128
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TOKEN_LABELS = {0: "O", 1: "B-ENT", 2: "I-ENT"}
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # pad 0
ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # pad 1
DEBERTA_SPECIALS = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]


@dataclass(frozen=True)
class Kind:
    """A family as the matrix builds it: its config class, tokenizer kind and special tokens."""

    family: str  # config.json model_type
    config_class: str
    tokenizer: str  # wordpiece | bpe | unigram
    specials: tuple[str, ...]
    cls: str
    sep: str
    pad: str
    unk: str
    token_types: bool
    config: tuple[tuple[str, Any], ...] = ()
    pooling: str = "mean"


KINDS = {k.family: k for k in (
    Kind("bert", "BertConfig", "wordpiece", tuple(BERT_SPECIALS), "[CLS]", "[SEP]", "[PAD]", "[UNK]", True),
    Kind("distilbert", "DistilBertConfig", "wordpiece", tuple(BERT_SPECIALS), "[CLS]", "[SEP]", "[PAD]", "[UNK]",
         False, (("dim", HIDDEN), ("n_layers", LAYERS), ("n_heads", HEADS), ("hidden_dim", FFN)), pooling="cls"),
    Kind("roberta", "RobertaConfig", "bpe", tuple(ROBERTA_SPECIALS), "<s>", "</s>", "<pad>", "<unk>", False,
         (("pad_token_id", 1), ("bos_token_id", 0), ("eos_token_id", 2), ("type_vocab_size", 1),
          ("max_position_embeddings", POSITIONS + 2))),
    Kind("xlm-roberta", "XLMRobertaConfig", "unigram", tuple(ROBERTA_SPECIALS), "<s>", "</s>", "<pad>", "<unk>",
         False, (("pad_token_id", 1), ("bos_token_id", 0), ("eos_token_id", 2), ("type_vocab_size", 1),
                 ("max_position_embeddings", POSITIONS + 2))),
    Kind("mpnet", "MPNetConfig", "wordpiece", tuple(ROBERTA_SPECIALS), "<s>", "</s>", "<pad>", "<unk>", False,
         (("pad_token_id", 1), ("bos_token_id", 0), ("eos_token_id", 2), ("max_position_embeddings", POSITIONS + 2))),
    Kind("deberta-v2", "DebertaV2Config", "unigram", tuple(DEBERTA_SPECIALS), "[CLS]", "[SEP]", "[PAD]", "[UNK]",
         False, (("pad_token_id", 0), ("relative_attention", True), ("position_buckets", 16),
                 ("pos_att_type", ["p2c", "c2p"]), ("position_biased_input", False), ("type_vocab_size", 0),
                 ("norm_rel_ebd", "layer_norm"), ("share_att_key", True), ("max_relative_positions", -1))),
    Kind("electra", "ElectraConfig", "wordpiece", tuple(BERT_SPECIALS), "[CLS]", "[SEP]", "[PAD]", "[UNK]", True,
         (("embedding_size", HIDDEN),), pooling="cls"),
    Kind("modernbert", "ModernBertConfig", "bpe", tuple(BERT_SPECIALS), "[CLS]", "[SEP]", "[PAD]", "[UNK]", False,
         (("pad_token_id", 0), ("cls_token_id", 2), ("sep_token_id", 3), ("bos_token_id", 2), ("eos_token_id", 3),
          ("global_attn_every_n_layers", 2), ("local_attention", 16))),
)}


def train_tokenizer(kind: Kind) -> Any:
    """A fast tokenizer of the family's kind, trained on kiln's built-in texts, adding its special tokens."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    texts = builtin_texts() * 3
    specials = list(kind.specials)
    if kind.tokenizer == "wordpiece":
        tokenizer = Tokenizer(models.WordPiece(unk_token=kind.unk))
        tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
        tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tokenizer.decoder = decoders.WordPiece()
        trainer: Any = trainers.WordPieceTrainer(vocab_size=600, special_tokens=specials)
    elif kind.tokenizer == "bpe":
        tokenizer = Tokenizer(models.BPE(unk_token=kind.unk))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tokenizer = Tokenizer(models.Unigram())
        tokenizer.normalizer = normalizers.NFKC()
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
        tokenizer.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=600, special_tokens=specials, unk_token=kind.unk)
    tokenizer.train_from_iterator(texts, trainer)
    ids = {t: tokenizer.token_to_id(t) for t in (kind.cls, kind.sep)}
    if kind.tokenizer == "bpe" and kind.family == "roberta":
        tokenizer.post_processor = processors.RobertaProcessing((kind.sep, ids[kind.sep]), (kind.cls, ids[kind.cls]))
    else:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{kind.cls}:0 $A:0 {kind.sep}:0",
            pair=f"{kind.cls}:0 $A:0 {kind.sep}:0 $B:1 {kind.sep}:1",
            special_tokens=[(kind.cls, ids[kind.cls]), (kind.sep, ids[kind.sep])])
    return tokenizer


def save_tokenizer(kind: Kind, folder: Path) -> int:
    """Save the tokenizer as transformers does (tokenizer.json + tokenizer_config.json); return its vocab size."""
    from transformers import PreTrainedTokenizerFast

    raw = train_tokenizer(kind)
    mask = next(t for t in kind.specials if "mask" in t.lower())
    fast = PreTrainedTokenizerFast(
        tokenizer_object=raw, model_max_length=POSITIONS, unk_token=kind.unk, pad_token=kind.pad,
        cls_token=kind.cls, sep_token=kind.sep, mask_token=mask,
        model_input_names=["input_ids", "attention_mask", *(["token_type_ids"] if kind.token_types else [])])
    fast.save_pretrained(folder)
    return raw.get_vocab_size()


def build_model(kind: Kind, task: str, vocab_size: int, seed: int = 0) -> Any:
    import torch
    import transformers

    torch.manual_seed(seed)
    extra = dict(kind.config)
    sizes = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
             "intermediate_size": FFN, "max_position_embeddings": POSITIONS}
    if kind.family == "distilbert":
        sizes = {"max_position_embeddings": POSITIONS}
    labels = LABELS if task == "classification" else TOKEN_LABELS
    config = getattr(transformers, kind.config_class)(vocab_size=vocab_size, **{**sizes, **extra},
                                                      id2label=labels, label2id={v: k for k, v in labels.items()})
    auto = {"classification": transformers.AutoModelForSequenceClassification,
            "token-classification": transformers.AutoModelForTokenClassification,
            "embedding": transformers.AutoModel}[task]
    return auto.from_config(config).eval()


def save_folder(family: str, task: str, root: Path, seed: int = 0) -> Path:
    """A tiny `family` model for `task` saved under root/<family>-<task>: a transformers folder for classifiers, a
    sentence-transformers folder (Transformer, Pooling, Normalize) for embeddings."""
    kind = KINDS[family]
    folder = root / f"{family}-{task}"
    if task != "embedding":
        vocab = save_tokenizer(kind, folder)
        build_model(kind, task, vocab, seed).save_pretrained(folder)
        return folder
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.models import Normalize, Pooling, Transformer

    inner = root / f"{family}-{task}.transformer"
    vocab = save_tokenizer(kind, inner)
    build_model(kind, task, vocab, seed).save_pretrained(inner)
    encoder = Transformer(str(inner), max_seq_length=POSITIONS)
    dimension = getattr(encoder, "get_embedding_dimension", None) or encoder.get_word_embedding_dimension
    pooling = Pooling(dimension(), pooling_mode=kind.pooling)
    SentenceTransformer(modules=[encoder, pooling, Normalize()], device="cpu").save(str(folder))
    return folder
