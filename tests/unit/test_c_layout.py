"""The C stack's layout (csrc/): each module behind its own header, no include cycle and no call
cycle between files, stack.c on top, and a worker link that knows no flows. Read from the sources
(comments stripped), so it needs no compiler: a call is a `tunio_*(` name that another file
defines."""

from __future__ import annotations

import re
from pathlib import Path

CSRC = Path(__file__).resolve().parents[2] / "csrc"

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)
_STRING = re.compile(r'"(?:\\.|[^"\\\n])*"')
_INCLUDE = re.compile(r'^#include "([^"]+)"', re.MULTILINE)
# A definition of an exported function: return type and name at the start of a line, parameters,
# then the body's brace (this style puts it on the next line). Static functions are the file's own.
_DEFINITION = re.compile(r"^(?!static\b)(?:[\w*]+[ \t*]+)+\**(tunio_\w+)\(([^;{}]*)\)\s*\{", re.M)
_CALL = re.compile(r"\b(tunio_[a-z0-9_]+)\s*\(")


def _code(path: Path) -> str:
    return _COMMENT.sub(" ", path.read_text())


def _includes() -> dict[str, set[str]]:
    return {
        p.name: {h for h in _INCLUDE.findall(_code(p)) if (CSRC / h).exists()}
        for p in sorted(CSRC.glob("*.[ch]"))
    }


def _calls() -> dict[str, set[str]]:
    sources = sorted(CSRC.glob("*.c"))
    owner: dict[str, str] = {}
    for p in sources:
        for name, _ in _DEFINITION.findall(_code(p)):
            owner[name] = p.name
    graph: dict[str, set[str]] = {}
    for p in sources:
        code = _STRING.sub('""', _code(p))
        graph[p.name] = {
            owner[n] for n in _CALL.findall(code) if n in owner and owner[n] != p.name
        }
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a path, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(graph.get(node, ())):
            found = visit(nxt, [*path, node])
            if found:
                return found
        done.add(node)
        return None

    for node in sorted(graph):
        found = visit(node, [])
        if found:
            return found
    return None


def test_the_scan_sees_the_calls_we_know_of() -> None:
    """The scan is not blind: stack.c creates the flows, the flows send through the link,
    the link creates the ZAP handler."""
    calls = _calls()
    assert "flows.c" in calls["stack.c"]
    assert "link.c" in calls["flows.c"]
    assert "zap.c" in calls["link.c"]
    assert "flows.h" in _includes()["stack.c"]


def test_no_include_cycle() -> None:
    assert _cycle(_includes()) is None


def test_no_call_cycle_between_files() -> None:
    assert _cycle(_calls()) is None


def test_stack_c_is_on_top() -> None:
    callers = sorted(f for f, callees in _calls().items() if "stack.c" in callees)
    assert not callers, f"these call into stack.c: {callers}"


def test_the_link_knows_no_flows() -> None:
    """The link hands messages and lost workers to its owner instead of calling flows or udp."""
    callees = _calls()["link.c"]
    assert not callees & {"flows.c", "udp.c", "reader.c", "stack.c"}, sorted(callees)


def test_no_header_shared_by_every_part() -> None:
    assert not (CSRC / "stack_internal.h").exists()
    for c in sorted(CSRC.glob("*.c")):
        header = c.with_suffix(".h")
        if header.exists():
            assert header.name in _includes()[c.name], f"{c.name} does not include {header.name}"
