"""The worker's credit accounting on its own (tunio/worker/credit.py): numbers in, numbers out."""

from __future__ import annotations

from tunio.worker.credit import Credit, DatagramCredit

WINDOW = 4096  # the stack's window towards us: a quarter is 1024


def test_credit_towards_the_stack_is_spent_and_granted() -> None:
    credit = Credit(1000, WINDOW)
    assert credit.credit == 1000
    assert credit.sent(600) == 0  # nothing held back to carry
    assert credit.credit == 400
    credit.grant(250)
    assert credit.credit == 650


def test_incoming_data_must_fit_the_window() -> None:
    credit = Credit(0, WINDOW)
    assert credit.accept(4000)
    assert not credit.accept(97)  # 4097 > 4096: refused, and not counted
    assert credit.held == 4000
    assert credit.accept(96)
    assert not credit.accept(1)
    assert credit.written(4096)  # all of it written on: a CREDIT is due
    assert credit.release() == 4096
    assert credit.held == 0
    assert credit.accept(WINDOW)  # the whole window again


def test_bytes_queued_and_not_written_hold_the_window() -> None:
    credit = Credit(0, WINDOW)
    assert credit.accept(3000)
    assert not credit.written(1000)  # 2000 still queued
    assert credit.release() == 1000
    assert credit.held == 2000  # only written bytes go back
    assert not credit.accept(2097)
    assert credit.accept(2096)


def test_credit_below_a_quarter_window_is_held_and_carried_on_data() -> None:
    credit = Credit(10_000, WINDOW)
    assert credit.accept(1000)
    assert not credit.written(1000)  # under 1024: held back
    assert credit.sent(50) == 1000  # carried on our next DATA...
    assert credit.sent(50) == 0  # ...once
    assert credit.held == 0
    assert credit.credit == 9900


def test_a_quarter_window_makes_credit_due() -> None:
    credit = Credit(0, WINDOW)
    assert credit.accept(2000)
    assert not credit.written(1023)
    assert credit.written(1)  # 1024: a quarter window
    assert credit.release() == 1024
    assert credit.release() == 0


def test_after_fin_every_written_byte_is_due_at_once() -> None:
    credit = Credit(0, WINDOW)
    assert credit.accept(100)
    assert not credit.written(10)
    assert credit.fin_sent() == 10  # to go as CREDIT before the FIN: no DATA will carry it
    assert credit.written(1)
    assert credit.release() == 1


def test_a_tiny_window_never_holds_credit_back() -> None:
    credit = Credit(0, 3)  # a quarter of 3 bytes is 0: every byte is due
    assert credit.accept(1)
    assert credit.written(1)


def test_datagram_credit_counts_datagrams_both_ways() -> None:
    credit = DatagramCredit(3)
    assert [credit.accept() for _ in range(4)] == [True, True, True, False]
    assert credit.inflight == 3
    credit.done()
    credit.done()
    assert credit.release() == 2
    assert credit.inflight == 1
    assert credit.release() == 0
    assert credit.accept()  # room for two again
    assert credit.accept()
    assert not credit.accept()
    # replies towards the stack
    assert [credit.spend() for _ in range(4)] == [True, True, True, False]
    credit.grant(1)
    assert credit.spend()
    assert not credit.spend()
