"""Credit accounting of one flow, both ways (docs/protocol.md, "Credit" and "UDP sessions").

Pure: no sockets and no messages. The flow tables ask it how much they may send, whether DATA from
the stack fits the window, and when credit is due back; they do the I/O. A TCP flow *is* a
`Credit` (tunio.worker.tcp.Flow subclasses it), so the data path reads these counters without an
object in between.
"""

from __future__ import annotations


class Credit:
    """A TCP flow's credit, in bytes.

    Towards the stack: `credit` is what we may still send as DATA (OPEN's window, plus what the
    stack has returned since). Towards the destination: the stack may have `window` bytes (OPEN_OK's
    arg) that we have not returned; `held` of them are here (queued or written on), and of those
    `uncredited` are written on, so their credit can go back.
    """

    __slots__ = ("credit", "due_at", "held", "uncredited", "window")

    def __init__(self, credit: int, window: int) -> None:
        self.credit = credit
        self.window = window
        self.held = 0
        self.uncredited = 0
        # Credit below this is held back and carried on the flow's next DATA (its arg), while
        # the flow can still carry it (we have not sent FIN): a request/response exchange then
        # costs one message each way, not two. The stack is never stalled by it: with nothing
        # queued here, what we hold is under a quarter of the window, so it has three quarters
        # left to send.
        self.due_at = max(1, window // 4)

    def grant(self, amount: int) -> None:
        """The stack returned `amount` bytes (CREDIT, or carried on its DATA)."""
        self.credit += amount

    def accept(self, size: int) -> bool:
        """DATA of `size` bytes came from the stack: False if it goes beyond the window (the
        stack broke the protocol; nothing is counted then)."""
        held = self.held + size
        if held > self.window:
            return False
        self.held = held
        return True

    def written(self, size: int) -> bool:
        """A DATA of `size` bytes from the stack was written on whole to the destination (a part
        written holds its buffer, and so its credit): True if a CREDIT is due now (a quarter
        window held back, or any at all after our FIN)."""
        self.uncredited += size
        return self.uncredited >= self.due_at

    def release(self) -> int:
        """The credit held back, returned now (as CREDIT); 0 if there is none."""
        amount = self.uncredited
        self.uncredited = 0
        self.held -= amount
        return amount

    def sent(self, size: int) -> int:
        """`size` bytes go to the stack as DATA: spends our credit and returns the credit that
        DATA carries (its arg: all that is held back)."""
        self.credit -= size
        carried = self.uncredited
        if carried:
            self.uncredited = 0
            self.held -= carried
        return carried

    def fin_sent(self) -> int:
        """We say FIN: no DATA will carry credit any more, so from now on every byte written is
        due at once. Returns what is held back, to go as CREDIT before the FIN."""
        self.due_at = 1
        return self.release()


class DatagramCredit:
    """A datagram session's credit, in datagrams: either side may have `window` DGRAMs that the
    other has not returned. A datagram without credit is dropped, never queued."""

    __slots__ = ("credit", "inflight", "uncredited", "window")

    def __init__(self, window: int) -> None:
        self.window = window
        self.credit = window  # replies we may still send to the stack
        self.inflight = 0  # DGRAMs from the stack not yet returned as CREDIT
        self.uncredited = 0  # of those, the ones we are done with (sent on or dropped)

    def grant(self, amount: int) -> None:
        """The stack returned `amount` datagrams."""
        self.credit += amount

    def accept(self) -> bool:
        """A DGRAM came from the stack: False if it is beyond the window the stack was given (it
        is dropped, and not ours to credit, so not counted in flight)."""
        if self.inflight >= self.window:
            return False
        self.inflight += 1
        return True

    def done(self) -> None:
        """One of the stack's datagrams was sent on, or dropped: its credit may go back (the
        stack's window counts DGRAMs sent, so a dropped one is returned too)."""
        self.uncredited += 1

    def release(self) -> int:
        """The datagrams to return now (as CREDIT); 0 if none."""
        amount = self.uncredited
        self.uncredited = 0
        self.inflight -= amount
        return amount

    def spend(self) -> bool:
        """A reply is to go to the stack: False if there is no credit for it (it is dropped)."""
        if self.credit <= 0:
            return False
        self.credit -= 1
        return True
