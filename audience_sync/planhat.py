"""Delivery to Planhat: the Segment-compatible webhook or the contacts bulk upsert.

`PlanhatClient.send` takes one chunk of contacts and reports, per contact, whether Planhat
accepted it. Two deliveries share one HTTP layer (`_Exchange`):

    segment    POST /dock/segment, one identify per request, several requests in flight
    endusers   PUT /endusers, up to `batch_size` contacts per request, one request at a time

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

import base64
import contextlib
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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol, Self

import httpx
import orjson

from .config import API_TOKEN_ENV, PlanhatSettings
from .errors import PlanhatAuthError, PlanhatError, PlanhatUnavailable

log = logging.getLogger("audience_sync.planhat")

SEGMENT_PATH = "/dock/segment"
ENDUSERS_PATH = "/endusers"
CUSTOM_FIELDS_PATH = "/customfields"
COMPANIES_PATH = "/companies"  # account-level audiences and traits: Planhat companies
MAX_PAGE = 5000  # contacts per read page: the most Planhat's public clients are seen to get
READ_RPS = 3.0  # reads count against the same 200 calls/minute soft quota as writes
# Segment chunks are this many times the concurrency: enough to keep every worker busy, small
# enough that a crash resends little.
SEGMENT_CHUNK_FACTOR = 4
EXCERPT_CHARS = 200
# Identity fields in an error object of a bulk response, used to find the contact it names.
_IDENTITY_FIELDS = ("externalId", "email")
_ERROR_TEXT_FIELDS = ("error", "message", "msg", "reason")


@dataclass(frozen=True, slots=True)
class KeyMeta:
    """How the keys of one delivery go out; one object per run, shared by its contacts."""

    traits: frozenset[str] = frozenset()  # computed traits (computation_class "trait")
    events: frozenset[str] = frozenset()  # also sent as track events (send_as events or both)
    events_only: frozenset[str] = frozenset()  # not sent as a property (send_as events)
    account: bool = False  # the refs are Planhat company externalIds: group calls, /companies


AUDIENCES = KeyMeta()


@dataclass(frozen=True, slots=True)
class Contact:
    ref: str  # identity audience-sync keys on: user_id when known, else email
    user_id: str | None
    email: str | None
    name: str | None
    title: str | None
    company_id: str | None  # the company's externalId in Planhat
    values: dict[str, Any]  # key -> membership (audience) or value (trait), one user's changes
    meta: KeyMeta = AUDIENCES


@dataclass
class Outcome:
    accepted: list[str] = field(default_factory=list)  # refs Planhat accepted
    failed: dict[str, str] = field(default_factory=dict)  # ref -> short error; stays pending
    in_doubt: set[str] = field(default_factory=set)  # of `failed`: Planhat may have written it
    stop: PlanhatError | None = None  # ends the run once this chunk is acknowledged


# --- payloads -----------------------------------------------------------------------------


def build_identify(
    contact: Contact, settings: PlanhatSettings, message_id: str, timestamp: str
) -> dict[str, Any]:
    """One Segment-spec identify, as Engage sends it to Planhat's Segment destination."""
    meta = contact.meta
    keys = sorted(k for k in contact.values if k not in meta.events_only)
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
    personas: dict[str, Any] = {"computation_class": _computation_class(keys, meta)}
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


def _computation_class(keys: list[str], meta: KeyMeta) -> str:
    """`trait` when every key is a computed trait, else `audience` (a user's traits and
    audiences go out together in one message)."""
    return "trait" if keys and meta.traits.issuperset(keys) else "audience"


def build_track(
    contact: Contact, key: str, settings: PlanhatSettings, message_id: str, timestamp: str
) -> dict[str, Any]:
    """One Segment-spec track, as Engage sends an audience or computed trait as events:
    `Audience Entered` / `Audience Exited`, or `Trait Computed`."""
    value = contact.values[key]
    if key in contact.meta.traits:
        event, properties = "Trait Computed", {"trait_key": key, key: value}
    else:
        event = "Audience Entered" if value else "Audience Exited"
        properties = {"audience_key": key, key: bool(value)}
    message: dict[str, Any] = {"type": "track", "event": event}
    if contact.user_id is not None:
        message["userId"] = contact.user_id
        message["user_id"] = contact.user_id
    if contact.email is not None:  # identifies an email-only user, as on an identify
        message["context"] = {"traits": {"email": contact.email}}
    message.update(
        properties=properties, messageId=message_id, timestamp=timestamp, source=settings.source_marker
    )
    return message


