"""Unit tier: kiln.core.console tables and the error tree of kiln.core.errors (messages and exit codes)."""

from __future__ import annotations

import argparse

import pytest

from kiln.core import errors
from kiln.core.console import format_table, quiet, to_stderr
from kiln.core.errors import (
    BenchmarkError,
    DataError,
    ExportError,
    IntegrityError,
    KilnError,
    ManifestError,
    ModelSourceError,
    RecipeError,
    RuntimeUnavailable,
    UsageError,
    VerificationError,
    format_error,
    one_line,
)


def test_format_table_aligns_names_left_and_figures_right():
    rows = [["variant", "p50 ms", "speedup"],
            ["onnx-fp32", "1.25", "2.4x"],
            ["pruned-onnx-int8", "0.5", "10.75x"]]
    assert format_table(rows).splitlines() == [
        "variant           p50 ms  speedup",
        "onnx-fp32           1.25     2.4x",
        "pruned-onnx-int8     0.5   10.75x",
    ]


def test_format_table_left_columns_and_no_trailing_spaces():
    rows = [["name", "kind", "n"], ["a", "longer kind", "1"], ["bb", "k", "100"]]
    lines = format_table(rows, left_columns=2).splitlines()
    assert lines == [
        "name  kind           n",
        "a     longer kind    1",
        "bb    k            100",
    ]
    # the last column left-aligned is padded, then the padding is stripped
    assert format_table([["x", "long"], ["yy", "s"]], left_columns=2).splitlines() == ["x   long", "yy  s"]
    assert all(line == line.rstrip() for line in format_table(rows, left_columns=3).splitlines())


def test_format_table_single_row():
    assert format_table([["only", "1"]]) == "only  1"


def test_progress_sinks(capsys):
    to_stderr("[kiln] step")
    quiet("dropped")
    captured = capsys.readouterr()
    assert captured.err == "[kiln] step\n" and captured.out == ""


def test_one_line_collapses_whitespace():
    assert one_line("first line\n  second\tline\r\n\nthird ") == "first line second line third"
    assert one_line(ValueError("a\nb")) == "a b"
    assert one_line("") == ""


def test_one_line_limit_cuts_after_collapsing():
    text = "abc\n\n\ndef ghi"
    assert one_line(text, 7) == "abc def"
    assert one_line(text, 0) == ""
    assert one_line(text, 100) == "abc def ghi"
    assert len(one_line("x " * 500, 200)) == 200


def test_format_error_names_the_class_on_one_line():
    assert format_error(UsageError("bad flag\n  use --variants")) == "UsageError: bad flag use --variants"
    assert format_error(IntegrityError("changed")) == "IntegrityError: changed"
    assert "\n" not in format_error(ManifestError("a\nb\nc"))


@pytest.mark.parametrize(("cls", "code"), [
    (KilnError, 1), (UsageError, 2), (RecipeError, 2), (ModelSourceError, 1), (DataError, 1), (ExportError, 1),
    (BenchmarkError, 1), (ManifestError, 1), (IntegrityError, 1), (RuntimeUnavailable, 1),
])
def test_exit_codes(cls, code):
    error = cls("message")
    assert isinstance(error, KilnError)
    assert error.exit_code == code


def test_hierarchy():
    assert issubclass(RecipeError, UsageError) and issubclass(IntegrityError, ManifestError)
    assert set(errors.__all__) >= {c.__name__ for c in KilnError.__subclasses__()}


def test_verification_error_carries_every_failure():
    error = VerificationError(["onnx-int8: cosine 0.9 < 0.99", "onnx-fp32: accuracy dropped 2 points"])
    assert error.exit_code == 3 and isinstance(error, KilnError)
    assert error.failures == ["onnx-int8: cosine 0.9 < 0.99", "onnx-fp32: accuracy dropped 2 points"]
    message = str(error)
    assert message.startswith("2 check(s) failed: onnx-int8: cosine 0.9 < 0.99; onnx-fp32: accuracy dropped 2 points")
    assert "--variants" in message
    source = ["x"]
    copied = VerificationError(source)
    source.append("y")
    assert copied.failures == ["x"]  # its own copy


def test_main_guard_prints_one_line_and_returns_the_exit_code(capsys):
    from kiln.cli import main_guard

    def failing(error):
        def handler(args):
            raise error
        return handler

    args = argparse.Namespace(verbose=False)
    assert main_guard(failing(UsageError("bad\nflag")), args) == 2
    assert capsys.readouterr().err == "UsageError: bad flag\n"
    assert main_guard(failing(VerificationError(["a", "b"])), args) == 3
    assert capsys.readouterr().err.startswith("VerificationError: 2 check(s) failed: a; b")
    assert main_guard(failing(IntegrityError("changed")), args) == 1
    assert main_guard(lambda a: None, args) == 0
    assert main_guard(lambda a: 5, args) == 5
    with pytest.raises(ValueError):  # not a KilnError: not swallowed
        main_guard(failing(ValueError("bug")), args)


def test_kiln_bench_stays_the_function_after_its_room_is_imported():
    """`kiln.export_model` imports kiln.bench.driver for its selection: the README's `kiln.bench(...)` after it must
    still be the function, not the package of the same name."""
    import subprocess
    import sys

    code = ("import kiln; kiln._bench_driver(); import kiln.bench.select; "
            "print(callable(kiln.bench), kiln.bench.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["True", "kiln"], out.stderr
