"""The rooms of tunio/ and what each may import (docs/architecture.md): no import cycle between
modules, and no layer reaching up. Imports inside functions count too: a late import is still
an arrow."""

from __future__ import annotations

import ast
from pathlib import Path

import tunio

PACKAGE = Path(tunio.__file__).resolve().parent

# Layers from the bottom up; a module may import its own layer and those below, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    # the leaves: codec, errors, defaults (read from the C header), the C façade
    ("tunio._build", "tunio.errors", "tunio.defaults", "tunio.wire", "tunio.ports",
     "tunio.logs", "tunio.sdnotify", "tunio.process", "tunio.stack", "tunio.testing",
     "tunio.loading", "tunio.pidfile", "tunio.endpoints", "tunio.martians"),
    # dialers, and what a policy sees of a flow
    ("tunio.dialers", "tunio.policy", "tunio.owner", "tunio.rules", "tunio.keys"),
    # the worker process
    ("tunio.worker",),
    # options and the host's network
    ("tunio.settings", "tunio.config", "tunio.configfile", "tunio.tundev", "tunio.netplan",
     "tunio.bypass", "tunio.devicelock", "tunio.runtime", "tunio.reload", "tunio.wayout",
     "tunio.metrics", "tunio.cleanup", "tunio.host", "tunio.children"),
    # the supervisor, then the command lines and the package's face
    ("tunio.supervisor",),
    ("tunio.cli", "tunio"),
)  # fmt: skip


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    paths = {_module(path): path for path in PACKAGE.rglob("*.py")}
    found: dict[str, set[str]] = {}
    for name, path in paths.items():
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names if a.name.startswith("tunio"))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                if not node.module.startswith("tunio"):
                    continue
                # "from tunio import wire" imports the module tunio.wire, not the package's face;
                # "from tunio.errors import ConfigError" imports tunio.errors
                submodules = {f"{node.module}.{a.name}" for a in node.names} & set(paths)
                names |= submodules or {node.module}
        found[name] = {n for n in names if n in paths and n != name}
    return found


def _layer(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return index
    raise AssertionError(f"{module} is in no layer of docs/architecture.md: place it")


def test_every_module_has_a_layer_and_none_reaches_up() -> None:
    for module, names in _imports().items():
        own = _layer(module)
        for name in names:
            if name.startswith(module + "."):
                continue  # a package and its own modules
            up = _layer(name)
            assert up <= own, f"{module} (layer {own}) imports {name} (layer {up})"


def test_no_import_cycle() -> None:
    graph = _imports()
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for other in graph.get(name, ()):
            if other.startswith(name + ".") or name.startswith(other + "."):
                continue  # a package and its own modules
            visit(other, (*path, name))
        done.add(name)

    for name in graph:
        visit(name, ())
