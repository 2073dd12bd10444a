"""Delivery to Planhat: the Segment-compatible webhook or the contacts bulk upsert.

`PlanhatClient.send` takes one chunk of contacts and reports, per contact, whether Planhat
accepted it. Two deliveries share one HTTP layer (`_Exchange`):

    segment    POST /dock/segment, one identify per request, several requests in flight
    endusers   PUT /endusers, up to `batch_size` contacts per request, one request at a time

The HTTP layer owns the rate limiter, retries with full-jitter backoff, Retry-After, and the
per-run retry budget. Only a rejected token raises (`PlanhatAuthError`); every other fault ends
as a `failed` entry, which the engine keeps pending for the next run. httpx errors never leave
this module, and the token never appears in a message, a log line or a repr.
"""

from __future__ import annotations

import base64
import email.utils
import json
import logging
import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, Self

import httpx
import orjson

from .config import PlanhatSettings
from .errors import PlanhatAuthError, PlanhatError

log = logging.getLogger("audience_sync.planhat")

SEGMENT_PATH = "/dock/segment"
ENDUSERS_PATH = "/endusers"
# Segment chunks are this many times the concurrency: enough to keep every worker busy, small
# enough that a crash resends little.
SEGMENT_CHUNK_FACTOR = 4
EXCERPT_CHARS = 200
# Identity fields in an error object of a bulk response, used to find the contact it names.
_IDENTITY_FIELDS = ("externalId", "email")
_ERROR_TEXT_FIELDS = ("error", "message", "msg", "reason")


@dataclass(frozen=True, slots=True)
class Contact:
    ref: str  # identity audience-sync keys on: user_id when known, else email
    user_id: str | None
    email: str | None
    name: str | None
    title: str | None
    company_id: str | None  # the company's externalId in Planhat
    values: dict[str, bool]  # audience key -> membership, one user's changes coalesced


@dataclass
class Outcome:
    accepted: list[str] = field(default_factory=list)  # refs Planhat accepted
    failed: dict[str, str] = field(default_factory=dict)  # ref -> short error; stays pending


# --- payloads -----------------------------------------------------------------------------


def build_identify(
    contact: Contact, settings: PlanhatSettings, message_id: str, timestamp: str
) -> dict[str, Any]:
    """One Segment-spec identify, as Engage sends it to Planhat's Segment destination."""
    keys = sorted(contact.values)
    traits: dict[str, Any] = {key: contact.values[key] for key in keys}
    # Identity traits are set last so they win over an audience key of the same name.
    for name, value in (
        ("email", contact.email),
        ("name", contact.name),
        ("title", contact.title),
        ("companyId", contact.company_id),
    ):
        if value is not None:
            traits[name] = value
    personas: dict[str, Any] = {"computation_class": "audience"}
    if keys:
        personas["computation_key"] = keys[0]
        personas["computation_keys"] = keys
    message: dict[str, Any] = {"type": "identify"}
    if contact.user_id is not None:
        # Segment's spec says userId; Planhat documents reading user_id. Send both.
        message["userId"] = contact.user_id
        message["user_id"] = contact.user_id
    message.update(
        traits=traits,
        context={"personas": personas},
        messageId=message_id,
        timestamp=timestamp,
        source=settings.source_marker,
    )
    return message


def build_enduser(contact: Contact) -> dict[str, Any]:
    """One item of a PUT /endusers bulk upsert; audience booleans go to custom fields."""
    # Spelled out rather than looped: a full sync builds a million of these.
    item: dict[str, Any] = {}
    if contact.user_id is not None:
        item["externalId"] = contact.user_id
    if contact.email is not None:
        item["email"] = contact.email
    if contact.name is not None:
        item["name"] = contact.name
    if contact.title is not None:
        item["title"] = contact.title
    if contact.company_id is not None:
        item["companyExternalId"] = contact.company_id
    item["custom"] = dict(contact.values)
    return item


def utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP date), or None."""
    if not value or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# --- rate limit and retry budget ----------------------------------------------------------


class _RateLimiter:
    """Spaces request starts 1/rate apart across all threads (a token bucket of one token)."""

    def __init__(self, rate: float, clock: Callable[[], float], sleep: Callable[[float], None]) -> None:
        self._interval = 1.0 / rate if rate > 0 and math.isfinite(rate) else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None
        self._lock = threading.Lock()

    def acquire(self) -> None:
        if not self._interval:
            return
        with self._lock:
            now = self._clock()
            slot = now if self._next is None else max(now, self._next)
            self._next = slot + self._interval
        if slot > now:
            self._sleep(slot - now)  # outside the lock: other threads reserve later slots


class _RetryBudget:
    """Caps the wall time the client spends waiting to retry.

    Waits in parallel threads overlap, so the budget charges the union of the waiting
    intervals, not their sum: ten workers backing off together for 2 s cost 2 s.
    """

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self._remaining = max(0.0, seconds)
        self._clock = clock
        self._covered_until = -math.inf
        self._lock = threading.Lock()

    def reserve(self, wanted: float) -> float | None:
        """The wait granted (capped by what is left), or None when nothing is left."""
        with self._lock:
            now = self._clock()
            start = max(now, self._covered_until)
            free = start - now  # already paid for by another thread's wait
            if wanted <= free:
                return wanted
            if self._remaining <= 0:
                return None
            extra = min(wanted - free, self._remaining)
            self._remaining -= extra
            self._covered_until = start + extra
            return free + extra


# --- the HTTP layer -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reply:
    """A response that is not retried: 2xx, 400 and other 4xx."""

    status: int
    content: bytes


@dataclass(frozen=True, slots=True)
class _GaveUp:
    """No usable response: retries spent, the budget spent, or delivery stopped."""

    text: str


@dataclass(frozen=True, slots=True)
class _Fault:
    text: str
    retryable: bool = True
    retry_after: float | None = None


class _Exchange:
    """Sends one request with rate limiting, retries and the retry budget."""

    def __init__(
        self,
        settings: PlanhatSettings,
        token: str,
        *,
        transport: httpx.BaseTransport | None,
        workers: int,
        sleep: Callable[[float], None],
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self._settings = settings
        self._token = token
        self._kind = _token_kind(settings)
        self._sleep = sleep
        self._rng = rng
        self._limiter = _RateLimiter(settings.requests_per_second, clock, sleep)
        self._budget = _RetryBudget(settings.retry_budget_seconds, clock)
        self._lock = threading.Lock()
        self.exhausted_by: str | None = None  # the fault that spent the budget
        self.auth_error: PlanhatAuthError | None = None
        self.closed = False
        self._http = httpx.Client(
            base_url=settings.origin,
            headers={
                "Authorization": _authorization(settings, token),
                "Content-Type": "application/json",
                "User-Agent": "audience-sync",
            },
            timeout=httpx.Timeout(settings.timeout_seconds),
            limits=httpx.Limits(max_connections=workers, max_keepalive_connections=workers),
            transport=transport,
            follow_redirects=False,
        )

    def close(self) -> None:
        self.closed = True
        self._http.close()

    def stop_text(self) -> str | None:
        """Why no further request may start, or None."""
        if self.auth_error is not None:
            return "not sent: Planhat rejected the token"
        if self.exhausted_by is not None:
            return f"retry budget spent: {self.exhausted_by}"
        if self.closed:
            return "not sent: the Planhat client was closed"
        return None

    def scrub(self, text: str) -> str:
        """Server text may echo the request; keep the token out of messages and logs."""
        return text.replace(self._token, "********") if self._token else text

    def request(self, method: str, path: str, content: bytes) -> _Reply | _GaveUp:
        attempts = self._settings.max_attempts
        fault = _Fault("not sent")
        for attempt in range(attempts):
            if (stop := self.stop_text()) is not None:
                return _GaveUp(stop)
            self._limiter.acquire()
            if (stop := self.stop_text()) is not None:
                return _GaveUp(stop)
            result = self._attempt(method, path, content)
            if isinstance(result, _Reply):
                return result
            fault = result
            if not fault.retryable or attempt + 1 >= attempts:
                break
            wait = self._budget.reserve(self._backoff(attempt, fault.retry_after))
            if wait is None:
                return _GaveUp(self._exhaust(fault.text))
            log.warning(
                "Planhat %s %s failed (%s); retry %d of %d in %.2fs",
                method,
                path,
                fault.text,
                attempt + 1,
                attempts - 1,
                wait,
            )
            self._sleep(wait)
        if not fault.retryable:
            return _GaveUp(fault.text)
        plural = "s" if attempts != 1 else ""
        return _GaveUp(f"{fault.text} (after {attempts} attempt{plural})")

    def _attempt(self, method: str, path: str, content: bytes) -> _Reply | _Fault:
        try:
            response = self._http.request(method, path, content=content)
        except httpx.TimeoutException:
            return _Fault(f"timeout after {self._settings.timeout_seconds:g}s")
        except httpx.TransportError as exc:
            return _Fault(self.scrub(f"connection error: {type(exc).__name__}: {exc}"))
        except httpx.HTTPError as exc:  # e.g. an undecodable body: retrying will not help
            return _Fault(self.scrub(f"{type(exc).__name__}: {exc}"), retryable=False)
        status = response.status_code
        if status in (401, 403):
            self._reject(status)
        if status == 429 or status >= 500:
            text = self.scrub(f"{status} {response.reason_phrase}".strip())
            return _Fault(text, retry_after=parse_retry_after(response.headers.get("Retry-After")))
        return _Reply(status, response.content)

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        base = self._settings.backoff_base_seconds
        ceiling = min(self._settings.backoff_max_seconds, base * 2.0 ** min(attempt, 60))
        return self._rng.uniform(0, ceiling)

    def _exhaust(self, fault: str) -> str:
        with self._lock:
            if self.exhausted_by is None:
                self.exhausted_by = fault
                log.warning(
                    "Planhat retry budget of %gs spent (last fault: %s); stopping delivery",
                    self._settings.retry_budget_seconds,
                    fault,
                )
        return f"retry budget spent: {fault}"

    def _reject(self, status: int) -> None:
        error = PlanhatAuthError(
            f"Planhat rejected the {self._kind} ({status}): check {self._settings.token_setting}"
        )
        with self._lock:
            if self.auth_error is None:
                self.auth_error = error
        raise error


def _token_kind(settings: PlanhatSettings) -> str:
    return "tenant token" if settings.transport == "segment" else "API token"


def _authorization(settings: PlanhatSettings, token: str) -> str:
    if settings.transport == "segment":
        # Basic auth: the tenant token is the user name, the password is empty.
        return "Basic " + base64.b64encode(f"{token}:".encode()).decode("ascii")
    return f"Bearer {token}"


def _encode(payload: Any) -> bytes:
    """Compact UTF-8 JSON. orjson: encoding was a fifth of a full sync's time with the stdlib."""
    return orjson.dumps(payload)


