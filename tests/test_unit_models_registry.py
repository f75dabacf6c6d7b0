"""Unit tier: kiln.models.registry's dispatch and its errors. No model is built or loaded here: the loaders that
would train or load weights are replaced by ones that fail the test if they are reached."""

from __future__ import annotations

import pytest

from kiln.core.errors import ModelSourceError, UsageError
from kiln.models import registry, user, zoo
from kiln.models.registry import SOURCES, from_source, resolve
from kiln.models.user import FactorySource, is_factory_reference
from kiln.models.zoo import ZOO, ZooSource


@pytest.fixture(autouse=True)
def no_real_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a unit test reached a real model load with {args} {kwargs}")

    monkeypatch.setattr(zoo, "get_model", refuse)
    monkeypatch.setattr(user, "build_module", refuse)


def test_zoo_lists_the_built_in_models():
    assert set(ZOO) == {"digits", "minilm"}


@pytest.mark.parametrize("reference", ["nope", "Digits", "", "mod.only", "digits.pt"])
def test_resolve_of_an_unknown_name_names_the_zoo_and_the_factory_form(reference):
    with pytest.raises(ModelSourceError) as info:
        resolve(reference)
    message = str(info.value)
    assert repr(reference) in message
    assert "digits, minilm" in message and "package.module:factory" in message


@pytest.mark.parametrize("kwargs", [{"checkpoint": "weights.pt"}, {"inputs": ["image:float32[batch,1,8,8]"]}])
def test_zoo_name_with_a_checkpoint_or_inputs_is_a_usage_error(kwargs):
    with pytest.raises(UsageError, match="'digits' is a zoo model"):
        resolve("digits", **kwargs)


def test_factory_reference_needs_a_signature_but_not_data():
    with pytest.raises(UsageError, match="needs its signature"):
        resolve("pkg.mod:fn")
    with pytest.raises(UsageError, match="--task applies to a Hugging Face model folder"):
        resolve("pkg.mod:fn", inputs=["x:float32[batch,4]"], task="embedding")
    with pytest.raises(UsageError, match="not of the form"):
        resolve("pkg.mod:fn", inputs=["x:float32"], data="data.npz")


def test_from_source_with_no_known_key():
    with pytest.raises(ModelSourceError, match="zoo, hf_folder, factory"):
        from_source({})
    with pytest.raises(ModelSourceError):
        from_source({"hub": "bert"})


def test_from_source_dispatches_on_the_recorded_key(monkeypatch):
    monkeypatch.setattr(ZooSource, "rebuild", lambda self, recorded: ("zoo", recorded["zoo"]))
    monkeypatch.setattr(FactorySource, "rebuild", lambda self, recorded: ("factory", recorded["factory"]))
    assert from_source({"zoo": "digits"}) == ("zoo", "digits")
    assert from_source({"factory": "pkg.mod:fn", "checkpoint": None}) == ("factory", "pkg.mod:fn")


def test_sources_claim_their_references():
    zoo_source, factory_source = (next(s for s in SOURCES if isinstance(s, kind)) for kind in (ZooSource, FactorySource))
    assert {s.key for s in SOURCES} == {"zoo", "hf_folder", "factory"}
    assert zoo_source.claims("digits") and zoo_source.claims("minilm")
    assert not zoo_source.claims("pkg.mod:fn") and not zoo_source.claims("nope")
    assert factory_source.claims("pkg.mod:fn") and factory_source.claims("mod:fn")
    assert not factory_source.claims("digits")
    # exactly one source claims each valid reference
    for reference in ("digits", "minilm", "pkg.mod:fn", "./my-model", "/models/bert"):
        assert sum(s.claims(reference) for s in SOURCES) == 1, reference


@pytest.mark.parametrize(("text", "claimed"), [
    ("pkg.mod:fn", True), ("a:b", True), (":fn", False), ("pkg.mod:", False), ("pkg.mod", False), ("", False),
])
def test_factory_reference_form(text, claimed):
    assert is_factory_reference(text) is claimed


def test_get_model_of_an_unknown_zoo_name():
    # the real get_model (the fixture replaced the module attribute, not this function object)
    with pytest.raises(ModelSourceError, match="no zoo model named 'nope'; use one of digits, minilm"):
        registry.get_model("nope")
