"""The layers: data flows one way (request -> handler -> engine -> committer ->
state machine -> store), no module imports one above it, and there are no
import circles, not even type-only ones. Checked on the source, so that an
import hidden in a function or under TYPE_CHECKING counts too."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "simplequeue"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, set[str]]:
    """Every simplequeue module and the simplequeue modules it imports."""
    found = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in found.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                imported.add(base)
                # `from simplequeue import keys` imports the module simplequeue.keys
                imported.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {m for m in imported if m in found and m != name}
    return graph


GRAPH = modules()


def under(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


@pytest.mark.parametrize(
    ("lower", "forbidden"),
    [
        ("simplequeue.objstore", ("simplequeue.state", "simplequeue.groupcommit")),
        ("simplequeue.state", ("simplequeue.groupcommit", "simplequeue.objstore")),
        ("simplequeue.groupcommit", ("simplequeue.broker", "simplequeue.client")),
        ("simplequeue.batching", ("simplequeue.broker", "simplequeue.client")),
        ("simplequeue.retrying", ("simplequeue.broker", "simplequeue.client")),
        ("simplequeue.records", ("simplequeue.broker", "simplequeue.client")),
        ("simplequeue.storeflags", ("simplequeue.broker", "simplequeue.client")),
        ("simplequeue.api", ("simplequeue.broker", "simplequeue.client")),
        (
            "simplequeue.client",
            ("simplequeue.broker", "simplequeue.groupcommit", "simplequeue.state"),
        ),
    ],
)
def test_no_module_imports_a_layer_above_it(lower: str, forbidden: tuple[str, ...]) -> None:
    everything_above = ("simplequeue.broker", "simplequeue.client", *forbidden)
    offenders = {
        f"{m} imports {i}"
        for m, imports in GRAPH.items()
        if under(m, lower)
        for i in imports
        if under(i, *everything_above) and not under(i, lower)
    }
    assert not offenders


def test_handlers_never_reach_storage_or_the_committer() -> None:
    wires = ["simplequeue.broker.http", "simplequeue.broker.page"]
    wires += [m for m in GRAPH if under(m, "simplequeue.broker.resp")]
    offenders = {
        f"{m} imports {i}"
        for m in wires
        for i in GRAPH[m]
        if under(i, "simplequeue.objstore", "simplequeue.groupcommit", "simplequeue.state")
        or i == "simplequeue.broker.server"
    }
    assert not offenders


def test_the_resp_layers_import_only_the_ones_below() -> None:
    """wire < reads < commands < connection: the wire knows no command, and the
    commands know their connection only through the Session and Listener they
    define."""
    order = ["wire", "reads", "commands", "connection"]
    offenders = {
        f"{m} imports {i}"
        for n, layer in enumerate(order)
        for m in [f"simplequeue.broker.resp.{layer}"]
        for i in GRAPH[m]
        if under(i, "simplequeue.broker.resp")
        and i.removeprefix("simplequeue.broker.resp.") not in order[:n]
    }
    assert not offenders


def test_there_are_no_import_circles() -> None:
    cycles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for i in sorted(GRAPH[m]):
            if state.get(i) == 1:
                cycles.append([*path[path.index(i) :], i])
            elif i not in state:
                visit(i)
        path.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)
    assert not cycles


def test_importing_the_sdk_imports_no_server_code_nor_its_dependencies() -> None:
    code = (
        "import sys, simplequeue.client, simplequeue.client.cli\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'aiobotocore', 'botocore', 'uvloop', 'prometheus_client', 'hiredis'} "
        "or m.startswith(('simplequeue.broker', 'simplequeue.groupcommit', 'simplequeue.state')))\n"
        "print(' '.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
