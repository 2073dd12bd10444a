"""The Segment-compatible webhook: one message per `POST /dock/segment`, `concurrency`
requests in flight."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from ..config import PlanhatSettings
from ..support.clock import iso_timestamp
from ..support.logs import carrying_context
from .answers import http_error, segment_answer_proves, unproven
from .endpoints import SEGMENT_PATH
from .exchange import Exchange, GaveUp
from .outcome import Outcome, Result, combine
from .payloads import AUDIENCES, Contact, build_identify, build_messages, encode

# Chunks are this many times the concurrency: enough to keep every worker busy, small enough
# that a crash resends little.
SEGMENT_CHUNK_FACTOR = 4


class SegmentDelivery:
    """One identify per POST, `concurrency` requests in flight over one connection pool."""

    def __init__(self, settings: PlanhatSettings, exchange: Exchange, workers: int) -> None:
        self._settings = settings
        self.exchange = exchange
        self.chunk_size = SEGMENT_CHUNK_FACTOR * workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="planhat")

    def send(self, contacts: Sequence[Contact]) -> Outcome:
        timestamp = iso_timestamp()
        # messageId is fixed per message here, so every retry of the message reuses it.
        futures = [
            self._pool.submit(
                carrying_context(self._deliver),
                c.ref,
                encode(build_identify(c, self._settings, str(uuid.uuid4()), timestamp)),
            )
            if c.meta is AUDIENCES
            else self._pool.submit(
                carrying_context(self._deliver_all),
                c.ref,
                [encode(m) for m in build_messages(c, self._settings, timestamp)],
            )
            for c in contacts
        ]
        # A rejected token halts the exchange: the other workers stop before sending.
        results = [future.result() for future in futures]
        return combine(results, stop=self.exchange.halted)

    def _deliver_all(self, ref: str, bodies: list[bytes]) -> Result:
        """A contact's messages one after another (its identify before its track events); it
        is accepted when all were. After a failure the rest are not sent: the whole contact
        is resent later."""
        result = Result(ref)
        for body in bodies:
            result = self._deliver(ref, body)
            if result.error is not None:
                return result
        return result

    def _deliver(self, ref: str, body: bytes) -> Result:
        reply = self.exchange.request("POST", SEGMENT_PATH, body)
        if isinstance(reply, GaveUp):
            return Result(ref, reply.text, reply.in_doubt)
        if not 200 <= reply.status < 300:
            return Result(ref, http_error(reply, self.exchange.scrub), reply.in_doubt)
        if not segment_answer_proves(reply.content_type, reply.content):
            # A proxy's page, an empty answer, a maintenance page served with 2xx: it proves
            # nothing was written.
            error = unproven(
                reply, self.exchange.where(SEGMENT_PATH), self.exchange.scrub, "without a JSON body"
            )
            self.exchange.halt(error)
            return Result(ref, str(error), in_doubt=True)
        return Result(ref)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
