"""The worker package's layers: flow code never imports the link or ZeroMQ, and no module of
tunio/worker/ imports another in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

from tunio.worker import tcp as tcp_module


def worker_imports() -> dict[str, set[str]]:
    """Every module of tunio/worker/ and the modules it imports."""
    package = Path(tcp_module.__file__).parent
    found: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[path.stem] = names
    return found


def test_flow_code_never_imports_the_link_or_zmq() -> None:
    imports = worker_imports()
    flow_code = set(imports) - {"__init__", "link", "handshake"}
    assert {"credit", "datagram", "dial", "flow", "opening", "stats", "tcp"} <= flow_code
    for name in flow_code:
        banned = {m for m in imports[name] if m.split(".")[0] == "zmq" or m == "tunio.worker.link"}
        assert not banned, f"tunio.worker.{name} imports {banned}"


def test_the_worker_modules_import_each_other_without_cycles() -> None:
    imports = worker_imports()
    inside = {name: {m.rsplit(".", 1)[1] for m in names if m.startswith("tunio.worker.")}
              for name, names in imports.items()}  # fmt: skip
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for other in inside[name]:
            visit(other, (*path, name))
        done.add(name)

    for name in inside:
        visit(name, ())
