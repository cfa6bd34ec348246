"""Writes seed inputs for the fuzz targets: real SYN/ACK/FIN/RST segments, UDP, ICMP, fragments,
and golden protocol frames, so the fuzzers start from the shapes the stack really sees."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tunio.testing import packets  # noqa: E402  (after the path is set)


def packet_seeds() -> list[bytes]:
    a, d = "198.18.255.1", "198.18.0.10"
    a6, d6 = "fd00:18::1", "fd00:18:0:1::10"
    listener = (a, 4000)
    pool = "198.18.255.252"
    return [
        packets.tcp(a, 40000, d, 80, flags=packets.SYN, options=packets.SYN_OPTIONS),
        packets.tcp(a, 40000, d, 80, flags=packets.ACK | packets.PSH, seq=1001, ack=5,
                    payload=b"hello"),
        packets.tcp(a, 40000, d, 80, flags=packets.FIN | packets.ACK, seq=1006, ack=5),
        packets.tcp(a, 40000, d, 80, flags=packets.RST, seq=1006),
        packets.tcp(*listener, pool, 1024, flags=packets.SYN | packets.ACK, seq=9, ack=1001),
        packets.udp(a, 5353, d, 53, b"\x12\x34" + bytes(10)),
        packets.ipv4(a, d, packets.ICMP, bytes([8, 0, 0, 0, 0, 1, 0, 1]) + b"ping"),
        packets.ipv4(a, d, packets.TCP, bytes(24), frag=0x2000),
        packets.echo(a, d, 0x4242, 1, b"ping"),
        # IPv6: a SYN, a UDP datagram, an echo, and a SYN behind hop-by-hop and destination
        # options headers, and a fragment
        packets.tcp(a6, 40000, d6, 80, flags=packets.SYN, options=packets.SYN_OPTIONS),
        packets.udp(a6, 5353, d6, 53, b"\x12\x34" + bytes(10)),
        packets.echo(a6, d6, 7, 1, b"ping6"),
        packets.ipv6(a6, d6, packets.TCP,
                     packets.tcp(a6, 40001, d6, 81, flags=packets.SYN)[40:],
                     extensions=bytes([60, 0, 1, 4, 0, 0, 0, 0, packets.TCP, 0, 1, 4, 0, 0, 0, 0]),
                     first_next=0),
        packets.ipv6(a6, d6, packets.TCP, bytes(20),
                     extensions=bytes([packets.TCP, 0, 0, 1, 0, 0, 0, 7]), first_next=44),
        # the two fragments of one UDP datagram per family: fed in a row they reassemble
        *v4_halves(a, d),
        *v6_halves(a6, d6),
    ]


def v4_halves(a: str, d: str) -> list[bytes]:
    body = packets.udp(a, 5354, d, 53, bytes(range(40)))[20:]
    return [packets.ipv4(a, d, packets.UDP, body[:24], frag=0x2000, ident=77),
            packets.ipv4(a, d, packets.UDP, body[24:], frag=3, ident=77)]


def v6_halves(a6: str, d6: str) -> list[bytes]:
    body = packets.udp(a6, 5354, d6, 53, bytes(range(40)))[40:]
    first = struct.pack("!BBHI", packets.UDP, 0, 1, 77)
    last = struct.pack("!BBHI", packets.UDP, 0, 24, 77)
    return [packets.ipv6(a6, d6, packets.UDP, body[:24], extensions=first, first_next=44),
            packets.ipv6(a6, d6, packets.UDP, body[24:], extensions=last, first_next=44)]


def wire_seeds() -> list[bytes]:
    golden = json.loads((ROOT / "tests" / "golden" / "frames.json").read_text())
    out = []
    for case in golden["messages"]:
        frames = [bytes.fromhex(f) for f in case["frames"]]
        flag = 0x80 if len(frames) == 2 else 0
        out.append(bytes([flag | len(frames[0])]) + b"".join(frames))
    return out


def _query(name: str, qtype: int, qid: int = 0x7475, flags: int = 0x0100) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".") if p)
    return struct.pack(">HHHHHH", qid, flags, 1, 0, 0, 0) + labels + b"\0" + struct.pack(
        ">HH", qtype, 1)


def dns_seeds() -> list[bytes]:
    """Queries as resolvers send them: A, AAAA, MX, TXT, with EDNS, upper case, the root, a
    long name, another opcode, a response, and a few broken ones."""
    edns = bytes([0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0])
    a = _query("www.tunio.test", 1)
    return [
        a, _query("www.tunio.test", 28), _query("mail.tunio.test", 15),
        _query("txt.tunio.test", 16), a[:11] + b"\1" + a[12:] + edns,
        _query("WWW.Tunio.TEST", 1), _query("", 1), _query(".".join(["a" * 63] * 3), 1),
        _query("x.tunio.test", 1, flags=0x2800), _query("x.tunio.test", 1, flags=0x8180),
        a[:-3], a[:12] + b"\xc0\x0c" + a[-4:], b"\x12\x34",
    ]  # fmt: skip


def _framed(*msgs: bytes) -> bytes:
    return b"".join(struct.pack(">H", len(m)) + m for m in msgs)


def dnstcp_seeds() -> list[bytes]:
    """A cutting byte, then a TCP stream: pipelined queries (A, MX, AAAA), one alone, a FORMERR
    one, a length of 0, a response, a message cut short, upstream-like answers, a cut that
    ends a read with a length prefix, and (bit 0x40) queries for the upstream, one of another
    opcode among them, whose dial fails while they wait."""
    a, mx, aaaa = _query("www.tunio.test", 1, 1), _query("tunio.test", 15, 2), _query(
        "www.tunio.test", 28, 3)
    bad = a[:4] + b"\0\2" + a[6:]
    answer = _query("tunio.test", 15, 2, flags=0x8180)
    txt, notify = _query("txt.tunio.test", 16, 4), _query("tunio.test", 6, 5, flags=0x2000)
    return [
        b"\x01" + _framed(a, mx, aaaa), b"\x83" + _framed(a), b"\x07" + _framed(bad, a),
        b"\x00" + _framed(a) + b"\0\0", b"\x05" + _framed(answer), b"\x09" + _framed(a)[:9],
        b"\x8f" + _framed(answer, b"", answer) + b"\x01",
        # cut right after a length prefix: the message's bytes all come with the next read
        bytes.fromhex("83002000010100003b0000003100005600037777057577746e696f0474657374feff000001"),
        b"\x51" + _framed(mx, a, txt, notify, aaaa, mx), b"\xc2" + _framed(txt, notify) + mx[:5],
    ]  # fmt: skip


def main(outdir: str) -> None:
    for name, seeds in (("packet", packet_seeds()), ("wire", wire_seeds()),
                        ("dns", dns_seeds()), ("dnstcp", dnstcp_seeds())):
        corpus = Path(outdir) / f"corpus-{name}"
        corpus.mkdir(parents=True, exist_ok=True)
        for i, seed in enumerate(seeds):
            (corpus / f"seed-{i:03d}").write_bytes(seed)


if __name__ == "__main__":
    main(sys.argv[1])
