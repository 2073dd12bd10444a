"""Delivery to Planhat: the Segment-compatible webhook or the contacts bulk upsert.

`PlanhatClient.send` takes one chunk of contacts and reports, per contact, whether Planhat
accepted it. Two deliveries share one HTTP layer (`exchange.Exchange`):

    segment    POST /dock/segment, one message per request, several in flight (segment.py)
    endusers   PUT /endusers (PUT /companies for account-level keys), up to `batch_size`
               items per request, one request at a time (bulk.py)

Account-level keys go to PUT /companies on either transport (Planhat's /dock/segment ignores
group calls): on `segment` they get a client of their own, built on
`PlanhatSettings.for_companies` (the API token).

The HTTP layer owns the rate limiter, retries with full-jitter backoff, Retry-After, and the
per-run retry budget. Every contact of a chunk ends in exactly one of three outcomes:

    accepted   Planhat confirmed it (a 2xx of the documented shape, not named as an error)
    failed     Planhat definitely did not write it (4xx, 429, refused connection, not sent)
    in doubt   sent, but no definite answer: a timeout or reset after the request left, a 5xx,
               an answer that proves nothing (HTML, empty, not the bulk JSON shape); Planhat
               may or may not hold it

A fault that makes further sending pointless (a rejected token, an answer that proves nothing)
is reported as `Outcome.stop`, after the chunk's outcomes are known, so the engine can
acknowledge what did happen before it ends the run. httpx errors never leave this module, and
the token never appears in a message, a log line or a repr.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Protocol, Self

import httpx

from ..config import PlanhatSettings
from ..errors import PlanhatAuthError, PlanhatError
from .bulk import BulkDelivery
from .exchange import Exchange, token_kind
from .outcome import Outcome
from .payloads import Contact
from .segment import SegmentDelivery


class Delivery(Protocol):
    """A delivery mode: the segment webhook or the bulk upsert."""

    chunk_size: int

    def send(self, contacts: Sequence[Contact]) -> Outcome: ...

    def close(self) -> None: ...


class PlanhatClient:
    """Delivers contacts to Planhat. One client per run; use it as a context manager."""

    def __init__(
        self,
        settings: PlanhatSettings,
        *,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if settings.token is None:
            raise PlanhatAuthError(
                f"no Planhat {token_kind(settings)} configured: set {settings.token_setting}"
            )
        token = settings.token.reveal()
        if not token or not all("!" <= char <= "~" for char in token):
            # h11 would refuse it with the header value (the token) in its message.
            raise PlanhatAuthError(
                f"the Planhat {token_kind(settings)} has spaces, line breaks or non-ASCII "
                f"characters: check {settings.token_setting}"
            )
        try:
            httpx.URL(settings.origin)
        except httpx.InvalidURL:
            raise PlanhatError("planhat.base_url is not a valid URL") from None
        self._transport_name = settings.transport
        segment = settings.transport == "segment"
        # Bulk upserts run one after another: one worker, one connection.
        workers = max(1, settings.concurrency) if segment else 1
        self._exchange = Exchange(
            settings,
            token,
            transport=transport,
            workers=workers,
            sleep=sleep,
            clock=clock,
            rng=rng or random.Random(),
        )
        self._delivery: Delivery = (
            SegmentDelivery(settings, self._exchange, workers)
            if segment
            else BulkDelivery(settings, self._exchange)
        )
        self.chunk_size: int = self._delivery.chunk_size

    @property
    def exhausted(self) -> bool:
        """True once the retry budget is spent: send no more in this run."""
        return self._exchange.exhausted_by is not None

    def send(self, contacts: Sequence[Contact]) -> Outcome:
        """Deliver one chunk; every contact ends in `accepted` or `failed` (some of those in
        doubt), once. `Outcome.stop` says why the run must end after this chunk.

        Raises when delivery was already stopped earlier in this run (nothing is sent).
        """
        if self._exchange.halted is not None:
            raise self._exchange.halted
        if self._exchange.closed:
            raise PlanhatError("the Planhat client is closed")
        if not contacts:
            return Outcome()
        return self._delivery.send(contacts)

    def close(self) -> None:
        if self._exchange.closed:
            return
        self._exchange.closed = True  # workers still queued stop before sending
        self._delivery.close()
        self._exchange.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"PlanhatClient(transport={self._transport_name!r}, origin={self._exchange.where('')!r})"