def build_group(
    contact: Contact, settings: PlanhatSettings, message_id: str, timestamp: str
) -> dict[str, Any]:
    """One Segment-spec group call for a Planhat company (account-level audiences and traits):
    `groupId` is the company's externalId."""
    keys = sorted(contact.values)
    traits: dict[str, Any] = {key: contact.values[key] for key in keys}
    if contact.name is not None:
        traits["name"] = contact.name
    return {
        "type": "group",
        "groupId": contact.ref,
        "traits": traits,
        "context": {
            "personas": {
                "computation_class": _computation_class(keys, contact.meta),
                "computation_key": keys[0] if keys else None,
                "computation_keys": keys,
            }
        },
        "messageId": message_id,
        "timestamp": timestamp,
        "source": settings.source_marker,
    }


def build_company(contact: Contact) -> dict[str, Any]:
    """One item of a PUT /companies bulk upsert, matched on the company's externalId."""
    item: dict[str, Any] = {"externalId": contact.ref}
    if contact.name is not None:
        item["name"] = contact.name
    item["custom"] = dict(contact.values)
    return item


def build_messages(contact: Contact, settings: PlanhatSettings, timestamp: str) -> list[dict[str, Any]]:
    """Every Segment message one contact's changes make: the identify (or, for a company, the
    group call) carrying the properties, then a track per key sent as events."""
    meta = contact.meta
    if meta.account:
        return [build_group(contact, settings, str(uuid.uuid4()), timestamp)]
    messages = []
    if any(key not in meta.events_only for key in contact.values):
        messages.append(build_identify(contact, settings, str(uuid.uuid4()), timestamp))
    if meta.events:
        for key in sorted(contact.values):
            if key in meta.events:
                messages.append(build_track(contact, key, settings, str(uuid.uuid4()), timestamp))
    return messages


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
    content_type: str = ""
    in_doubt: bool = False  # an earlier attempt of this request may have been applied


@dataclass(frozen=True, slots=True)
class _GaveUp:
    """No usable response: retries spent, the budget spent, or delivery stopped."""

    text: str
    in_doubt: bool = False  # some attempt left without a definite answer


@dataclass(frozen=True, slots=True)
class _Fault:
    text: str
    retryable: bool = True
    retry_after: float | None = None
    in_doubt: bool = False  # the request may have reached Planhat and been applied