def _excerpt(content: bytes) -> str:
    return " ".join(content.decode("utf-8", "replace").split())[:EXCERPT_CHARS]


def _http_error(reply: _Reply, exchange: _Exchange) -> str:
    return exchange.scrub(f"HTTP {reply.status}: {_excerpt(reply.content)}")


def _outcome(results: Iterable[tuple[str, str | None]]) -> Outcome:
    """Each ref once: failed if any of its deliveries failed, else accepted."""
    pairs = list(results)
    failed: dict[str, str] = {}
    for ref, error in pairs:
        if error is not None:
            failed.setdefault(ref, error)
    accepted = [ref for ref, error in pairs if error is None and ref not in failed]
    return Outcome(accepted=list(dict.fromkeys(accepted)), failed=failed)


# --- deliveries ---------------------------------------------------------------------------


class _Delivery(Protocol):
    chunk_size: int

    def send(self, contacts: Sequence[Contact]) -> Outcome: ...

    def close(self) -> None: ...


class _SegmentDelivery:
    """One identify per POST, `concurrency` requests in flight over one connection pool."""

    def __init__(self, settings: PlanhatSettings, exchange: _Exchange, workers: int) -> None:
        self._settings = settings
        self.exchange = exchange
        self.chunk_size = SEGMENT_CHUNK_FACTOR * workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="planhat")

    def send(self, contacts: Sequence[Contact]) -> Outcome:
        timestamp = utc_timestamp()
        # messageId is fixed per contact here, so every retry of the message reuses it.
        bodies = [_encode(build_identify(c, self._settings, str(uuid.uuid4()), timestamp)) for c in contacts]
        futures = [self._pool.submit(self._deliver, body) for body in bodies]
        errors: list[str | None] = []
        for future in futures:
            try:
                errors.append(future.result())
            except PlanhatAuthError:
                # The other workers see the rejection and stop; raise once all have finished.
                errors.append("not sent: Planhat rejected the token")
        if self.exchange.auth_error is not None:
            raise self.exchange.auth_error
        return _outcome(zip((c.ref for c in contacts), errors, strict=True))

    def _deliver(self, body: bytes) -> str | None:
        reply = self.exchange.request("POST", SEGMENT_PATH, body)
        if isinstance(reply, _GaveUp):
            return reply.text
        if 200 <= reply.status < 300:
            return None
        return _http_error(reply, self.exchange)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _EndusersDelivery:
    """Bulk upserts of up to `batch_size` contacts, strictly one after another."""

    def __init__(self, settings: PlanhatSettings, exchange: _Exchange) -> None:
        self.chunk_size = max(1, settings.batch_size)
        self.exchange = exchange

    def send(self, contacts: Sequence[Contact]) -> Outcome:
        results: list[tuple[str, str | None]] = []
        for start in range(0, len(contacts), self.chunk_size):
            results.extend(self._deliver(contacts[start : start + self.chunk_size]))
        return _outcome(results)

    def _deliver(self, batch: Sequence[Contact]) -> list[tuple[str, str | None]]:
        body = _encode([build_enduser(c) for c in batch])
        reply = self.exchange.request("PUT", ENDUSERS_PATH, body)
        if isinstance(reply, _GaveUp):
            return [(c.ref, reply.text) for c in batch]
        if reply.status == 400 and len(batch) > 1:
            # Halve to isolate the items Planhat refuses; the rest still get written.
            middle = len(batch) // 2
            return self._deliver(batch[:middle]) + self._deliver(batch[middle:])
        if not 200 <= reply.status < 300:
            error = _http_error(reply, self.exchange)
            return [(c.ref, error) for c in batch]
        failed = _bulk_failures(reply, batch, self.exchange)
        return [(c.ref, failed.get(c.ref)) for c in batch]

    def close(self) -> None:
        pass


