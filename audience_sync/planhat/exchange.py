"""The HTTP layer: one request to Planhat with rate limiting, retries, the retry budget, and
the faults classified by what they prove.

Every request ends in a `Reply` (a status that is not retried: 2xx, 4xx other than 429), or a
`GaveUp` (retries or the budget spent, or delivery halted), each remembering whether any
attempt may have been applied (`in_doubt`). httpx errors never leave this module, and the
token never appears in a message, a log line or a repr: `scrub` masks every form of it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

from ..config import PlanhatSettings
from ..errors import PlanhatAuthError, PlanhatError
from ..support.redaction import basic_credentials, scrub, secret_forms
from .limits import RateLimiter, RetryBudget, parse_retry_after

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Reply:
    """A response that is not retried: 2xx, 400 and other 4xx."""

    status: int
    content: bytes
    content_type: str = ""
    in_doubt: bool = False  # an earlier attempt of this request may have been applied


@dataclass(frozen=True, slots=True)
class GaveUp:
    """No usable response: retries spent, the budget spent, or delivery stopped."""

    text: str
    in_doubt: bool = False  # some attempt left without a definite answer


@dataclass(frozen=True, slots=True)
class Fault:
    text: str
    retryable: bool = True
    retry_after: float | None = None
    in_doubt: bool = False  # the request may have reached Planhat and been applied


# Transport errors raised before a byte of the request can have been processed: the request
# definitely was not applied. Every other transport error (a read timeout, a reset while
# waiting for the answer) leaves the request in doubt.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout, httpx.UnsupportedProtocol,
             httpx.ProxyError, httpx.LocalProtocolError)  # fmt: skip


class Exchange:
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
        self._kind = token_kind(settings)
        self._sleep = sleep
        self._rng = rng
        self._limiter = RateLimiter(settings.requests_per_second, clock, sleep)
        self._budget = RetryBudget(settings.retry_budget_seconds, clock)
        self._lock = threading.Lock()
        self._token_unproven = threading.Lock()  # see _sending_slot
        self._token_accepted = False
        self.exhausted_by: str | None = None  # the fault that spent the budget
        self.halted: PlanhatError | None = None  # a rejected token or an answer proving nothing
        self.closed = False
        self._http = httpx.Client(
            base_url=settings.origin,
            headers={
                "Authorization": authorization(settings, token),
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
        return scrub(text, self._secrets)

    def request_once(self, method: str, path: str, content: bytes) -> Reply | GaveUp:
        """Send without retrying: for a request that is not idempotent (creating a field)."""
        return self.request(method, path, content, attempts=1)

    def request(self, method: str, path: str, content: bytes, attempts: int | None = None) -> Reply | GaveUp:
        """Send with retries. The result remembers whether any attempt may have been applied:
        a request retried after a timeout is in doubt even when its last attempt was refused.

        A rejected token halts the exchange and comes back as a `GaveUp` (its error is in
        `auth_error`): a delivery reports it as Outcome.stop, a read raises it."""
        attempts = attempts or self._settings.max_attempts
        fault = Fault("not sent")
        doubt = False
        for attempt in range(attempts):
            if (stop := self.stop_text()) is not None:
                return GaveUp(stop, doubt)
            self._limiter.acquire()
            try:
                with self._sending_slot():
                    if (stop := self.stop_text()) is not None:
                        return GaveUp(stop, doubt)
                    result = self._attempt(method, path, content)
                    self._token_accepted = self._token_accepted or isinstance(result, Reply)
            except PlanhatAuthError:
                if doubt:  # an earlier attempt may have been applied before the token was refused
                    return GaveUp("Planhat rejected the token", in_doubt=True)
                return GaveUp("not sent: Planhat rejected the token")
            if isinstance(result, Reply):
                return Reply(result.status, result.content, result.content_type, doubt) if doubt else result
            fault = result
            doubt = doubt or fault.in_doubt
            if not fault.retryable or attempt + 1 >= attempts:
                break
            wait = self._budget.reserve(self._backoff(attempt, fault.retry_after))
            if wait is None:
                return GaveUp(self._exhaust(fault.text), doubt)
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
            return GaveUp(fault.text, doubt)
        plural = "s" if attempts != 1 else ""
        return GaveUp(f"{fault.text} (after {attempts} attempt{plural})", doubt)

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

    def _attempt(self, method: str, path: str, content: bytes) -> Reply | Fault:
        try:
            response = self._http.request(method, path, content=content)
        except NOT_SENT as exc:
            return Fault(self.scrub(f"connection error: {type(exc).__name__}: {exc}"))
        except httpx.TimeoutException:
            return Fault(f"timeout after {self._settings.timeout_seconds:g}s", in_doubt=True)
        except httpx.TransportError as exc:
            return Fault(self.scrub(f"connection error: {type(exc).__name__}: {exc}"), in_doubt=True)
        except httpx.HTTPError as exc:  # e.g. an undecodable body: retrying will not help
            return Fault(self.scrub(f"{type(exc).__name__}: {exc}"), retryable=False, in_doubt=True)
        status = response.status_code
        if status in (401, 403):
            self._reject(status)
        if status == 429 or status >= 500:
            text = self.scrub(f"{status} {response.reason_phrase}".strip())
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            # A 5xx may come after Planhat (or a proxy in front of it) applied the change.
            return Fault(text, retry_after=retry_after, in_doubt=status >= 500)
        return Reply(status, response.content, response.headers.get("Content-Type", ""))

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


def token_kind(settings: PlanhatSettings) -> str:
    return "tenant token" if settings.transport == "segment" else "API token"


def authorization(settings: PlanhatSettings, token: str) -> str:
    if settings.transport == "segment":
        # Basic auth: the tenant token is the user name, the password is empty.
        return "Basic " + basic_credentials(token)
    return f"Bearer {token}"
