"""The whole exception tree of kiln, in one place.

It lives in kiln.models, the bottom of the import chain (models <- export <- serve), so that every
layer raises from the same tree.

Every message names the thing that went wrong and the next step, so that the CLI can print
`ErrorName: message` and exit without a traceback. The exit code tells scripts what kind of
failure it was: 2 for usage, 3 for an artifact that failed verification, 1 for the rest.

    KilnError
    ├── UsageError               bad flags, recipe values or signatures (exit 2)
    │   └── RecipeError
    ├── ModelSourceError         the model cannot be found, built or loaded
    ├── DataError                calibration/evaluation data missing or wrong
    ├── ExportError              a step of the export failed
    ├── VerificationError        an artifact is outside its tolerance (exit 3)
    ├── BenchmarkError           a measurement could not be taken
    ├── ManifestError            an artifact folder is missing, malformed or tampered with
    │   └── IntegrityError       a file's sha256 differs from the manifest
    └── RuntimeUnavailable       the runtime a variant needs is not installed
"""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error kiln raises on purpose."""

    exit_code = 1


class UsageError(KilnError):
    exit_code = 2


class RecipeError(UsageError):
    pass


class ModelSourceError(KilnError):
    pass


class DataError(KilnError):
    pass


class ExportError(KilnError):
    pass


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
    pass


class ManifestError(KilnError):
    pass


class IntegrityError(ManifestError):
    pass


class RuntimeUnavailable(KilnError):
    pass


def format_error(error: BaseException) -> str:
    """One line for the terminal: `ErrorName: what happened; what to do`."""
    message = " ".join(str(error).split())
    return f"{type(error).__name__}: {message}"