def _bulk_failures(reply: _Reply, batch: Sequence[Contact], exchange: _Exchange) -> dict[str, str]:
    """ref -> error for the items a 2xx bulk response names as not written.

    An error that names no contact of the batch fails the whole batch: resending is safe.
    """
    try:
        data = json.loads(reply.content) if reply.content.strip() else None
    except ValueError:
        data = None
    errors = _error_items(data)
    if not errors:
        if reply.status == 206:
            return {c.ref: "HTTP 206 without error details" for c in batch}
        return {}
    by_id: dict[str, list[str]] = {}
    by_email: dict[str, list[str]] = {}
    for contact in batch:
        if contact.user_id is not None:
            by_id.setdefault(contact.user_id, []).append(contact.ref)
        if contact.email is not None:
            by_email.setdefault(contact.email.casefold(), []).append(contact.ref)
    failed: dict[str, str] = {}
    for error in errors:
        text = exchange.scrub(_error_text(error))
        refs = _refs_named(error, by_id, by_email)
        if not refs:
            whole = f"partial failure not attributable to a contact: {text}"
            return {c.ref: whole for c in batch}
        for ref in refs:
            failed.setdefault(ref, text)
    return failed


def _error_items(data: object) -> list[object]:
    """Every entry of the response's *Errors fields (createdErrors, permissionErrors, ...)."""
    if not isinstance(data, dict):
        return []
    items: list[object] = []
    for key, value in data.items():
        if not key.endswith("Errors") or not value:
            continue
        items.extend(value if isinstance(value, list) else [value])
    return items


