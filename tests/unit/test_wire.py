"""The protocol codec against the golden frames shared with the C codec."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest
import zmq

from tunio import wire
from tunio.wire import AddressBlock, Cmd, Message

GOLDEN = json.loads((Path(__file__).parents[1] / "golden" / "frames.json").read_text())
MESSAGES: list[dict[str, Any]] = GOLDEN["messages"]
INVALID: list[dict[str, Any]] = GOLDEN["invalid"]


def frames_of(vector: dict[str, Any]) -> list[bytes]:
    return [bytes.fromhex(f) for f in vector["frames"]]


def block_of(address: dict[str, Any]) -> AddressBlock:
    return AddressBlock(
        proto=address["proto"],
        version=address["version"],
        src=ipaddress.ip_address(address["src"]),
        src_port=address["src_port"],
        dst=ipaddress.ip_address(address["dst"]),
        dst_port=address["dst_port"],
    )


def test_golden_file_covers_the_protocol() -> None:
    assert GOLDEN["protocol_version"] == wire.VERSION == 2
    assert {v["cmd"] for v in MESSAGES} == {c.name for c in Cmd}
    opens = [v for v in MESSAGES if v["cmd"] == "OPEN"]
    assert {v["address"]["version"] for v in opens} == {4, 6}
    assert any(v["flow"] == wire.MAX_FLOW for v in MESSAGES)
    assert any(v["arg"] == wire.MAX_ARG for v in MESSAGES)
    assert {v["rule"] for v in INVALID} == set(GOLDEN["rules"])
    assert all(v["reason"] for v in INVALID)


@pytest.mark.parametrize("vector", MESSAGES, ids=lambda v: v["name"])
def test_golden_decodes(vector: dict[str, Any]) -> None:
    msg = wire.decode(frames_of(vector))
    assert msg.cmd is Cmd[vector["cmd"]]
    assert int(msg.cmd) == vector["cmd_code"]
    assert msg.flow == vector["flow"]
    assert msg.arg == vector["arg"]
    assert msg.flags == vector.get("flags", 0)  # HELLO's features; ignored elsewhere
    expected = vector["payload_hex"]
    if expected is None:
        assert msg.payload is None
    else:
        assert msg.payload is not None
        assert bytes(msg.payload) == bytes.fromhex(expected)
    if "address" in vector:
        assert msg.payload is not None
        assert AddressBlock.unpack(msg.payload) == block_of(vector["address"])
    if "datagram_hex" in vector:
        assert msg.payload is not None
        assert bytes(msg.payload[wire.ADDRESS.size :]) == bytes.fromhex(vector["datagram_hex"])


@pytest.mark.parametrize("vector", MESSAGES, ids=lambda v: v["name"])
def test_golden_encodes(vector: dict[str, Any]) -> None:
    payload = None if vector["payload_hex"] is None else bytes.fromhex(vector["payload_hex"])
    if "address" in vector:
        # the payload must be what the address block packs to (plus the datagram for DGRAM)
        assert payload is not None
        packed = block_of(vector["address"]).pack()
        assert packed + bytes.fromhex(vector.get("datagram_hex", "")) == payload
    frames = wire.encode(
        Message(Cmd[vector["cmd"]], vector["flow"], vector["arg"], payload, vector.get("flags", 0))
    )
    if vector["canonical"]:
        assert [bytes(f) for f in frames] == frames_of(vector)
    else:
        # not canonical: only the reserved header bytes differ (sent as zero)
        assert bytes(frames[0])[:2] + bytes(frames[0])[4:] == (
            frames_of(vector)[0][:2] + frames_of(vector)[0][4:]
        )
        assert bytes(frames[0])[2:4] == b"\0\0"


@pytest.mark.parametrize("vector", INVALID, ids=lambda v: v["name"])
def test_invalid_frames_are_rejected(vector: dict[str, Any]) -> None:
    with pytest.raises(wire.RemoteProtocolError) as info:
        wire.decode(frames_of(vector))
    assert info.value.rule == vector["rule"]
    assert isinstance(info.value, ValueError)
    if vector["rule"] == "version":
        assert isinstance(info.value, wire.VersionError)
        assert info.value.version == frames_of(vector)[0][0]


@pytest.mark.parametrize(
    "vector", GOLDEN["invalid_address_blocks"], ids=lambda v: v["name"]
)
def test_invalid_address_blocks_are_rejected(vector: dict[str, Any]) -> None:
    with pytest.raises(wire.RemoteProtocolError):
        AddressBlock.unpack(bytes.fromhex(vector["hex"]))


def test_version_is_checked_before_header_size() -> None:
    with pytest.raises(wire.VersionError):
        wire.decode([bytes([wire.VERSION + 1]) + bytes(30)])


SESSION = {Cmd.HELLO, Cmd.HEARTBEAT, Cmd.BYE, Cmd.DRAIN}


@pytest.mark.parametrize(
    ("flow", "arg"),
    [(1, 0), (1, 1), (wire.MAX_FLOW, wire.MAX_ARG), (0x01020304, 0x0102030405060708)],
)
@pytest.mark.parametrize("cmd", list(Cmd))
def test_round_trip_every_command(cmd: Cmd, flow: int, arg: int) -> None:
    flow = 0 if cmd in SESSION else flow
    block = AddressBlock(
        6, 4, ipaddress.ip_address("10.1.2.3"), 1234, ipaddress.ip_address("10.3.2.1"), 80
    )
    payload = {
        Cmd.HELLO: "wörker".encode(),
        Cmd.OPEN: block.pack(),
        Cmd.DATA: b"\x00\xff" * 100,
        Cmd.DATA_FIN: b"last bytes",
        Cmd.DGRAM: block.pack() + b"datagram",
        Cmd.NAME: b"www.tunio.test",
    }.get(cmd)
    msg = Message(cmd, flow, arg, payload, wire.FEATURE_NAMES if cmd is Cmd.HELLO else 0)
    frames = wire.encode(msg)
    assert len(frames) == (1 if payload is None else 2)
    assert len(frames[0]) == wire.HEADER.size
    assert wire.decode(frames) == msg


@pytest.mark.parametrize(
    ("src", "dst"),
    [("192.0.2.1", "198.18.0.10"), ("::1", "2001:db8::1"), ("0.0.0.0", "255.255.255.255")],
)
def test_address_block_round_trip(src: str, dst: str) -> None:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    block = AddressBlock(17, s.version, s, 0, d, 65535)
    packed = block.pack()
    assert len(packed) == 40
    assert AddressBlock.unpack(packed) == block
    assert AddressBlock.unpack(memoryview(packed + b"trailing datagram")) == block


def test_address_block_rejects_mixed_families() -> None:
    block = AddressBlock(
        6, 4, ipaddress.ip_address("10.0.0.1"), 1, ipaddress.ip_address("::1"), 2
    )
    with pytest.raises(wire.LocalProtocolError):
        block.pack()


@pytest.mark.parametrize(
    ("msg", "rule"),
    [
        (Message(Cmd.HEARTBEAT, 0, 0, b"x"), "payload-extra"),
        (Message(Cmd.DATA, 1, 0, None), "payload-missing"),
        (Message(Cmd.DATA, 1, 0, b""), "payload-size"),
        (Message(Cmd.OPEN, 1, 0, bytes(39)), "payload-size"),
        (Message(Cmd.CREDIT, wire.MAX_FLOW + 1, 0), "range"),
        (Message(Cmd.CREDIT, 1, wire.MAX_ARG + 1), "range"),
        (Message(Cmd.CREDIT, -1, 0), "range"),
        (Message(Cmd.CREDIT, 0, 1), "flow"),
        (Message(Cmd.HEARTBEAT, 1, 0), "flow"),
        (Message(Cmd.HELLO, 0, 0, b"n" * 65), "payload-size"),
        (Message(Cmd.NAME, 1, 0, b""), "payload-size"),
        (Message(Cmd.NAME, 1, 0, b"n" * 254), "payload-size"),
        (Message(Cmd.NAME, 0, 0, b"n"), "flow"),
        (Message(Cmd.OPEN, 1, 0, bytes(40), wire.FEATURE_NAMES), "flags"),
    ],
)
def test_encode_refuses_what_the_peer_would_reject(msg: Message, rule: str) -> None:
    with pytest.raises(wire.LocalProtocolError) as info:
        wire.encode(msg)
    assert info.value.rule == rule


def test_payload_is_passed_through_without_copy() -> None:
    data = bytes(range(256)) * 64
    frame = zmq.Frame(data)
    msg = wire.decode([zmq.Frame(wire.header(Cmd.DATA, 7, 0)), frame])
    assert isinstance(msg.payload, memoryview)
    assert msg.payload.obj is frame.buffer.obj  # a view of the frame's own memory
    assert bytes(msg.payload) == data
    mv = memoryview(data)
    assert wire.decode([wire.header(Cmd.DATA, 7, 0), mv]).payload is mv
    assert wire.encode(Message(Cmd.DATA, 7, 0, mv))[1] is mv


def test_decode_accepts_bytearray_and_memoryview_headers() -> None:
    head = wire.header(Cmd.CREDIT, 5, 4096)
    for frame in (bytearray(head), memoryview(head)):
        assert wire.decode([frame]) == Message(Cmd.CREDIT, 5, 4096)


# ---- the data path's decode ----------------------------------------------------------------

DATA_PATH = {Cmd.DATA, Cmd.CREDIT, Cmd.FIN, Cmd.DATA_FIN, Cmd.CREDIT_FIN, Cmd.OPEN}


def decode_flow_of(frames: list[bytes]) -> tuple[int, int, int] | None:
    assert 1 <= len(frames) <= 2
    return wire.decode_flow(frames[0], frames[1] if len(frames) == 2 else None)


@pytest.mark.parametrize("vector", MESSAGES, ids=lambda v: v["name"])
def test_decode_flow_takes_every_data_path_message_as_decode_does(
    vector: dict[str, Any],
) -> None:
    frames = frames_of(vector)
    fields = decode_flow_of(frames)
    msg = wire.decode(frames)
    if msg.cmd in DATA_PATH:
        assert fields == (int(msg.cmd), msg.flow, msg.arg)
    else:
        assert fields is None  # not the data path: decode's


@pytest.mark.parametrize(
    "vector", [v for v in INVALID if 1 <= len(v["frames"]) <= 2], ids=lambda v: v["name"]
)
def test_decode_flow_leaves_every_invalid_message_to_decode(vector: dict[str, Any]) -> None:
    assert decode_flow_of(frames_of(vector)) is None


def test_decode_flow_ignores_reserved_bytes_as_decode_does() -> None:
    head = bytearray(wire.header(Cmd.DATA, 9, 1234))
    head[2:4] = b"\xab\xcd"
    payload = memoryview(b"bytes")
    assert wire.decode_flow(memoryview(head), payload) == (int(Cmd.DATA), 9, 1234)
    assert wire.decode([bytes(head), payload]) == Message(Cmd.DATA, 9, 1234, payload)


def test_decode_flow_reads_zmq_frame_buffers() -> None:
    frames = [zmq.Frame(wire.header(Cmd.CREDIT, 3, 77))]
    assert wire.decode_flow(frames[0].buffer, None) == (int(Cmd.CREDIT), 3, 77)
    data = [zmq.Frame(wire.header(Cmd.DATA, 3, 0)), zmq.Frame(b"x")]
    assert wire.decode_flow(data[0].buffer, data[1].buffer) == (int(Cmd.DATA), 3, 0)
