"""The whole exception tree of kiln, in one place.

It lives in kiln.core, the bottom of the import chain (core <- models <- export <- bench, serve <- kiln),
so that every room raises from the same tree.

Every message names the thing that went wrong and the next step, so that the CLI can print
`ErrorName: message` and exit without a traceback. The exit code tells scripts what kind of
failure it was: 2 for usage, 3 for an artifact that failed verification, 4 for a measurement too unstable
to choose from, 1 for the rest.

    KilnError
    ├── UsageError               bad flags, recipe values or signatures (exit 2)
    │   ├── RecipeError
    │   └── InvalidInput         arrays given to Runtime.run that do not fit the signature
    ├── ModelSourceError         the model cannot be found, built or loaded
    ├── DataError                calibration/evaluation data missing or wrong
    ├── ExportError              a step of the export failed
    │   └── ToolchainMissing     a variant needs a tool this machine lacks (a C++ compiler)
    ├── VerificationError        an artifact is outside its tolerance (exit 3)
    ├── BenchmarkError           a measurement could not be taken
    │   └── UnstableMeasurement  its rounds disagree: no choice is made from it (exit 4)
    ├── ManifestError            an artifact folder is missing, malformed or tampered with
    │   └── IntegrityError       a file's sha256 differs from the manifest
    └── RuntimeUnavailable       the runtime a variant needs is not installed
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error kiln raises on purpose."""

    exit_code = 1


class UsageError(KilnError):
    """The caller asked for something kiln cannot do as asked: fixable by changing the command."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe value (TOML or flag) is out of range or unknown; raised before any work starts."""


class InvalidInput(UsageError):
    """Arrays handed to `kiln.load(...).run` do not fit the signature (name, dtype, rank or a fixed dim): raised
    before the runtime sees them, naming the input and what it needs, as the server's 4xx answers do."""


class ModelSourceError(KilnError):
    """The model cannot be found, imported, built or loaded from its source."""


class DataError(KilnError):
    """Calibration or evaluation data is missing or does not fit the signature."""


class ExportError(KilnError):
    """A step of the export (emit, quantize, optimize) failed; nothing was published."""


class ToolchainMissing(ExportError):
    """A variant needs a tool this machine lacks (a C++ compiler for AOTInductor); the others can still export."""


class VerificationError(KilnError):
    """Raised once with every failure, so one run shows all that must be fixed."""

    exit_code = 3

    def __init__(self, failures: list[str]):
        self.failures = list(failures)
        lines = "; ".join(self.failures)
        super().__init__(
            f"{len(self.failures)} check(s) failed: {lines}; "
            "loosen the tolerance in the recipe or drop the variant (--variants)"
        )


class BenchmarkError(KilnError):
    """A measurement could not be taken (a worker died, a runtime failed mid-run)."""


class UnstableMeasurement(BenchmarkError):
    """The rounds of a measurement disagree past the threshold; no choice is made from it (exit 4)."""

    exit_code = 4


class ManifestError(KilnError):
    """An artifact folder is missing, malformed, or written by an incompatible kiln."""


class IntegrityError(ManifestError):
    """A file's size or sha256 differs from the manifest: it changed since export."""


class RuntimeUnavailable(KilnError):
    """The runtime a variant needs is not installed or not known to this kiln."""


def one_line(error: BaseException | str, limit: int | None = None) -> str:
    """An exception's text on one line (library errors span many), cut to `limit` characters."""
    text = " ".join(str(error).split())
    return text if limit is None else text[:limit]


def format_error(error: BaseException) -> str:
    """One line for the terminal: `ErrorName: what happened; what to do`."""
    return f"{type(error).__name__}: {one_line(error)}"


__all__ = [
    "BenchmarkError", "DataError", "ExportError", "IntegrityError", "InvalidInput", "KilnError", "ManifestError",
    "ModelSourceError", "RecipeError", "RuntimeUnavailable", "ToolchainMissing", "UnstableMeasurement", "UsageError", "VerificationError",
    "format_error", "one_line",
]
