"""The family table without exporting: each family is detected from config.json, its inputs are the ones its forward
really takes, an unknown family falls back to generic defaults; plus the small readers the families need (the new
sentence-transformers pooling config, a tokenizer's own pad id, an embedder's --data note)."""

from __future__ import annotations

import inspect
import json

import pytest

from kiln.models import hf_folder
from kiln.models.families import FAMILIES, GENERIC, family_for, other_attention
from kiln.models.text_data import load_text_data

BERT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]
PLAIN = ["input_ids", "attention_mask"]
EXPECTED = {  # model_type: (config class, model class, input names)
    "bert": ("BertConfig", "BertModel", BERT_INPUTS),
    "distilbert": ("DistilBertConfig", "DistilBertModel", PLAIN),
    "roberta": ("RobertaConfig", "RobertaModel", PLAIN),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", PLAIN),
    "mpnet": ("MPNetConfig", "MPNetModel", PLAIN),
    "deberta-v2": ("DebertaV2Config", "DebertaV2Model", PLAIN),
    "electra": ("ElectraConfig", "ElectraModel", BERT_INPUTS),
    "modernbert": ("ModernBertConfig", "ModernBertModel", PLAIN),
}


def write_folder(tmp_path, config: dict, architecture: str):
    folder = tmp_path / architecture
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**config, "architectures": [architecture]}))
    (folder / "tokenizer.json").write_text("{}")
    return folder


@pytest.mark.parametrize("model_type", sorted(EXPECTED))
def test_family_detected_with_the_inputs_its_forward_takes(tmp_path, model_type):
    import transformers

    config_class, model_class, expected = EXPECTED[model_type]
    config = getattr(transformers, config_class)().to_dict()
    info = hf_folder.inspect_folder(write_folder(tmp_path, config, model_class))
    assert info.family is FAMILIES[model_type] and info.family.known and info.task == "embedding"
    names = info.family.input_names(info.config)
    assert names == expected
    forward = inspect.signature(getattr(transformers, model_class).forward).parameters
    assert all(name in forward for name in names)  # every input is one the architecture takes


def test_deberta_takes_token_types_only_with_a_token_type_table():
    deberta = FAMILIES["deberta-v2"]
    assert deberta.input_names({"type_vocab_size": 0}) == PLAIN
    assert deberta.input_names({"type_vocab_size": 2}) == BERT_INPUTS
    assert deberta.attention == "eager"  # transformers has no sdpa path for it


def test_an_unknown_family_uses_generic_defaults_and_says_so(tmp_path):
    folder = write_folder(tmp_path, {"model_type": "funnel", "hidden_size": 8}, "FunnelModel")
    info = hf_folder.inspect_folder(folder)
    assert family_for(info.config) is GENERIC and not info.family.known
    assert info.family.ort_model_type is None
    assert "generic defaults" in hf_folder.family_note(info) and "'funnel'" in hf_folder.family_note(info)
    assert other_attention("sdpa") == "eager" and other_attention("eager") == "sdpa"


def test_sentence_transformers_5_pooling_config_is_read(tmp_path):
    folder = write_folder(tmp_path, {"model_type": "bert"}, "BertModel")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"embedding_dimension": 8, "pooling_mode": "cls"}))
    info = hf_folder.inspect_folder(folder)
    assert info.pooling == "cls" and info.normalize


def test_padding_uses_the_tokenizers_own_pad_id(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from kiln.core.preprocessing import load_tokenizer

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "hello": 4, "world": 5}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    encoded = load_tokenizer(tmp_path / "tokenizer.json", 8).encode_batch(["hello world", "hello"])
    assert encoded[1].ids == [4, 1] and encoded[1].attention_mask == [1, 0]  # RoBERTa-like: pad id 1


def test_an_embedders_texts_are_said_to_carry_no_labels(tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("one text\nanother text\n")
    assert "its texts carry no labels" in load_text_data(data, [])[2]  # an embedder (no labels)
    assert "carry no labels" in load_text_data(data, ["neg", "pos"])[2]  # a classifier given unlabelled texts
    assert load_text_data(None, [])[2] == "task accuracy: not measured (no --data)"
