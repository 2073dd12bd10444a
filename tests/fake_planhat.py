"""A fake Planhat: a real HTTP server on 127.0.0.1 for tests and benchmarks.

It serves the two delivery endpoints audience-sync uses and the contacts read endpoint, keeps
what they wrote, and lets a test script faults. Audience booleans from segment traits and from
endusers custom fields both land in `contact["custom"][key]`, so tests assert the same way for
both transports.

    POST /dock/segment   Basic auth, user name = tenant token, empty password: identify
                         (traits other than email/name/title/companyId land in `custom`; a
                         null removes the field), track (kept in `events`, per contact ref)
                         and group (traits land in the company's `custom`)
    PUT  /companies      Bearer API token; like PUT /endusers, items matched on externalId,
                         kept in `companies`
    PUT  /endusers       Bearer API token; answers created/updated and the *Errors lists
    GET  /endusers       Bearer API token; ?limit=N&offset=M (limit 100 by default, at most
                         5000, fewer when `page_cap` is set): contacts in creation order as
                         {"_id", "externalId", "email", "name", "custom"}, [] past the end
    GET  /customfields   Bearer API token; the `custom_fields` list (404 when it is None)
    POST /customfields   Bearer API token; creates a field from {"name", "type", "parent",
                         "isHidden"} (Planhat's required properties; `listValues` optional),
                         answers it with its `_id`; 400 for a missing property, an unknown
                         type, or a name its parent already has
    GET  /_state         {"contacts": n, "true": {key: n}, "false": {key: n}, "requests": n},
                         and "values": {key: n} when contacts hold other (trait) values;
                         ?applied=1 adds "applied_items": n, "applied_values": n

Faults are scripted for the next n requests, whatever their route (fail_next, delay_next,
timeout_next, reset_next, html_next, empty_next), or last until clear_faults() (always,
partial_fail, bad_items). `applied_items` counts every contact item the fake wrote, answered
or not; with `count_values` (on when bodies are kept) `applied[(ref, key, value)]` counts each
audience value written, ref being the item's externalId, else its email.

As a script (no package imports, pytest optional):

    python tests/fake_planhat.py --port 0 [--tenant-token T] [--api-token A] [--page-cap N] [--max-rps R]

`max_rps` caps the rate like Planhat's hard limit: a token bucket of R requests a second (a
second's worth of burst); a request over it is answered 429 with `Retry-After: 1`, writing
nothing, and counted in `throttled` (in `/_state?applied=1`).

prints `http://127.0.0.1:PORT` and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import gc
import json
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple, Self
from urllib.parse import parse_qs

try:
    import orjson
except ImportError:  # the stdlib is fast enough for tests, orjson for the benchmark
    orjson = None  # type: ignore[assignment]

# The tokens the fake accepts unless told others (the tests' configs use them too).
TENANT_TOKEN = "tenant-secret-token-123"
API_TOKEN = "api-secret-token-456"
SEGMENT_PATH = "/dock/segment"
ENDUSERS_PATH = "/endusers"
CUSTOM_FIELDS_PATH = "/customfields"
# Planhat's custom field types (its developers' docs, Custom Field).
FIELD_TYPES = frozenset({"number", "text", "rich text", "checkbox", "day", "date", "list", "multipicklist",
                         "team member", "team members", "rating", "phone", "email", "enduser", "endusers",
                         "url"})  # fmt: skip
COMPANIES_PATH = "/companies"
IDENTITY_TRAITS = ("email", "name", "title", "companyId")
STATE_PATH = "/_state"
MAX_BULK = 5000
MAX_PAGE = 5000  # GET /endusers answers at most this many contacts
DEFAULT_PAGE = 100  # ... and this many when no limit is given, like Planhat
ERROR_LISTS = ("createdErrors", "updatedErrors", "permissionErrors")
JSON = "application/json"
DEFAULT_HTML = (
    "<html><head><title>Welcome to nginx!</title></head><body><h1>Welcome to nginx!</h1></body></html>"
)

Body = str | bytes | dict[str, Any] | list[Any] | None


def _loads(raw: bytes) -> Any:
    return orjson.loads(raw) if orjson is not None else json.loads(raw)


def _dumps(data: Any) -> bytes:
    if orjson is not None:
        return orjson.dumps(data)
    return json.dumps(data, separators=(",", ":")).encode()


def _as_bytes(body: Body) -> bytes | None:
    if body is None or isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    return _dumps(body)


class Recorded(NamedTuple):
    method: str
    path: str
    body: Any  # the parsed JSON body (None when keep_bodies is off, it did not parse, or a GET)
    status: int  # what the fake produced; 0 for a reset that wrote nothing
    query: str = ""  # the query string of a GET
    fault: str | None = None  # the scripted fault that shaped this request, if any


@dataclass(frozen=True, slots=True)
class _Fault:
    """One scripted request.

    wait `delay` seconds; then
      mode "serve"   serve normally (status None) or answer `status`/`body`, writing nothing;
      mode "timeout" serve normally when `applied`, else answer 504, writing nothing;
      mode "reset"   serve (write) when `applied`, then close the connection without an answer.
    """

    status: int | None = None
    retry_after: str | None = None
    body: bytes | None = None
    delay: float = 0.0
    content_type: str = JSON
    mode: str = "serve"
    applied: bool = False
    name: str | None = None


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = JSON
    reset: bool = False  # close the connection without sending anything


def _json_answer(status: int, data: Any) -> _Answer:
    return _Answer(status, _dumps(data))


Route = Callable[[Any, str], _Answer]


class FakePlanhat:
    """Thread-safe fake Planhat. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        tenant_token: str = TENANT_TOKEN,
        api_token: str = API_TOKEN,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        keep_bodies: bool = True,
        count_values: bool | None = None,
        page_cap: int | None = None,
        max_rps: float | None = None,
    ) -> None:
        self.tenant_token = tenant_token
        self.api_token = api_token
        self.keep_bodies = keep_bodies
        # Per (ref, key, value) counts cost memory per contact: off for a benchmark's million.
        self.count_values = keep_bodies if count_values is None else count_values
        self.page_cap = page_cap  # GET /endusers pages hold at most this many (None: limit)
        self.max_rps = max_rps  # requests a second before a 429 (None: no cap)
        self.throttled = 0  # requests answered 429 for going over max_rps
        self._tokens = max_rps or 0.0
        self._refilled = time.monotonic()
        self._address = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.contacts: dict[str, dict[str, Any]] = {}
        self.companies: dict[str, dict[str, Any]] = {}  # externalId -> {"name", "custom"}
        self.events: list[dict[str, Any]] = []  # track calls received: {"ref", "event", "properties"}
        self.requests: list[Recorded] = []
        self.message_ids: list[str] = []  # every segment messageId received, faults included
        self.max_in_flight = 0
        self.applied_items = 0  # contact items written, whether the client saw the answer or not
        self.applied_values = 0  # custom values written (an item carries one per audience)
        self.applied: Counter[tuple[str, str, Any]] = Counter()  # (ref, key, value) -> writes
        self._in_flight = 0
        self._email_keys: dict[str, str] = {}  # email -> key of the contact holding it
        # externalId -> key of the contact it was given to after creation (matched by email)
        self._external_keys: dict[str, str] = {}
        self._order: list[str] = []  # contact keys in creation order, for GET /endusers
        self._order_stale = False
        self._ids: dict[str, int] = {}  # contact key -> _id number, given on first read
        self._next_id = 0
        self._faults: deque[_Fault] = deque()
        self._always: int | None = None
        self._partial: dict[str, tuple[str, bool]] = {}  # ref -> (error list, nested)
        self._bad: set[str] = set()
        # GET /customfields answers these ({"name", "type", "parent"}); None: 404, not exposed.
        self.custom_fields: list[dict[str, Any]] | None = []

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> Self:
        server = ThreadingHTTPServer(self._address, _Handler)
        server.daemon_threads = True
        server.block_on_close = False  # keep-alive connections must not hold up stop()
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("FakePlanhat is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Wait until no request is being served (a held timeout has written what it writes).
        False when `timeout` passed first."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    # --- fault injection --------------------------------------------------------------------

    def fail_next(
        self, n: int = 1, status: int = 503, retry_after: str | None = None, body: Body = None
    ) -> None:
        """The next n requests answer `status` (with Retry-After/body if given), writing nothing."""
        self._script(_Fault(status, retry_after, _as_bytes(body), name=f"fail {status}") for _ in range(n))

    def delay_next(self, n: int, seconds: float) -> None:
        """The next n requests wait `seconds` before being served normally (they still write)."""
        self._script(_Fault(delay=seconds, name="delay") for _ in range(n))

    def timeout_next(self, n: int = 1, applied: bool = False, seconds: float = 1.0) -> None:
        """The next n requests are held `seconds` (make it longer than the client's timeout).

        Then, when `applied`, the change is written and answered as usual (Planhat did it, the
        client had given up); otherwise nothing is written and the answer is a 504.
        """
        name = "timeout after apply" if applied else "timeout before apply"
        self._script(_Fault(delay=seconds, mode="timeout", applied=applied, name=name) for _ in range(n))

    def reset_next(self, n: int = 1, applied: bool = False) -> None:
        """The next n requests get no HTTP answer: the connection is reset. When `applied` the
        change is written first, otherwise nothing is."""
        name = "reset after apply" if applied else "reset before apply"
        self._script(_Fault(mode="reset", applied=applied, name=name) for _ in range(n))

    def html_next(
        self, n: int = 1, status: int = 200, body: str = DEFAULT_HTML, content_type: str = "text/html"
    ) -> None:
        """The next n requests answer `status` with this body (a proxy's welcome or maintenance
        page) and write nothing."""
        raw = body.encode()
        self._script(
            _Fault(status, body=raw, content_type=content_type, name=f"html {status}") for _ in range(n)
        )

    def empty_next(self, n: int = 1, status: int = 200) -> None:
        """The next n requests answer `status` with an empty body and write nothing."""
        self._script(_Fault(status, body=b"", name=f"empty {status}") for _ in range(n))

    def always(self, status: int) -> None:
        """Every request answers `status` until clear_faults()."""
        with self._lock:
            self._always = status

    def partial_fail(self, refs: Iterable[str], where: str = "updatedErrors", *, nested: bool = True) -> None:
        """PUT /endusers answers 206 and does not write these refs (externalId or email).

        Each is reported in `where` as {"item": {...ids}, "error": ...} (nested) or as
        {"externalId"/"email": ..., "error": ...} (flat). Lasts until clear_faults().
        """
        with self._lock:
            self._partial.update({ref: (where, nested) for ref in refs})

    def bad_items(self, refs: Iterable[str]) -> None:
        """Any request carrying one of these refs answers 400 and writes nothing."""
        with self._lock:
            self._bad.update(refs)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._always = None
            self._partial.clear()
            self._bad.clear()

    def scripted_faults(self) -> int:
        """How many scripted faults are still waiting for a request."""
        with self._lock:
            return len(self._faults)

    def _script(self, faults: Iterable[_Fault]) -> None:
        with self._lock:
            self._faults.extend(faults)

    # --- drift: changing Planhat behind audience-sync's back --------------------------------

    def set_value(self, ref: str, key: str, value: Any) -> None:
        """Set (True/False) or remove (None) custom field `key` on the contact `ref` (externalId
        or email). A contact that does not exist is created for a True/False value (externalId
        `ref`, or email `ref` when it holds an @); removing from a missing contact does nothing."""
        with self._lock:
            contact_key = self._key_of(ref)
            if contact_key is None:
                if value is None:
                    return
                fields = {"email": ref} if "@" in ref else {"externalId": ref}
                self._upsert(fields, {key: value})
                return
            custom = self.contacts[contact_key].setdefault("custom", {})
            if value is None:
                custom.pop(key, None)
            else:
                custom[key] = value

    def delete_contact(self, ref: str) -> bool:
        """Delete the contact `ref` (externalId or email), as someone in Planhat would; False
        when there is none."""
        with self._lock:
            contact_key = self._key_of(ref)
            if contact_key is None:
                return False
            email = self.contacts.pop(contact_key).get("email")
            self._ids.pop(contact_key, None)
            if email and self._email_keys.get(email) == contact_key:  # O(1): a benchmark deletes thousands
                del self._email_keys[email]
            self._order_stale = True
            return True

    def add_contact(
        self, external_id: str | None = None, email: str | None = None, custom: dict[str, Any] | None = None
    ) -> str:
        """Create (or merge into, like an upsert) a contact; returns its key in `contacts`."""
        if not (external_id or email):
            raise ValueError("a contact needs an externalId or an email")
        with self._lock:
            fields = {"externalId": external_id, "email": email}
            self._upsert(fields, dict(custom or {}))
            key = external_id or self._email_keys.get(email or "", email)
            assert key is not None
            return key

    def add_custom_field(self, name: str, type: str = "checkbox", parent: str = "EndUser") -> None:
        """Define a custom field, as someone would in Planhat's settings."""
        with self._lock:
            if self.custom_fields is None:
                self.custom_fields = []
            self.custom_fields.append({"_id": f"cf{len(self.custom_fields)}", "name": name,
                                       "type": type, "parent": parent})  # fmt: skip

    def _key_of(self, ref: str) -> str | None:
        """The `contacts` key of the contact that `ref` names; the caller holds the lock."""
        if ref in self.contacts:
            return ref
        key = self._external_keys.get(ref) or self._email_keys.get(ref)
        return key if key in self.contacts else None

    # --- reading the state ------------------------------------------------------------------

    def find(self, ref: str) -> dict[str, Any] | None:
        """The contact a user_id or email names, or None when Planhat has none."""
        with self._lock:
            key = self._key_of(ref)
            return None if key is None else self.contacts[key]

    def contact(self, ref: str) -> dict[str, Any]:
        """The contact a user_id or email names (a test's assertion fails when there is none)."""
        found = self.find(ref)
        assert found is not None, f"Planhat has no contact {ref!r}"
        return found

    def value(self, ref: str, key: str) -> Any:
        """The value Planhat holds for a contact's field, or None when never written."""
        found = self.find(ref)
        return None if found is None else found.get("custom", {}).get(key)

    def statuses(self) -> list[int]:
        with self._lock:
            return [r.status for r in self.requests]

    def state(self, applied: bool = True) -> dict[str, Any]:
        """What Planhat holds, in counts; with `applied`, also what the fake wrote in total."""
        with self._lock:
            true: dict[str, int] = {}
            false: dict[str, int] = {}
            values: dict[str, int] = {}  # other (computed trait) values held
            for contact in self.contacts.values():
                for key, flag in contact.get("custom", {}).items():
                    counts = true if flag is True else false if flag is False else values
                    counts[key] = counts.get(key, 0) + 1
            state: dict[str, Any] = {
                "contacts": len(self.contacts),
                "true": true,
                "false": false,
                "requests": len(self.requests),
            }
            if values:
                state["values"] = values
            if applied:
                state["applied_items"] = self.applied_items
                state["applied_values"] = self.applied_values
                state["throttled"] = self.throttled
            return state

    # --- serving ----------------------------------------------------------------------------

    def handle(self, method: str, path: str, authorization: str | None, raw: bytes) -> _Answer:
        """Answer one request; called by the handler threads."""
        path, _, query = path.partition("?")
        if method == "GET" and path == STATE_PATH:
            # The counters of writes only when asked (?applied=1): the plain answer is unchanged.
            return _json_answer(200, self.state(applied="applied" in parse_qs(query)))
        route = self._routes().get((method, path))
        if route is None:
            return _json_answer(404, {"error": f"no route {method} {path}"})
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
            over = self._over_rate()
        try:
            if over:
                answer = _Answer(429, _dumps({"error": "Too many requests"}), (("Retry-After", "1"),))
                return self._record(method, path, None, query, answer, "rate limit")
            return self._serve(method, path, query, authorization, raw, route)
        finally:
            with self._lock:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.notify_all()

    def _over_rate(self) -> bool:
        """Take a token from the max_rps bucket; True when there is none. The caller holds the lock."""
        if not self.max_rps:
            return False
        now = time.monotonic()
        self._tokens = min(self.max_rps, self._tokens + (now - self._refilled) * self.max_rps)
        self._refilled = now
        if self._tokens < 1.0:
            self.throttled += 1
            return True
        self._tokens -= 1.0
        return False

    def _routes(self) -> dict[tuple[str, str], Route]:
        return {
            ("POST", SEGMENT_PATH): self._segment,
            ("PUT", ENDUSERS_PATH): self._endusers,
            ("PUT", COMPANIES_PATH): self._companies,
            ("GET", ENDUSERS_PATH): self._list_endusers,
            ("GET", CUSTOM_FIELDS_PATH): self._list_custom_fields,
            ("POST", CUSTOM_FIELDS_PATH): self._create_custom_field,
        }

    def _serve(
        self, method: str, path: str, query: str, authorization: str | None, raw: bytes, route: Route
    ) -> _Answer:
        try:
            body = _loads(raw) if raw else None
        except ValueError:
            return self._record(method, path, None, query, _json_answer(400, {"error": "invalid JSON"}))
        if path == SEGMENT_PATH and isinstance(body, dict):
            with self._lock:
                self.message_ids.append(str(body.get("messageId")))
        fault = self._next_fault()
        if fault.delay:
            time.sleep(fault.delay)
        if fault.mode == "serve" and fault.status is not None:
            return self._record(method, path, body, query, _fault_answer(fault), fault.name)
        if fault.mode == "timeout" and not fault.applied:
            answer = _json_answer(504, {"error": "Gateway Timeout"})
            return self._record(method, path, body, query, answer, fault.name)
        if fault.mode == "reset" and not fault.applied:
            return self._record(method, path, body, query, _Answer(0, b"", reset=True), fault.name)
        if authorization != self._expected_auth(path):
            answer = _json_answer(401, {"error": "Unauthorized"})
        else:
            answer = route(body, query)
        if fault.mode == "reset":  # applied: written, then the connection dies
            self._record(method, path, body, query, answer, fault.name)
            return _Answer(answer.status, b"", reset=True)
        return self._record(method, path, body, query, answer, fault.name)

    def _next_fault(self) -> _Fault:
        with self._lock:
            if self._always is not None:
                return _Fault(self._always, name=f"always {self._always}")
            return self._faults.popleft() if self._faults else _Fault()

    def _expected_auth(self, path: str) -> str:
        if path == SEGMENT_PATH:
            return "Basic " + base64.b64encode(f"{self.tenant_token}:".encode()).decode()
        return f"Bearer {self.api_token}"

    def _record(
        self, method: str, path: str, body: Any, query: str, answer: _Answer, fault: str | None = None
    ) -> _Answer:
        kept = body if self.keep_bodies else None
        with self._lock:
            self.requests.append(Recorded(method, path, kept, answer.status, query, fault))
        return answer

    def _count(self, ref: str, custom: dict[str, Any]) -> None:
        """Count one written item; the caller holds the lock."""
        self.applied_items += 1
        self.applied_values += len(custom)
        if self.count_values:
            for key, value in custom.items():
                self.applied[(ref, key, value)] += 1

    def company_value(self, external_id: str, key: str) -> Any:
        """A company's custom field, or None when never written (or cleared)."""
        with self._lock:
            return self.companies.get(external_id, {}).get("custom", {}).get(key)

    def events_of(self, ref: str) -> list[tuple[str, dict[str, Any]]]:
        """(event, properties) of the track calls received for a contact, in order."""
        with self._lock:
            return [(e["event"], e["properties"]) for e in self.events if e["ref"] == ref]

    def _track(self, message: dict[str, Any]) -> _Answer:
        user_id = message.get("userId") or message.get("user_id")
        email = ((message.get("context") or {}).get("traits") or {}).get("email")
        if not (user_id or email) or not message.get("event"):
            return _json_answer(400, {"error": "track needs an event and userId or context.traits.email"})
        with self._lock:
            self.events.append(
                {
                    "ref": user_id or email,
                    "event": message["event"],
                    "properties": message.get("properties") or {},
                }
            )
        return _json_answer(200, {"ok": True})

    def _group(self, message: dict[str, Any]) -> _Answer:
        group_id = message.get("groupId")
        if not group_id:
            return _json_answer(400, {"error": "group has no groupId"})
        traits = message.get("traits") or {}
        custom = {k: v for k, v in traits.items() if k not in IDENTITY_TRAITS}
        with self._lock:
            self._upsert_company({"externalId": group_id, "name": traits.get("name")}, custom)
            self._count(group_id, custom)
        return _json_answer(200, {"ok": True})

    def _companies(self, items: Any, _query: str = "") -> _Answer:
        if not isinstance(items, list) or not 0 < len(items) <= MAX_BULK:
            return _json_answer(400, {"error": f"expected an array of 1 to {MAX_BULK} items"})
        if not all(isinstance(i, dict) and i.get("externalId") for i in items):
            return _json_answer(400, {"error": "every item needs externalId"})
        report: dict[str, Any] = {"created": 0, "updated": 0}
        report.update({name: [] for name in ERROR_LISTS})
        with self._lock:
            for item in items:
                if self._partial and (refused := self._partial_error(item)) is not None:
                    where, error = refused
                    report.setdefault(where, []).append(error)
                    continue
                custom = item.get("custom") or {}
                created = self._upsert_company(item, custom)
                self._count(item["externalId"], custom)
                report["created" if created else "updated"] += 1
        partial = any(report[name] for name in report if name.endswith("Errors"))
        return _json_answer(206 if partial else 200, report)

    def _upsert_company(self, fields: dict[str, Any], custom: dict[str, Any]) -> bool:
        """The caller holds the lock; a null custom value removes the field."""
        company = self.companies.get(fields["externalId"])
        created = company is None
        if company is None:
            company = self.companies[fields["externalId"]] = {
                "externalId": fields["externalId"],
                "custom": {},
            }
        if fields.get("name") is not None:
            company["name"] = fields["name"]
        _merge_custom(company["custom"], custom)
        return created

    def _segment(self, message: Any, _query: str = "") -> _Answer:
        if isinstance(message, dict) and message.get("type") == "track":
            return self._track(message)
        if isinstance(message, dict) and message.get("type") == "group":
            return self._group(message)
        if not isinstance(message, dict) or message.get("type") != "identify":
            return _json_answer(400, {"error": "expected one identify, track or group message"})
        traits = message.get("traits") or {}
        user_id = message.get("userId") or message.get("user_id")
        email = traits.get("email")
        if not (user_id or email):
            return _json_answer(400, {"error": "identify has neither userId nor traits.email"})
        with self._lock:
            bad = {user_id, email} & self._bad
        if bad:
            return _json_answer(400, {"error": "bad item"})
        fields = {
            "externalId": user_id,
            "email": email,
            "name": traits.get("name"),
            "title": traits.get("title"),
            "companyExternalId": traits.get("companyId"),
        }
        custom = {k: v for k, v in traits.items() if k not in IDENTITY_TRAITS}
        with self._lock:
            self._upsert(fields, custom)
            self._count(str(user_id or email), custom)
        return _json_answer(200, {"ok": True})

    def _endusers(self, items: Any, _query: str = "") -> _Answer:
        if not isinstance(items, list) or not 0 < len(items) <= MAX_BULK:
            return _json_answer(400, {"error": f"expected an array of 1 to {MAX_BULK} items"})
        if not all(isinstance(i, dict) and (i.get("externalId") or i.get("email")) for i in items):
            return _json_answer(400, {"error": "every item needs externalId or email"})
        with self._lock:
            bad = set(self._bad)
        if bad and any(_ref(i) in bad or i.get("email") in bad for i in items):
            return _json_answer(400, {"error": "bad item"})
        adopt = not self.keep_bodies  # a kept body must not change when its contact does
        report: dict[str, Any] = {"created": 0, "updated": 0}
        report.update({name: [] for name in ERROR_LISTS})
        with self._lock:
            for item in items:
                if self._partial and (refused := self._partial_error(item)) is not None:
                    where, error = refused
                    report.setdefault(where, []).append(error)
                    continue
                custom = item.get("custom") or {}
                created = self._upsert(item, custom, adopt=adopt)
                self._count(_ref(item), custom)
                report["created" if created else "updated"] += 1
        partial = any(report[name] for name in report if name.endswith("Errors"))
        return _json_answer(206 if partial else 200, report)

    def _list_endusers(self, _body: Any, query: str) -> _Answer:
        params = parse_qs(query)
        try:
            limit = int(params.get("limit", [DEFAULT_PAGE])[-1])
            offset = int(params.get("offset", [0])[-1])
        except ValueError:
            return _json_answer(400, {"error": "limit and offset must be integers"})
        if limit < 0 or offset < 0:
            return _json_answer(400, {"error": "limit and offset must not be negative"})
        limit = min(limit, MAX_PAGE)
        with self._lock:
            if self.page_cap is not None:
                limit = min(limit, max(0, self.page_cap))
            keys = self._ordered_keys()[offset : offset + limit]
            if any(key not in self.contacts for key in keys):  # `contacts` was edited directly
                self._order_stale = True
                keys = self._ordered_keys()[offset : offset + limit]
            page = [self._public(key, self.contacts[key]) for key in keys]
            body = _dumps(page)  # inside the lock: a contact changing meanwhile must not tear it
        return _Answer(200, body)

    def _list_custom_fields(self, _body: Any, _query: str) -> _Answer:
        with self._lock:
            fields = None if self.custom_fields is None else [dict(f) for f in self.custom_fields]
        if fields is None:
            return _json_answer(404, {"error": "Not Found"})
        return _json_answer(200, fields)

    def _create_custom_field(self, body: Any, _query: str) -> _Answer:
        if not isinstance(body, dict):
            return _json_answer(400, {"error": "a custom field object is required"})
        missing = [k for k in ("name", "type", "parent", "isHidden") if k not in body]
        if missing:
            return _json_answer(400, {"error": f"missing required property {missing[0]}"})
        if body["type"] not in FIELD_TYPES:
            return _json_answer(400, {"error": f"invalid type {body['type']!r}"})
        with self._lock:
            if self.custom_fields is None:
                return _json_answer(404, {"error": "Not Found"})
            if any(
                f["name"] == body["name"] and f.get("parent") == body["parent"] for f in self.custom_fields
            ):
                return _json_answer(400, {"error": f"a field named {body['name']!r} already exists"})
            created = {**body, "_id": f"cf{len(self.custom_fields)}"}
            self.custom_fields.append(created)
        return _json_answer(200, created)

    def _ordered_keys(self) -> list[str]:
        """Contact keys in creation order; rebuilt (dicts keep insertion order) after a delete
        or a direct edit of `contacts`. The caller holds the lock."""
        if self._order_stale or len(self._order) != len(self.contacts):
            self._order = list(self.contacts)
            self._order_stale = False
        return self._order

    def _public(self, key: str, contact: dict[str, Any]) -> dict[str, Any]:
        number = self._ids.get(key)
        if number is None:  # given on first read: a benchmark that never reads pays nothing
            number = self._ids[key] = self._next_id
            self._next_id += 1
        found = {
            "_id": f"{number:024x}",
            "externalId": contact.get("externalId"),
            "email": contact.get("email"),
            "name": contact.get("name"),
            "custom": contact.get("custom", {}),
        }
        for extra in ("title", "companyExternalId"):
            if contact.get(extra) is not None:
                found[extra] = contact[extra]
        return found

    def _partial_error(self, item: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        rule = self._partial.get(_ref(item)) or self._partial.get(item.get("email", ""))
        if rule is None:
            return None
        where, nested = rule
        ids = {k: item[k] for k in ("externalId", "email") if item.get(k)}
        error: dict[str, Any] = {"item": ids} if nested else dict(ids)
        error["error"] = "simulated failure"
        return where, error

    def _upsert(self, fields: dict[str, Any], custom: dict[str, Any], adopt: bool = False) -> bool:
        """Merge into the contact matched by externalId, else email; True when created. An
        unknown externalId with the email of an existing contact updates that contact (and
        gives it the externalId), as Planhat's Segment destination matches userId or email.

        `fields` may hold a "custom" entry; `custom` replaces it. With `adopt`, a new contact
        is `fields` itself (a parsed item nobody else keeps): no copy per item in a benchmark.
        The caller holds the lock.
        """
        email = fields.get("email")
        external = fields.get("externalId")
        key = str(external or self._email_keys.get(str(email), email))
        if external and external not in self.contacts:
            known = self._external_keys.get(external) or (email and self._email_keys.get(email))
            if known:
                key = self._external_keys[external] = known
        contact = self.contacts.get(key)
        created = contact is None
        if contact is None:
            if adopt:
                contact = fields
                contact["custom"] = custom if None not in custom.values() else _without_nulls(custom)
            else:
                contact = {name: value for name, value in fields.items() if value is not None}
                contact["custom"] = _without_nulls(custom)
            self.contacts[key] = contact
            if not self._order_stale and len(self._order) == len(self.contacts) - 1:
                self._order.append(key)
        else:
            for name, value in fields.items():
                if value is not None and name != "custom":
                    contact[name] = value
            _merge_custom(contact.setdefault("custom", {}), custom)
        if email:
            self._email_keys[email] = key
        return created


def _without_nulls(custom: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in custom.items() if v is not None}


def _merge_custom(custom: dict[str, Any], written: dict[str, Any]) -> None:
    """Planhat clears a field written as null."""
    for key, value in written.items():
        if value is None:
            custom.pop(key, None)
        else:
            custom[key] = value


def _ref(item: dict[str, Any]) -> str:
    return item.get("externalId") or item.get("email") or ""


def _fault_answer(fault: _Fault) -> _Answer:
    headers = (("Retry-After", fault.retry_after),) if fault.retry_after is not None else ()
    body = fault.body
    if body is None:
        try:
            phrase = HTTPStatus(fault.status or 500).phrase
        except ValueError:
            phrase = "simulated fault"
        body = _dumps({"error": phrase})
    return _Answer(fault.status or 500, body, headers, fault.content_type)


_ABORT = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Planhat does
    disable_nagle_algorithm = True  # avoids 40 ms delayed-ACK stalls between header and body
    timeout = 60  # idle keep-alive connections end eventually

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        fake: FakePlanhat = self.server.fake  # type: ignore[attr-defined]
        answer = fake.handle(method, self.path, self.headers.get("Authorization"), raw)
        if answer.reset:
            # No status line, no headers: the socket is closed with a reset (the server's
            # shutdown_request then finds it closed and moves on).
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
                self.connection.close()
            return
        try:
            self.send_response(answer.status)
            for name, value in answer.headers:
                self.send_header(name, value)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:  # the client gave up (a timeout test): nothing to answer
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per request would dominate a benchmark's run time


# --- script mode and pytest fixture -------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a fake Planhat on 127.0.0.1.")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tenant-token", default="tenant-secret")
    parser.add_argument("--api-token", default="api-secret")
    parser.add_argument("--keep-bodies", action="store_true", help="keep request bodies (memory grows)")
    parser.add_argument("--page-cap", type=int, default=None, help="GET /endusers pages at most this long")
    parser.add_argument("--max-rps", type=float, default=None, help="answer 429 above this many requests/s")
    args = parser.parse_args(argv)
    # A benchmark holds a million contacts: collect young objects less often, so the
    # collector's passes over that state stop dominating the run time.
    gc.set_threshold(50_000, 20, 20)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    fake = FakePlanhat(
        args.tenant_token,
        args.api_token,
        port=args.port,
        keep_bodies=args.keep_bodies,
        page_cap=args.page_cap,
        max_rps=args.max_rps,
    )
    with fake:
        print(fake.url, flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
