"""The typed recipe that drives an export: what to prune, how to quantize, which artifacts to emit.

A frozen dataclass that checks itself on construction, so a bad flag or TOML value fails before
any work starts; the same object is written into the manifest, so an artifact says how it was made.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from kiln.core.errors import RecipeError
from kiln.export.variants import PRUNING_METHODS, VARIANTS, VariantSpec


@dataclass(frozen=True)
class PruneConfig:
    """Structured pruning removes channels (real speed); unstructured zeroes weights (size only)."""

    method: str = "structured"
    amount: float = 0.5
    fine_tune_epochs: int = 3

    def __post_init__(self) -> None:
        if self.method not in PRUNING_METHODS:
            raise RecipeError(f"pruning method {self.method!r} is unknown; use structured or unstructured")
        if not 0.0 < self.amount < 1.0:
            raise RecipeError(f"pruning amount {self.amount} must be between 0 and 1 (exclusive); e.g. 0.5")
        if self.fine_tune_epochs < 0:
            raise RecipeError(f"fine_tune_epochs {self.fine_tune_epochs} must be >= 0")


@dataclass(frozen=True)
class Tolerances:
    """How far an artifact may stray from eager fp32, by precision.

    accuracy_drop is in percentage points (classifiers); cosine_min is for every model's outputs.
    """

    fp32_cosine_min: float = 0.9999
    bf16_cosine_min: float = 0.999
    int8_cosine_min: float = 0.99
    fp32_accuracy_drop: float = 0.5
    bf16_accuracy_drop: float = 1.0
    int8_accuracy_drop: float = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("cosine_min") and not -1.0 <= value <= 1.0:
                raise RecipeError(f"tolerance {f.name}={value} must lie in [-1, 1]")
            if f.name.endswith("accuracy_drop") and not 0.0 <= value <= 100.0:
                raise RecipeError(f"tolerance {f.name}={value} must lie in [0, 100] percentage points")

    def cosine_min(self, precision: str) -> float:
        return getattr(self, f"{precision}_cosine_min")

    def accuracy_drop(self, precision: str) -> float:
        return getattr(self, f"{precision}_accuracy_drop")


@dataclass(frozen=True)
class Recipe:
    variants: tuple[str, ...]
    prune: PruneConfig = field(default_factory=PruneConfig)
    tolerances: Tolerances = field(default_factory=Tolerances)
    opset: int = 17
    select: bool = False
    # --select budgets; None means the same default as `kiln bench --select` (kiln.bench.select.choose): classifiers
    # within 0.5 accuracy points of eager, other tasks at cosine >= 0.99.
    max_accuracy_drop: float | None = None  # percentage points
    min_cosine: float | None = None
    min_batch_invariance: float | None = None  # None: kiln.bench.select.DEFAULT_MIN_BATCH_INVARIANCE
    accept_unstable: bool = False  # let --select choose from measurements whose rounds disagree
    select_batch_size: int = 16
    seed: int = 0
    # Variants the export may leave out when this machine lacks their toolchain (a C++ compiler for pt2): the
    # model's recommended set, when the user named no variants. A variant the user names is never left out.
    optional_variants: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.variants:
            raise RecipeError("the recipe names no variants; pass --variants, e.g. onnx-fp32,onnx-int8")
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown:
            raise RecipeError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise RecipeError("a variant is named twice in --variants; name each once")
        if isinstance(self.opset, bool) or not isinstance(self.opset, int) or not 14 <= self.opset <= 21:
            raise RecipeError(f"opset {self.opset!r} is outside 14..21 or not an integer; kiln pins 17 by default")
        if isinstance(self.select_batch_size, bool) or not isinstance(self.select_batch_size, int) \
                or self.select_batch_size < 1:
            raise RecipeError("select_batch_size must be a positive integer")
        if self.max_accuracy_drop is not None and not 0.0 <= self.max_accuracy_drop <= 100.0:
            raise RecipeError("max_accuracy_drop is in percentage points and must lie in [0, 100]")
        if self.min_cosine is not None and not -1.0 <= self.min_cosine <= 1.0:
            raise RecipeError("min_cosine must lie in [-1, 1]")
        if self.min_batch_invariance is not None and not -1.0 <= self.min_batch_invariance <= 1.0:
            raise RecipeError("min_batch_invariance is a cosine and must lie in [-1, 1]")

    @property
    def specs(self) -> list[VariantSpec]:
        return [VARIANTS[v] for v in self.variants]

    @property
    def pruning_needed(self) -> set[str]:
        return {s.pruning for s in self.specs if s.pruning}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Recipe":
        data = dict(data)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"unknown recipe key(s) {', '.join(unknown)}; known keys are {', '.join(sorted(known))}")
        try:
            if "prune" in data:
                data["prune"] = PruneConfig(**data["prune"])
            if "tolerances" in data:
                data["tolerances"] = Tolerances(**data["tolerances"])
            if "optional_variants" in data:
                data["optional_variants"] = tuple(data["optional_variants"])
            if "variants" in data:
                if isinstance(data["variants"], str) or not isinstance(data["variants"], (list, tuple)):
                    raise RecipeError("recipe 'variants' must be a list of names, e.g. variants = [\"onnx-fp32\"]")
                data["variants"] = tuple(data["variants"])
            return cls(**data)
        except TypeError as exc:
            raise RecipeError(f"recipe has a wrong key or type: {exc}; see the README's recipe section") from exc

    @classmethod
    def from_toml(cls, path: str | Path, **overrides) -> "Recipe":
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError as exc:
            raise RecipeError(f"recipe file {str(path)!r} does not exist; pass --recipe FILE.toml") from exc
        except tomllib.TOMLDecodeError as exc:
            raise RecipeError(f"recipe file {str(path)!r} is not valid TOML ({exc}); fix its syntax") from exc
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(data)


def build_recipe(recommended: tuple[str, ...], recipe_file: str | Path | None = None, *,
                 variants: list[str] | None = None, opset: int | None = None, select: bool = False,
                 max_accuracy_drop: float | None = None, min_cosine: float | None = None,
                 min_batch_invariance: float | None = None, prune: str | None = None,
                 fine_tune_epochs: int | None = None, accept_unstable: bool = False,
                 model_defaults: dict | None = None) -> Recipe:
    """The recipe a command line or an API call asks for: the model's recommended set and its own defaults (a
    family's opset or tolerances), a TOML file's values over them, then each option given (None or False: not
    given) over those."""
    overrides: dict = {}
    if variants:
        overrides["variants"] = list(variants)
    if opset is not None:
        overrides["opset"] = opset
    if select:
        overrides["select"] = True
    if max_accuracy_drop is not None:
        overrides["max_accuracy_drop"] = max_accuracy_drop
    if min_cosine is not None:
        overrides["min_cosine"] = min_cosine
    if min_batch_invariance is not None:
        overrides["min_batch_invariance"] = min_batch_invariance
    if accept_unstable:
        overrides["accept_unstable"] = True
    pruning: dict = {}
    if prune:
        method, _, amount = prune.partition(":")
        try:
            pruning = {"method": method, "amount": float(amount or 0.5)}
        except ValueError as exc:
            raise RecipeError(f"--prune {prune!r} is not METHOD:AMOUNT; e.g. structured:0.5") from exc
    if fine_tune_epochs is not None:
        pruning["fine_tune_epochs"] = fine_tune_epochs
    data = Recipe.from_toml(recipe_file).to_dict() if recipe_file else {"variants": list(recommended)}
    written = tomllib.loads(Path(recipe_file).read_text()) if recipe_file else {}  # what the file itself sets
    for key, value in (model_defaults or {}).items():
        if key == "tolerances":
            data["tolerances"] = {**value, **written.get("tolerances", {})}
        elif key not in written:
            data[key] = value
    data.update(overrides)
    data["optional_variants"] = [] if (variants or recipe_file) else list(recommended)
    if pruning:
        data["prune"] = {**data.get("prune", dataclasses.asdict(PruneConfig())), **pruning}
    return Recipe.from_dict(data)
