"""The one errno translator: each boundary's errno becomes its layer's exception with a hint."""

from __future__ import annotations

import errno

import pytest

from tunio.errors import StackError, TunError, check, describe, from_errno


def test_a_count_passes_through() -> None:
    assert check(0, StackError, "x") == 0
    assert check(7, StackError, "x") == 7


@pytest.mark.parametrize(
    ("err", "words"),
    [
        (errno.EPERM, "needs CAP_NET_ADMIN"),
        (errno.EACCES, "needs CAP_NET_ADMIN"),
        (errno.ENOENT, "modprobe tun"),
        (errno.EINVAL, "multi-queue TUN device that can take 3 queue(s): delete it"),
        (errno.EBUSY, "another program holds the queues"),
    ],
)
def test_tun_errors_say_what_to_do(err: int, words: str) -> None:
    with pytest.raises(TunError) as caught:
        check(-err, TunError, "cannot open TUN device t0", "tun", name="t0", queues=3)
    assert caught.value.errno == err
    assert describe(caught.value).startswith("cannot open TUN device t0: ")
    assert words in describe(caught.value)


def test_stack_errors_name_the_addresses() -> None:
    exc = from_errno(StackError, errno.EADDRNOTAVAIL, "cannot start the stack", "stack",
                     addresses="198.18.0.1")  # fmt: skip
    assert isinstance(exc, StackError)
    assert exc.errno == errno.EADDRNOTAVAIL
    assert "198.18.0.1: not an address of this host yet" in str(exc)


def test_an_errno_without_a_hint_says_only_what_failed() -> None:
    exc = from_errno(StackError, errno.ENOMEM, "stack loop", "stack")
    assert exc.strerror == "stack loop: Cannot allocate memory"


def test_a_missing_fact_leaves_the_hint_out() -> None:
    exc = from_errno(TunError, errno.EINVAL, "cannot open TUN device", "tun")
    assert exc.strerror == "cannot open TUN device: Invalid argument"
