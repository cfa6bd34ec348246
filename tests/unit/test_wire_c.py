"""The C codec (csrc/wire.c) against the same golden frames as the Python codec."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from tunio._stack import ffi, lib

GOLDEN = json.loads((Path(__file__).parent.parent / "golden" / "frames.json").read_text())


def _decode(frames: list[bytes]) -> tuple[int, Any]:
    h = ffi.new("struct tunio_wire_header *")
    if not 1 <= len(frames) <= 2:
        return -errno.EPROTO, h  # the stack rejects other frame counts before decoding
    payload = frames[1] if len(frames) == 2 else b""
    rc = lib.tunio_wire_decode(frames[0], len(frames[0]), len(frames) == 2, len(payload), h)
    return rc, h


@pytest.mark.parametrize("case", GOLDEN["messages"], ids=lambda c: c["name"])
def test_c_decodes_golden_messages(case: dict[str, Any]) -> None:
    frames = [bytes.fromhex(f) for f in case["frames"]]
    rc, h = _decode(frames)
    assert rc == 0
    assert (h.cmd, h.flow, h.arg) == (case["cmd_code"], case["flow"], case["arg"])
    if "flags" in case:
        assert h.flags == case["flags"]  # HELLO's features (the link keeps them per worker)
    if case.get("canonical"):
        out = ffi.new("uint8_t[16]")
        lib.tunio_wire_encode_header_flags(
            out, case["cmd_code"], case.get("flags", 0), case["flow"], case["arg"]
        )
        assert bytes(out) == frames[0]
    if "address" in case:
        a = ffi.new("struct tunio_wire_addr *")
        assert lib.tunio_wire_decode_addr(frames[1], len(frames[1]), a) == 0
        want = case["address"]
        assert (a.proto, a.version, a.sport, a.dport) == (
            want["proto"], want["version"], want["src_port"], want["dst_port"])
        out40 = ffi.new("uint8_t[40]")
        lib.tunio_wire_encode_addr(out40, a)
        assert bytes(out40) == frames[1][:40]


@pytest.mark.parametrize("case", GOLDEN["invalid"], ids=lambda c: c["name"])
def test_c_rejects_golden_invalid_messages(case: dict[str, Any]) -> None:
    rc, _ = _decode([bytes.fromhex(f) for f in case["frames"]])
    want = -errno.EPROTONOSUPPORT if case["rule"] == "version" else -errno.EPROTO
    assert rc == want


@pytest.mark.parametrize("case", GOLDEN["invalid_address_blocks"], ids=lambda c: c["name"])
def test_c_rejects_golden_invalid_address_blocks(case: dict[str, Any]) -> None:
    raw = bytes.fromhex(case["hex"])
    a = ffi.new("struct tunio_wire_addr *")
    assert lib.tunio_wire_decode_addr(raw, len(raw), a) == -errno.EPROTO
