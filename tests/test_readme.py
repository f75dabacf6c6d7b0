"""The README and `--help` as a newcomer meets them.

Fast: every fenced example carries a readme-test marker (tests/readme_doc.py says what each means), every `kiln`
line of the README and of the `--help` examples parses with kiln's parser, the README's CLI reference is the one
the parser generates, and `--help` shows every default the parser holds.

Slow: the README's runnable examples, in order, against a fresh artifacts folder in a temporary directory, with
`kiln` on the PATH, as a user runs them: exports, benches, servers (each on 127.0.0.1 and a free port that
replaces :8000, stopped whatever happens), curl (with --fail), the Python snippets, loadtest and the deploy writers.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from readme_doc import FAST, Block, blocks, kiln_argv, reference, reference_in_readme
from server_process import ServerProcess, free_port

from kiln.cli import build_parser


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found.extend(_subparsers(sub))
    return found


def _parses(argv: list[str], where: str) -> None:
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{where}: `kiln {' '.join(argv)}` does not parse (exit {exc.code})")


# --- fast -------------------------------------------------------------------------------------------------------


def test_every_example_block_is_marked():
    """A ```bash or ```python block without a marker is a choice nobody made: run it, parse it, or say why not."""
    for block in blocks():
        if block.lang in ("bash", "python"):
            assert block.mode, f"{block.where()} has no `<!-- readme-test: run|parse|skip -->` marker above it"
        for text in [*block.not_run, *(old for old, _ in block.replace), *(t for t, _ in block.expect)]:
            assert text in block.text, f"{block.where()}: a directive names {text!r}, which the block does not hold"


def test_every_kiln_line_in_the_readme_parses():
    count = 0
    for block in blocks():
        if block.lang != "bash" or block.mode == "skip":
            continue
        for command in block.commands():
            argv = kiln_argv(command)
            if argv:
                _parses(argv, block.where())
                count += 1
    assert count >= 25  # the README's examples, not an empty match
    with pytest.raises(pytest.fail.Exception):  # and a line that does not parse is caught
        _parses(["serve", "artifacts/digits", "--no-such-option"], "this test")


def test_every_help_example_parses():
    for parser in _subparsers(build_parser()):
        for line in (parser.epilog or "").replace("\\\n", " ").splitlines():
            argv = kiln_argv(line.split("  (")[0])
            if argv:
                _parses(argv, f"`{parser.prog} --help` examples")


def test_the_readme_cli_reference_is_the_parsers():
    assert reference_in_readme() == reference(build_parser()), (
        "the README's CLI reference differs from kiln's parser: run `python tests/readme_doc.py` and commit README.md")


def test_help_shows_every_default_and_every_option_has_help():
    for parser in _subparsers(build_parser()):
        text = " ".join(parser.format_help().split())
        for action in parser._actions:
            if not action.option_strings or isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{parser.prog} {action.option_strings[0]} has no help text"
            if action.default not in (None, False):
                assert str(action.default) in text, f"{parser.prog} --help does not show {action.dest}'s default"


def test_the_help_names_every_artifact_format():
    assert ".pt2" in build_parser().format_help()


def test_loadtest_writes_beside_the_ceiling_artifact_unless_told(tmp_path):
    from kiln.bench.loadtest import output_folder

    assert output_folder(None, "artifacts/digits") == Path("artifacts/digits")  # where kiln deploy kserve reads
    assert output_folder("elsewhere", "artifacts/digits") == Path("elsewhere")
    assert output_folder(None, None) == Path("loadtest")


def test_loadtest_results_are_not_lost_when_the_artifact_folder_refuses_them(tmp_path, monkeypatch, capsys):
    """After minutes of load, an unwritable default folder falls back to ./loadtest and says so; an unwritable
    --out (the user's own choice) is a UsageError naming it."""
    import json

    from kiln.bench.loadtest import write_results
    from kiln.core.errors import UsageError

    monkeypatch.chdir(tmp_path)
    artifact = tmp_path / "artifacts" / "digits"
    (artifact / "loadtest.json").mkdir(parents=True)  # a folder where the file should go: writing it fails
    levels = [{"concurrency": 1, "items_per_s": 100.0, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0}]
    report = {"model": "digits", "levels": levels}
    assert write_results(report, levels, "digits", None, str(artifact)) == Path("loadtest")
    assert json.loads((tmp_path / "loadtest" / "loadtest.json").read_text()) == report
    assert (tmp_path / "loadtest" / "loadtest.png").stat().st_size > 0
    assert "writing to ./loadtest instead" in capsys.readouterr().err
    with pytest.raises(UsageError, match="pass a writable --out"):
        write_results(report, levels, "digits", str(artifact), None)
    assert write_results(report, levels, "digits", None, str(tmp_path / "artifacts")) == tmp_path / "artifacts"


def test_the_harness_fails_a_broken_example(tmp_path):
    """The slow test below can fail: a line that exits non-zero, or does not print what its block expects."""
    examples = Examples(tmp_path)
    examples.run_block(Block("bash", 1, "echo fine\ntrue   # a comment", mode="run"))
    with pytest.raises(AssertionError, match="exited 3"):
        examples.run_block(Block("bash", 2, "echo fine\n(exit 3)", mode="run"))
    with pytest.raises(AssertionError, match="did not print"):
        examples.run_block(Block("bash", 3, "echo fine", mode="run", expect=[("echo", "other words")]))


# --- slow: the examples themselves -----------------------------------------------------------------------------


class ShellServer(ServerProcess):
    """A README `kiln serve` line run by bash (it may set a variable first), exec'd so that kiln leads its own
    process group and ServerProcess.stop ends the whole group."""

    def __init__(self, command: str, port: int, cwd: Path, env: dict) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = cwd / f"serve-{port}.log"
        self._log = open(self.log_path, "w")
        command = re.sub(r"(^|\s)kiln serve", r"\1exec kiln serve", command, count=1)
        self.proc = subprocess.Popen(["bash", "-c", f"{command} --port {port}"], cwd=cwd, env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)


def _strip_comment(command: str) -> str:
    return re.sub(r"\s+#(\s.*)?$", "", command)


class Examples:
    def __init__(self, cwd: Path) -> None:
        self.cwd = cwd
        self.env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                    "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.servers: list[ShellServer] = []
        self.timings: list[tuple[str, float]] = []

    def stop_servers(self) -> None:
        errors = []
        while self.servers:
            try:
                self.servers.pop().stop()
            except RuntimeError as exc:  # processes left: still stop the rest, then say so
                errors.append(str(exc))
        assert not errors, errors

    def serve(self, command: str, port: int, where: str) -> None:
        self.stop_servers()
        server = ShellServer(command, port, self.cwd, self.env)
        self.servers.append(server)
        try:
            server.wait_ready(timeout=180)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{where}: `{command}` did not become ready: {exc}")

    def shell(self, command: str, where: str, block: Block, original: str) -> None:
        start = time.monotonic()
        result = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=self.cwd, env=self.env,
                                capture_output=True, text=True, timeout=600)
        self.timings.append((command[:90], time.monotonic() - start))
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{where}: `{command}` exited {result.returncode}:\n{output[-3000:]}"
        for text, words in block.expect:
            if text in original:
                assert words in output, f"{where}: `{command}` did not print {words!r}:\n{output[-3000:]}"

    def run_block(self, block: Block) -> None:
        port = free_port()
        at_port = lambda text: re.sub(r"(localhost|127\.0\.0\.1):8000\b", f"127.0.0.1:{port}", text)  # noqa: E731
        try:
            if block.server is not None:
                self.serve("kiln serve " + " ".join(block.server), port, block.where())
            if block.lang == "python":
                code = block.text
                for old, new in block.replace:
                    code = code.replace(old, new)
                self.shell(f"{sys.executable} - <<'README_PYTHON'\n{at_port(code)}\nREADME_PYTHON", block.where(),
                           block, block.text)
                return
            for original in block.commands():
                if any(text in original for text in block.not_run):
                    continue
                command = _strip_comment(original)
                for old, new in block.replace:
                    command = command.replace(old, new)
                command = at_port(command)
                argv = kiln_argv(command) or []
                if argv[:1] == ["serve"]:
                    self.serve(command, port, block.where())
                    continue
                if block.fast and argv[:1] and argv[0] in FAST:
                    command += " " + " ".join(FAST[argv[0]])
                if command.startswith("curl "):
                    command = "curl --fail " + command[len("curl "):]
                self.shell(command, block.where(), block, original)
        finally:
            self.stop_servers()


@pytest.mark.slow
def test_the_readme_examples_run_in_order(tmp_path):
    examples = Examples(tmp_path)
    ran = [block for block in blocks() if block.mode == "run"]
    assert len(ran) >= 10
    start = time.monotonic()
    for block in ran:
        examples.run_block(block)
    assert (tmp_path / "artifacts" / "digits" / "loadtest.json").is_file()
    slowest = sorted(examples.timings, key=lambda t: -t[1])[:5]
    print(f"README examples: {len(ran)} blocks in {time.monotonic() - start:.0f} s; slowest: "
          + "; ".join(f"{c} {s:.0f}s" for c, s in slowest))
