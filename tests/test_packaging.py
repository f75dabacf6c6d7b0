"""The install is one `kiln` namespace: no bare `models`/`export`; the CLI shows examples."""

import subprocess
import sys

from conftest import run_kiln


def test_only_the_kiln_namespace_is_installed(tmp_path):
    script = (
        "import importlib.util as u, kiln, kiln.core, kiln.models, kiln.export, kiln.bench, kiln.serve, kiln.deploy\n"
        "assert u.find_spec('models') is None and u.find_spec('export') is None and u.find_spec('serve') is None\n"
        "assert u.find_spec('deploy') is None\n"
        "assert all(u.find_spec(n) is None for n in ('core', 'bench'))\n"
        "try:\n    import models\nexcept ImportError:\n    print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# Imports point one way: core <- models <- export <- bench, serve <- deploy <- kiln. A room may import the rooms
# below it. deploy reads serve's defaults (ServeConfig) and the manifest; it imports neither torch nor the server.
ROOMS = {"core": 0, "models": 1, "export": 2, "bench": 3, "serve": 3, "deploy": 4, "kiln": 5}


def _kiln_imports(path) -> set[str]:
    """The kiln rooms a file imports, at top level or inside functions (TYPE_CHECKING imports included)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for name in names:
            parts = name.split(".")
            if parts[0] == "kiln":
                found.add(parts[1] if len(parts) > 1 and parts[1] in ROOMS else "kiln")
    return found


def test_imports_point_one_way():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    wrong = []
    for room, level in ROOMS.items():
        files = list((root / room).rglob("*.py"))
        assert files, room
        for path in files:
            for imported in _kiln_imports(path) - {room}:
                if ROOMS[imported] >= level:
                    wrong.append(f"{path.relative_to(root)} imports kiln.{imported}")
    assert not wrong, wrong


def _module_name(root, path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[0] != "kiln":
        parts.insert(0, "kiln")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_graph(root) -> dict[str, set[str]]:
    """Every kiln module and the kiln modules it imports, at top level, inside functions or under TYPE_CHECKING
    (a circle of types is a circle a reader has to untangle too). `from kiln.x import y` names the module y where
    y is one, else kiln.x."""
    import ast

    paths = {_module_name(root, p): p for room in ROOMS for p in (root / room).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in paths.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in paths}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module in paths:
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in paths else node.module
                          for a in node.names}
        graph[name] = edges - {name}
    return graph


def _room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else "kiln"


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules of one room that import each other, directly or round a loop (Tarjan's strongly
    connected components over the imports that stay inside a room)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in sorted(graph[module]):
            if _room(other) != _room(module):
                continue
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == module:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return circles


def test_import_circles_are_found():
    """The finder itself: a loop of three is one circle, an import down and out of a room is none."""
    graph = {"kiln.export.a": {"kiln.export.b"}, "kiln.export.b": {"kiln.export.c", "kiln.core.x"},
             "kiln.export.c": {"kiln.export.a"}, "kiln.core.x": set(), "kiln.bench.d": {"kiln.export.a"}}
    assert import_circles(graph) == [["kiln.export.a", "kiln.export.b", "kiln.export.c"]]


def test_no_import_circles_inside_a_room():
    """A registry imports its members; members import the shared types from a base module, not from the
    registry. Two modules of a room that import each other (even lazily, even only for types) break that."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    assert import_circles(_module_graph(root)) == []


def test_each_room_imports_without_the_rooms_above_it():
    """Import every module of a room in a fresh interpreter and check no room above it was loaded."""
    import json

    script = (
        "import importlib, json, pkgutil, sys\n"
        "room = sys.argv[1]\n"
        "pkg = importlib.import_module('kiln' if room == 'kiln' else 'kiln.' + room)\n"
        "for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    if not info.name.endswith('__main__'):\n"
        "        importlib.import_module(info.name)\n"
        "print(json.dumps(sorted({m.split('.')[1] for m in sys.modules if m.startswith('kiln.') and m.count('.') >= 1})))\n"
    )
    for room, level in ROOMS.items():
        if room == "kiln":
            continue
        result = subprocess.run([sys.executable, "-c", script, room], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr[-2000:]
        loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
        above = {r for r in loaded if r in ROOMS and r != room and ROOMS[r] >= level}
        assert not above, f"importing kiln.{room} loaded {above}"


def test_help_shows_examples():
    result = run_kiln("--help")
    assert result.returncode == 0
    assert "kiln export digits --out" in result.stdout
    result = run_kiln("export", "--help")
    assert result.returncode == 0
    assert "examples:" in result.stdout and "--variants" in result.stdout