def _refs_named(error: object, by_id: dict[str, list[str]], by_email: dict[str, list[str]]) -> list[str]:
    refs: list[str] = []
    for name, value in _identities(error):
        if name == "externalId":
            refs.extend(by_id.get(value, ()))
        else:
            refs.extend(by_email.get(value.casefold(), ()))
    return list(dict.fromkeys(refs))


def _identities(node: object, depth: int = 0) -> Iterator[tuple[str, str]]:
    """(field, value) for externalId/email at the top of an error object or nested in it."""
    if depth > 4:
        return
    if isinstance(node, dict):
        for name in _IDENTITY_FIELDS:
            value = node.get(name)
            if isinstance(value, str | int) and not isinstance(value, bool):
                yield name, str(value)
        children: Iterator[object] = iter(node.values())
    elif isinstance(node, list):
        children = iter(node)
    else:
        return
    for child in children:
        if isinstance(child, dict | list):
            yield from _identities(child, depth + 1)


def _error_text(error: object) -> str:
    if isinstance(error, dict):
        for name in _ERROR_TEXT_FIELDS:
            value = error.get(name)
            if isinstance(value, str) and value.strip():
                return " ".join(value.split())[:EXCERPT_CHARS]
    if isinstance(error, str):
        return " ".join(error.split())[:EXCERPT_CHARS]
    return json.dumps(error, separators=(",", ":"), default=str)[:EXCERPT_CHARS]


# --- the client ---------------------------------------------------------------------------


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
                f"no Planhat {_token_kind(settings)} configured: set {settings.token_setting}"
            )
        token = settings.token.reveal()
        if not token or not all("!" <= char <= "~" for char in token):
            # h11 would refuse it with the header value (the token) in its message.
            raise PlanhatAuthError(
                f"the Planhat {_token_kind(settings)} has spaces, line breaks or non-ASCII "
                f"characters: check {settings.token_setting}"
            )
        try:
            origin = httpx.URL(settings.origin)
        except httpx.InvalidURL:
            raise PlanhatError("planhat.base_url is not a valid URL") from None
        port = f":{origin.port}" if origin.port else ""
        self._where = f"{origin.scheme}://{origin.host}{port}"  # never userinfo
        self._transport_name = settings.transport
        segment = settings.transport == "segment"
        # Bulk upserts run one after another: one worker, one connection.
        workers = max(1, settings.concurrency) if segment else 1
        self._exchange = _Exchange(
            settings,
            token,
            transport=transport,
            workers=workers,
            sleep=sleep,
            clock=clock,
            rng=rng or random.Random(),
        )
        self._delivery: _Delivery = (
            _SegmentDelivery(settings, self._exchange, workers)
            if segment
            else _EndusersDelivery(settings, self._exchange)
        )
        self.chunk_size: int = self._delivery.chunk_size

    @property
    def exhausted(self) -> bool:
        """True once the retry budget is spent: send no more in this run."""
        return self._exchange.exhausted_by is not None

    def send(self, contacts: Sequence[Contact]) -> Outcome:
        """Deliver one chunk; every contact ends in `accepted` or `failed`, once.

        Raises PlanhatAuthError when Planhat rejects the token (now or earlier in this run).
        """
        if self._exchange.auth_error is not None:
            raise self._exchange.auth_error
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
        return f"PlanhatClient(transport={self._transport_name!r}, origin={self._where!r})"
