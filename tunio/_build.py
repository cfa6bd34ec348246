"""cffi build of the C stack (``tunio._stack``): the cdef below mirrors csrc/tunio.h plus the few
internals the unit tests drive directly (packet parser, checksums, wire codec).

Set ``TUNIO_SANITIZE=1`` to build with AddressSanitizer and UndefinedBehaviorSanitizer (``make
asan``), ``TUNIO_DEBUG=1`` for -O0 -g.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

CDEF = """
struct tunio_prefix {
    uint8_t address[16];
    uint8_t version;
    uint8_t prefix_len;
};
struct tunio_config {
    const int *tun_fds;
    int n_tun_fds;
    struct tunio_prefix prefixes[2];
    int n_prefixes;
    uint16_t listen_port;
    unsigned pool_count;
    const char *endpoint;
    uint32_t window;
    uint32_t pending_ms;
    uint32_t reserve_ms;
    uint32_t heartbeat_ms;
    int log_level;
    uint32_t udp_timeout_ms;
    int vnet;
    const char *curve_secret;
    const char *curve_clients;
};
struct tunio_stats {
    uint64_t packets_read;
    uint64_t packets_written;
    uint64_t drop_truncated;
    uint64_t drop_bad_header;
    uint64_t drop_fragment;
    uint64_t drop_unsupported;
    uint64_t drop_reserved;
    uint64_t drop_unknown;
    uint64_t rst_unknown_flow;
    uint64_t nat_table_full;
    uint64_t nat_entries;
    uint64_t write_errors;
    uint64_t flows_opened;
    uint64_t flows_active;
    uint64_t dial_failed;
    uint64_t flows_reset;
    uint64_t no_worker;
    uint64_t workers;
    uint64_t workers_lost;
    uint64_t protocol_errors;
    uint64_t bytes_to_workers;
    uint64_t bytes_from_workers;
    uint64_t udp_sessions;
    uint64_t udp_sessions_opened;
    uint64_t udp_to_workers;
    uint64_t udp_from_workers;
    uint64_t udp_dropped;
};
struct tunio_stack;
int tunio_tun_open(const char *name, int queues, int vnet, int *fds);
int tunio_stack_new(const struct tunio_config *cfg, struct tunio_stack **out);
int tunio_stack_run(struct tunio_stack *s);
int tunio_stack_stop(struct tunio_stack *s);
void tunio_stack_free(struct tunio_stack *s);
void tunio_stack_stats(struct tunio_stack *s, struct tunio_stats *out);
int tunio_stack_listen_port(struct tunio_stack *s, int version);
const char *tunio_version(void);

/* internals, for tests */
struct tunio_pkt {
    uint8_t *buf;
    size_t len;
    uint8_t version;
    uint8_t proto;
    size_t l3_len;
    size_t l4_len;
    uint8_t src[16];
    uint8_t dst[16];
    uint16_t sport;
    uint16_t dport;
    uint8_t tcp_flags;
    uint32_t seq;
    uint32_t ack;
    size_t tcp_hlen;
    size_t payload_len;
    uint8_t partial_csum;
    size_t frag_data;
    size_t frag_offset;
    size_t frag_next_at;
    uint32_t frag_id;
    uint8_t frag_more;
};
int tunio_pkt_parse(struct tunio_pkt *p, uint8_t *buf, size_t len);
int tunio_pkt_verify_checksums(const struct tunio_pkt *p);
void tunio_pkt_rewrite(struct tunio_pkt *p, const uint8_t src[16], uint16_t sport,
                       const uint8_t dst[16], uint16_t dport);
int tunio_pkt_complete_csum(struct tunio_pkt *p, size_t start, size_t offset);
struct tunio_wire_header {
    uint8_t version;
    uint8_t cmd;
    uint32_t flow;
    uint64_t arg;
};
struct tunio_wire_addr {
    uint8_t proto;
    uint8_t version;
    uint16_t sport;
    uint16_t dport;
    uint8_t src[16];
    uint8_t dst[16];
};
void tunio_wire_encode_header(uint8_t out[16], uint8_t cmd, uint32_t flow, uint64_t arg);
int tunio_wire_decode(const uint8_t *hdr, size_t hdr_len, int has_payload, size_t payload_len,
                      struct tunio_wire_header *h);
void tunio_wire_encode_addr(uint8_t out[40], const struct tunio_wire_addr *a);
int tunio_wire_decode_addr(const uint8_t *in, size_t len, struct tunio_wire_addr *a);
"""


def _pkg_config(*args: str) -> list[str]:
    if shutil.which("pkg-config") is None:
        sys.exit(
            "tunio build: pkg-config is missing. On Debian/Ubuntu: "
            "apt-get install pkg-config libzmq3-dev"
        )
    try:
        out = subprocess.run(
            ["pkg-config", *args, "libzmq"], check=True, capture_output=True, text=True
        ).stdout
    except subprocess.CalledProcessError:
        sys.exit(
            "tunio build: libzmq development files not found (pkg-config libzmq failed). "
            "On Debian/Ubuntu: apt-get install libzmq3-dev"
        )
    return shlex.split(out)


def _flags() -> tuple[list[str], list[str]]:
    cflags = ["-std=c11", "-D_GNU_SOURCE", "-Wall", "-Wextra", "-Werror", "-pthread"]
    ldflags = ["-pthread"]
    if os.environ.get("TUNIO_SANITIZE"):
        san = [
            "-fsanitize=address,undefined",
            "-fno-omit-frame-pointer",
            "-fno-sanitize-recover=all",
        ]
        cflags += ["-O1", "-g", *san]
        ldflags += san
    elif os.environ.get("TUNIO_DEBUG"):
        cflags += ["-O0", "-g"]
    else:
        cflags += ["-O2", "-g"]
    return cflags, ldflags


def _defaults_cdef() -> str:
    """Every `#define NAME` of csrc/defaults.h as a cffi constant (its value from the compiler)."""
    names = [
        line.split()[1]
        for line in (CSRC / "defaults.h").read_text().splitlines()
        if line.startswith("#define ") and not line.split()[1].endswith("_H")
    ]
    return "".join(f"#define {name} ...\n" for name in names)


def _make_ffi() -> FFI:
    ffi = FFI()
    ffi.cdef(CDEF + _defaults_cdef())
    cflags, ldflags = _flags()
    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.c"))
    ffi.set_source(
        "tunio._stack",
        '#include "tunio.h"\n#include "packet.h"\n#include "wire.h"\n#include "defaults.h"\n',
        sources=sources,
        include_dirs=[str(CSRC.relative_to(ROOT))],
        extra_compile_args=cflags + _pkg_config("--cflags"),
        extra_link_args=ldflags + _pkg_config("--libs"),
    )
    return ffi


ffibuilder = _make_ffi()