# Transport errors raised before a byte of the request can have been processed: the request
# definitely was not applied. Every other transport error (a read timeout, a reset while
# waiting for the answer) leaves the request in doubt.
_NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol,
             httpx.ProxyError, httpx.LocalProtocolError)  # fmt: skip


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
        self._secrets = secret_forms(token)
        self._kind = _token_kind(settings)
        self._sleep = sleep
        self._rng = rng
        self._limiter = _RateLimiter(settings.requests_per_second, clock, sleep)
        self._budget = _RetryBudget(settings.retry_budget_seconds, clock)
        self._lock = threading.Lock()
        self._token_unproven = threading.Lock()  # see _sending_slot
        self._token_accepted = False
        self.exhausted_by: str | None = None  # the fault that spent the budget
        self.halted: PlanhatError | None = None  # a rejected token or an answer proving nothing
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

    def where(self, path: str) -> str:
        """The URL requests go to, for messages: scheme, host, port and path, never userinfo."""
        origin = self._http.base_url
        port = f":{origin.port}" if origin.port else ""
        return f"{origin.scheme}://{origin.host}{port}{origin.path.rstrip('/')}{path}"

    @property
    def auth_error(self) -> PlanhatAuthError | None:
        return self.halted if isinstance(self.halted, PlanhatAuthError) else None

    def halt(self, error: PlanhatError) -> None:
        """No further request starts in this run; the first reason is the one reported."""
        with self._lock:
            if self.halted is None:
                self.halted = error

    def stop_text(self) -> str | None:
        """Why no further request may start, or None."""
        if self.auth_error is not None:
            return "not sent: Planhat rejected the token"
        if self.halted is not None:
            return "not sent: delivery stopped after an answer that proves nothing"
        if self.exhausted_by is not None:
            return f"retry budget spent: {self.exhausted_by}"
        if self.closed:
            return "not sent: the Planhat client was closed"
        return None

    def scrub(self, text: str) -> str:
        """Server text may echo the request; keep the token out of messages and logs."""
        return scrub_secrets(text, self._secrets)

    def request(self, method: str, path: str, content: bytes) -> _Reply | _GaveUp:
        """Send with retries. The result remembers whether any attempt may have been applied:
        a request retried after a timeout is in doubt even when its last attempt was refused.

        A rejected token halts the exchange and comes back as a `_GaveUp` (its error is in
        `auth_error`): a delivery reports it as Outcome.stop, a read raises it."""
        attempts = self._settings.max_attempts
        fault = _Fault("not sent")
        doubt = False
        for attempt in range(attempts):
            if (stop := self.stop_text()) is not None:
                return _GaveUp(stop, doubt)
            self._limiter.acquire()
            try:
                with self._sending_slot():
                    if (stop := self.stop_text()) is not None:
                        return _GaveUp(stop, doubt)
                    result = self._attempt(method, path, content)
                    self._token_accepted = self._token_accepted or isinstance(result, _Reply)
            except PlanhatAuthError:
                if doubt:  # an earlier attempt may have been applied before the token was refused
                    return _GaveUp("Planhat rejected the token", in_doubt=True)
                return _GaveUp("not sent: Planhat rejected the token")
            if isinstance(result, _Reply):
                return _Reply(result.status, result.content, result.content_type, doubt) if doubt else result
            fault = result
            doubt = doubt or fault.in_doubt
            if not fault.retryable or attempt + 1 >= attempts:
                break
            wait = self._budget.reserve(self._backoff(attempt, fault.retry_after))
            if wait is None:
                return _GaveUp(self._exhaust(fault.text), doubt)
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
            return _GaveUp(fault.text, doubt)
        plural = "s" if attempts != 1 else ""
        return _GaveUp(f"{fault.text} (after {attempts} attempt{plural})", doubt)

    @contextlib.contextmanager
    def _sending_slot(self) -> Iterator[None]:
        """Until Planhat has answered a request without refusing the token, one request at a
        time: a wrong token costs one request, not one per worker (the others, waiting here,
        then find the exchange halted). Once it has, requests go in parallel."""
        if not self._token_accepted:
            with self._token_unproven:
                if not self._token_accepted:
                    yield
                    return
        yield

    def _attempt(self, method: str, path: str, content: bytes) -> _Reply | _Fault:
        try:
            response = self._http.request(method, path, content=content)
        except _NOT_SENT as exc:
            return _Fault(self.scrub(f"connection error: {type(exc).__name__}: {exc}"))
        except httpx.TimeoutException:
            return _Fault(f"timeout after {self._settings.timeout_seconds:g}s", in_doubt=True)
        except httpx.TransportError as exc:
            return _Fault(self.scrub(f"connection error: {type(exc).__name__}: {exc}"), in_doubt=True)
        except httpx.HTTPError as exc:  # e.g. an undecodable body: retrying will not help
            return _Fault(self.scrub(f"{type(exc).__name__}: {exc}"), retryable=False, in_doubt=True)
        status = response.status_code
        if status in (401, 403):
            self._reject(status)
        if status == 429 or status >= 500:
            text = self.scrub(f"{status} {response.reason_phrase}".strip())
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            # A 5xx may come after Planhat (or a proxy in front of it) applied the change.
            return _Fault(text, retry_after=retry_after, in_doubt=status >= 500)
        return _Reply(status, response.content, response.headers.get("Content-Type", ""))

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
        self.halt(error)
        raise error


def _token_kind(settings: PlanhatSettings) -> str:
    return "tenant token" if settings.transport == "segment" else "API token"


def _authorization(settings: PlanhatSettings, token: str) -> str:
    if settings.transport == "segment":
        return _basic(token)
    return f"Bearer {token}"


def _basic(token: str) -> str:
    # Basic auth: the tenant token is the user name, the password is empty.
    return "Basic " + base64.b64encode(f"{token}:".encode()).decode("ascii")


def secret_forms(token: str) -> tuple[str, ...]:
    """Every form in which the token could be echoed back: as is, and as Basic credentials."""
    if not token:
        return ()
    encoded = _basic(token).removeprefix("Basic ")
    return tuple(dict.fromkeys((token, encoded, encoded.rstrip("="))))


