"""Delivery turns: one chunk at a time across the daemon's runs, so the daemon as a whole stays
within one client's Planhat rate limit."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from ..planhat import Contact, Outcome


class Turns:
    """First come, first served: one delivery chunk at a time across the daemon's runs.

    Audiences run in parallel (a long initial sync does not hold up the others' cadence or a
    resync), but Planhat's limits are per account: each chunk is sent in turn, so the daemon
    as a whole stays within one client's rate limit and bulk calls go one after another.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._next_ticket = 0
        self._serving = 0

    def __enter__(self) -> Turns:
        with self._condition:
            ticket = self._next_ticket
            self._next_ticket += 1
            while ticket != self._serving:
                self._condition.wait()
        return self

    def __exit__(self, *exc: object) -> None:
        with self._condition:
            self._serving += 1
            self._condition.notify_all()


class TurnTakingSender:
    """A Planhat sender that waits for its turn before each chunk."""

    def __init__(self, sender: Any, turns: Turns) -> None:
        self._sender = sender
        self._turns = turns
        self.chunk_size: int = sender.chunk_size

    @property
    def exhausted(self) -> bool:
        return bool(self._sender.exhausted)

    def send(self, contacts: Sequence[Contact]) -> Outcome:
        with self._turns:
            return self._sender.send(contacts)

    def __enter__(self) -> TurnTakingSender:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._sender.__exit__(exc_type, exc, tb)
