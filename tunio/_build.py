"""cffi build of the C stack (``tunio._stack``). The cdef is read from the C headers themselves:
the regions of csrc/tunio.h, packet.h and wire.h between ``/* cffi:begin */`` and
``/* cffi:end */`` (comments stripped), and every constant of csrc/defaults.h.

Set ``TUNIO_SANITIZE=1`` to build with AddressSanitizer and UndefinedBehaviorSanitizer (``make
asan``), ``TUNIO_DEBUG=1`` for -O0 -g.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from cffi import FFI

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# The headers whose declarations cffi binds: the public API, and the internals the unit tests
# drive directly (packet parser, builders and checksum check; wire codec). What cffi sees is each
# header's own text between its markers, so the binding cannot drift from the C.
CDEF_HEADERS = ("tunio.h", "packet.h", "wire.h")
_REGION = re.compile(r"/\*\s*cffi:begin\b.*?\*/(.*?)/\*\s*cffi:end\s*\*/", re.DOTALL)
_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)


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


def _header_cdef(name: str) -> str:
    """The declarations of csrc/`name` between its cffi markers, without comments."""
    text = (CSRC / name).read_text()
    regions = _REGION.findall(text)
    begins = len(re.findall(r"/\*\s*cffi:begin\b", text))
    ends = len(re.findall(r"/\*\s*cffi:end\b", text))
    if not regions or begins != ends or begins != len(regions):
        sys.exit(f"tunio build: csrc/{name}: unbalanced or missing cffi:begin / cffi:end markers")
    body = "\n".join(_COMMENT.sub(" ", region) for region in regions)
    return f"/* csrc/{name} */\n" + "\n".join(
        line.rstrip() for line in body.splitlines() if line.strip()
    ) + "\n"


def cdef() -> str:
    """Everything cffi binds, in one string."""
    return "".join(_header_cdef(name) for name in CDEF_HEADERS) + _defaults_cdef()


def _make_ffi() -> FFI:
    ffi = FFI()
    ffi.cdef(cdef())
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