def scrub_secrets(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "********")
    return text


def _encode(payload: Any) -> bytes:
    """Compact UTF-8 JSON. orjson: encoding was a fifth of a full sync's time with the stdlib."""
    return orjson.dumps(payload)


def _excerpt(content: bytes) -> str:
    return " ".join(content.decode("utf-8", "replace").split())[:EXCERPT_CHARS]


def _http_error(reply: _Reply, exchange: _Exchange) -> str:
    return exchange.scrub(f"HTTP {reply.status}: {_excerpt(reply.content)}")


@dataclass(frozen=True, slots=True)
class _Result:
    """What happened to one contact of a chunk."""

    ref: str
    error: str | None = None  # None: accepted
    in_doubt: bool = False


def _outcome(results: Iterable[_Result], stop: PlanhatError | None = None) -> Outcome:
    """Each ref once: in doubt if any of its deliveries is, else failed if any failed, else
    accepted."""
    outcome = Outcome(stop=stop)
    accepted: dict[str, None] = {}
    for result in results:
        if result.error is None:
            accepted[result.ref] = None
            continue
        outcome.failed.setdefault(result.ref, result.error)
        if result.in_doubt:
            outcome.in_doubt.add(result.ref)
    outcome.accepted = [ref for ref in accepted if ref not in outcome.failed]
    return outcome


class _Unproven(PlanhatError):
    """Planhat's answer does not prove the items were written: they are in doubt, the run stops."""


_RESENT = "the changes sent stay in doubt and are sent again on the next run"


def _unproven(reply: _Reply, where: str, exchange: _Exchange, why: str, then: str = _RESENT) -> _Unproven:
    body = _excerpt(reply.content)[:60] or "(empty)"
    content_type = reply.content_type or "no content type"
    return _Unproven(
        exchange.scrub(f"{where} answered {reply.status} ({content_type}) {why}: {body!r}; {then}")
    )


def segment_answer_proves(content_type: str, content: bytes) -> bool:
    """Whether a 2xx from the Segment endpoint counts as a delivery: JSON, as a webhook that
    processed the message answers. Planhat does not document this answer; this is the one
    place that decides it. An HTML page or an empty body (a proxy, a load balancer answering
    for a backend it never reached) proves nothing."""
    kind = _media_type(content_type)
    return (kind == "application/json" or kind.endswith("+json")) and _json_body(
        content_type, content
    ) is not _NO_JSON


_NO_JSON = object()


