"""CURVE keys for workers on other hosts (a tcp:// endpoint).

The stack holds a key pair and admits only the worker public keys it knows; workers must know
the stack's public key. `tunio-run` keeps everything in one file (mode 0600) and writes, next to
it, the file to copy to the worker hosts (`<file>.worker`: no stack secret in it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import zmq

from tunio.errors import ConfigError

_FIELDS = ("stack-public", "stack-secret", "worker-public", "worker-secret")


@dataclass(frozen=True)
class WorkerKeys:
    """What a worker needs: the stack's public key and its own key pair."""

    stack_public: str
    public: str
    secret: str


@dataclass(frozen=True)
class StackKeys:
    public: str
    secret: str
    worker: WorkerKeys


def generate() -> StackKeys:
    stack_public, stack_secret = zmq.curve_keypair()
    worker_public, worker_secret = zmq.curve_keypair()
    return StackKeys(
        stack_public.decode(),
        stack_secret.decode(),
        WorkerKeys(stack_public.decode(), worker_public.decode(), worker_secret.decode()),
    )


def _write_private(path: Path, text: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise ConfigError(f"--keys {path}: cannot create it: {exc.strerror}") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _read(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--keys {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(
            f"--keys {path}: not a key file (it holds lines such as stack-public = KEY)"
        ) from None
    if path.stat().st_mode & 0o077:
        raise ConfigError(f"--keys {path}: readable by others; chmod 600 it (it holds secrets)")
    fields: dict[str, str] = {}
    for line in text.splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            fields[name.strip()] = value.strip()
    for name, value in fields.items():
        if name in _FIELDS and len(value) != 40:
            raise ConfigError(f"--keys {path}: {name} is not a 40-character Z85 key")
    return fields


def key_files(path: Path) -> tuple[Path, Path]:
    """The stack's key file and the worker hosts' file beside it."""
    return path, path.with_name(path.name + ".worker")


def load_or_create(path: Path) -> StackKeys:
    """The stack's keys from `path`, made (with `<path>.worker`) if the file does not exist."""
    if not path.exists():
        keys = generate()
        w = keys.worker
        _write_private(path, "# tunio stack keys: keep on the stack's host\n"
                       f"stack-public = {keys.public}\nstack-secret = {keys.secret}\n"
                       f"worker-public = {w.public}\nworker-secret = {w.secret}\n")
        worker_file = key_files(path)[1]
        worker_file.unlink(missing_ok=True)
        _write_private(worker_file, "# tunio worker keys: copy to the worker hosts "
                       "(tunio-worker --keys FILE)\n"
                       f"stack-public = {w.stack_public}\nworker-public = {w.public}\n"
                       f"worker-secret = {w.secret}\n")
        return keys
    f = _read(path)
    missing = [n for n in _FIELDS if n not in f]
    if missing:
        raise ConfigError(f"--keys {path}: missing {', '.join(missing)}")
    return StackKeys(f["stack-public"], f["stack-secret"],
                     WorkerKeys(f["stack-public"], f["worker-public"], f["worker-secret"]))


def load_worker(path: Path) -> WorkerKeys:
    """A worker's keys: a `.worker` file (or the stack's own file)."""
    f = _read(path)
    missing = [n for n in ("stack-public", "worker-public", "worker-secret") if n not in f]
    if missing:
        raise ConfigError(f"--keys {path}: missing {', '.join(missing)}")
    return WorkerKeys(f["stack-public"], f["worker-public"], f["worker-secret"])