def _json_body(content_type: str, content: bytes) -> Any:
    """The answer's parsed JSON, or _NO_JSON when it is a web page, empty or not JSON."""
    if _media_type(content_type) in ("text/html", "application/xhtml+xml") or not content.strip():
        return _NO_JSON
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return _NO_JSON


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


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
        # messageId is fixed per message here, so every retry of the message reuses it.
        futures = [
            self._pool.submit(
                self._deliver, c.ref, _encode(build_identify(c, self._settings, str(uuid.uuid4()), timestamp))
            )
            if c.meta is AUDIENCES
            else self._pool.submit(
                self._deliver_all, c.ref, [_encode(m) for m in build_messages(c, self._settings, timestamp)]
            )
            for c in contacts
        ]
        # A rejected token halts the exchange: the other workers stop before sending.
        results = [future.result() for future in futures]
        return _outcome(results, stop=self.exchange.halted)

    def _deliver_all(self, ref: str, bodies: list[bytes]) -> _Result:
        """A contact's messages one after another (its identify before its track events); it
        is accepted when all were. After a failure the rest are not sent: the whole contact
        is resent later."""
        result = _Result(ref)
        for body in bodies:
            result = self._deliver(ref, body)
            if result.error is not None:
                return result
        return result

    def _deliver(self, ref: str, body: bytes) -> _Result:
        reply = self.exchange.request("POST", SEGMENT_PATH, body)
        if isinstance(reply, _GaveUp):
            return _Result(ref, reply.text, reply.in_doubt)
        if not 200 <= reply.status < 300:
            return _Result(ref, _http_error(reply, self.exchange), reply.in_doubt)
        if not segment_answer_proves(reply.content_type, reply.content):
            # A proxy's page, an empty answer, a maintenance page served with 2xx: it proves
            # nothing was written.
            error = _unproven(reply, self.exchange.where(SEGMENT_PATH), self.exchange, "without a JSON body")
            self.exchange.halt(error)
            return _Result(ref, str(error), in_doubt=True)
        return _Result(ref)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class _EndusersDelivery:
    """Bulk upserts of up to `batch_size` contacts, strictly one after another."""

    def __init__(self, settings: PlanhatSettings, exchange: _Exchange) -> None:
        self.chunk_size = max(1, settings.batch_size)
        self.exchange = exchange

    def send(self, contacts: Sequence[Contact]) -> Outcome:
        results: list[_Result] = []
        for start in range(0, len(contacts), self.chunk_size):
            results.extend(self._deliver(contacts[start : start + self.chunk_size]))
        return _outcome(results, stop=self.exchange.halted)

    def _deliver(self, batch: Sequence[Contact], doubt: bool = False) -> list[_Result]:
        """`doubt`: an earlier request carrying these items may have been applied. A chunk is
        all contacts or all companies (account level), never both."""
        if batch and batch[0].meta.account:
            path, body = COMPANIES_PATH, _encode([build_company(c) for c in batch])
        else:
            path, body = ENDUSERS_PATH, _encode([build_enduser(c) for c in batch])
        reply = self.exchange.request("PUT", path, body)
        if isinstance(reply, _GaveUp):
            return [_Result(c.ref, reply.text, doubt or reply.in_doubt) for c in batch]
        doubt = doubt or reply.in_doubt
        if reply.status == 400 and len(batch) > 1:
            # Halve to isolate the items Planhat refuses; the rest still get written.
            middle = len(batch) // 2
            return self._deliver(batch[:middle], doubt) + self._deliver(batch[middle:], doubt)
        if not 200 <= reply.status < 300:
            error = _http_error(reply, self.exchange)
            return [_Result(c.ref, error, doubt) for c in batch]
        data = _bulk_answer(reply)
        if data is None:
            error = _unproven(reply, self.exchange.where(path), self.exchange,
                              "without the bulk upsert's JSON counters")  # fmt: skip
            self.exchange.halt(error)
            return [_Result(c.ref, str(error), in_doubt=True) for c in batch]
        failed, unattributed = _bulk_failures(data, reply.status, batch, self.exchange)
        if unattributed is not None:  # some of the batch may have been written
            return [_Result(c.ref, unattributed, in_doubt=True) for c in batch]
        shortfall = counted_shortfall(data, len(batch), len(failed))
        return [
            _Result(c.ref, failed[c.ref], doubt)
            if c.ref in failed
            else _Result(c.ref, shortfall, in_doubt=True)
            if shortfall
            else _Result(c.ref)
            for c in batch
        ]

    def close(self) -> None:
        pass


# --- what a bulk answer proves ----------------------------------------------------------------
# Planhat documents the bulk upsert's answer as {"created": n, "updated": n, "createdErrors":
# [...], "updatedErrors": [...], "permissionErrors": [...], ...}. Its exact counting rules are
# not documented; this is the one place that reads them.

_COUNTERS = ("created", "updated")


def _bulk_answer(reply: _Reply) -> dict[str, Any] | None:
    """The answer's JSON object when it has the documented counters, else None (it proves
    nothing: HTML, empty, not JSON, or JSON of another shape)."""
    data = _json_body(reply.content_type, reply.content)
    if not isinstance(data, dict):
        return None
    if not all(
        isinstance(data.get(name), int) and not isinstance(data.get(name), bool) for name in _COUNTERS
    ):
        return None
    return data


def counted_shortfall(data: dict[str, Any], sent: int, failed: int) -> str | None:
    """Why the items not named as errors are in doubt, when the counters account for fewer
    items than were sent; None when they account for all of them."""
    created, updated = data["created"], data["updated"]
    errors = len(_error_items(data))
    accounted = created + updated + max(errors, failed)
    log.debug("bulk answer: sent %d, created %d, updated %d, errors %d", sent, created, updated, errors)
    if accounted >= sent:
        return None
    log.warning(
        "Planhat accounted for %d of %d items (created %d, updated %d, errors %d); "
        "the rest are in doubt and are sent again",
        accounted,
        sent,
        created,
        updated,
        errors,
    )
    return (
        f"Planhat accounted for {accounted} of {sent} items (created {created}, updated {updated}, "
        f"errors {errors}): in doubt"
    )


def _bulk_failures(
    data: dict[str, Any], status: int, batch: Sequence[Contact], exchange: _Exchange
) -> tuple[dict[str, str], str | None]:
    """(ref -> error for the items the answer names as not written, or the reason the whole
    batch is in doubt when an error names no contact of the batch or a 206 names none)."""
    errors = _error_items(data)
    if not errors:
        if status == 206:
            return {}, "HTTP 206 without error details"
        return {}, None
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
            return {}, f"partial failure not attributable to a contact: {text}"
        for ref in refs:
            failed.setdefault(ref, text)
    return failed, None


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


# --- reading contacts back ------------------------------------------------------------------


class PlanhatReader:
    """Pages through Planhat's contacts: `GET /endusers?limit=N&offset=M` with the API token
    (the tenant token of the segment webhook cannot read), until an empty page; a page may
    hold fewer items than asked for; and lists custom fields (`GET /customfields`). Shares the
    HTTP layer: rate limit, retries, budget."""

    def __init__(
        self,
        settings: PlanhatSettings,
        *,
        page_size: int = MAX_PAGE,
        requests_per_second: float = READ_RPS,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settings.api_token is None:
            raise PlanhatAuthError(
                f"reading Planhat's contacts needs the API token: set planhat.api_token (or {API_TOKEN_ENV})"
            )
        # Reading always authenticates like the bulk transport, at the reading rate.
        read = replace(settings, transport="endusers", max_requests_per_second=requests_per_second)
        self._page_size = max(1, min(page_size, MAX_PAGE))
        self._exchange = _Exchange(
            read, read.api_token.reveal(), transport=transport, workers=1, sleep=sleep, clock=clock,
            rng=random.Random(),
        )  # fmt: skip
        self.requests = 0

    def pages(self) -> Iterator[list[dict[str, Any]]]:
        """Every contact, a page at a time. Raises PlanhatError when a page cannot be read."""
        offset = 0
        where = self._exchange.where(ENDUSERS_PATH)
        while True:
            path = f"{ENDUSERS_PATH}?limit={self._page_size}&offset={offset}"
            reply = self._get(path, f"{where} at offset {offset}")
            if reply.status != 200:
                raise PlanhatError(
                    f"reading {where} at offset {offset}: {_http_error(reply, self._exchange)}"
                )
            page = _contact_page(reply)
            if page is None:
                raise _unproven(reply, where, self._exchange, "without a JSON array of contacts",
                                "nothing was compared or changed")  # fmt: skip
            if not page:
                return
            yield page
            offset += len(page)

    def custom_fields(self) -> list[dict[str, Any]] | None:
        """Planhat's custom field definitions (`GET /customfields`): objects with `name`, `type`
        and `parent` (the model: EndUser, Company, ...). None when Planhat answers 404 (it does
        not expose them here); PlanhatError when they cannot be read."""
        where = self._exchange.where(CUSTOM_FIELDS_PATH)
        reply = self._get(CUSTOM_FIELDS_PATH, where)
        if reply.status == 404:
            return None
        if reply.status != 200:
            raise PlanhatError(f"reading {where}: {_http_error(reply, self._exchange)}")
        fields = _contact_page(reply)  # the same shape: a JSON array of objects
        if fields is None:
            raise _unproven(reply, where, self._exchange, "without a JSON array of custom fields",
                            "nothing was checked")  # fmt: skip
        return fields

    def _get(self, path: str, what: str) -> _Reply:
        """One GET, answered with any status; raises when no answer came or the token was refused."""
        reply = self._exchange.request("GET", path, b"")
        self.requests += 1
        if isinstance(reply, _GaveUp):
            if self._exchange.auth_error is not None:
                raise self._exchange.auth_error
            raise PlanhatUnavailable(f"reading {what}: {reply.text}")
        return reply

    def close(self) -> None:
        self._exchange.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _contact_page(reply: _Reply) -> list[dict[str, Any]] | None:
    data = _json_body(reply.content_type, reply.content)
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        return None
    return data


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
            httpx.URL(settings.origin)
        except httpx.InvalidURL:
            raise PlanhatError("planhat.base_url is not a valid URL") from None
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
