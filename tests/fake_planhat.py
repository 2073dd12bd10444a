"""A fake Planhat: a real HTTP server on 127.0.0.1 for tests and benchmarks.

It serves the two delivery endpoints audience-sync uses, keeps what they wrote, and lets a test
script faults. Audience booleans from segment traits and from endusers custom fields both land
in `contact["custom"][key]`, so tests assert the same way for both transports.

    POST /dock/segment   Basic auth, user name = tenant token, empty password
    PUT  /endusers       Bearer API token; answers created/updated and the *Errors lists
    GET  /_state         {"contacts": n, "true": {key: n}, "false": {key: n}, "requests": n}

As a script (no package imports, pytest optional):

    python tests/fake_planhat.py --port 0 [--tenant-token T] [--api-token A]

prints `http://127.0.0.1:PORT` and serves until SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, NamedTuple, Self

try:
    import orjson
except ImportError:  # the stdlib is fast enough for tests, orjson for the benchmark
    orjson = None  # type: ignore[assignment]

try:
    import pytest
except ImportError:  # script mode on a machine without pytest
    pytest = None  # type: ignore[assignment]

SEGMENT_PATH = "/dock/segment"
ENDUSERS_PATH = "/endusers"
STATE_PATH = "/_state"
MAX_BULK = 5000
ERROR_LISTS = ("createdErrors", "updatedErrors", "permissionErrors")

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
    body: Any  # the parsed JSON body (None when keep_bodies is off or it did not parse)
    status: int


@dataclass(frozen=True, slots=True)
class _Fault:
    """One scripted answer: wait `delay` seconds, then answer `status` (None: serve normally)."""

    status: int | None = None
    retry_after: str | None = None
    body: bytes | None = None
    delay: float = 0.0


@dataclass(frozen=True, slots=True)
class _Answer:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()


def _json_answer(status: int, data: Any) -> _Answer:
    return _Answer(status, _dumps(data))


class FakePlanhat:
    """Thread-safe fake Planhat. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        tenant_token: str = "tenant-secret",
        api_token: str = "api-secret",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        keep_bodies: bool = True,
    ) -> None:
        self.tenant_token = tenant_token
        self.api_token = api_token
        self.keep_bodies = keep_bodies
        self._address = (host, port)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.contacts: dict[str, dict[str, Any]] = {}
        self.requests: list[Recorded] = []
        self.message_ids: list[str] = []  # every segment messageId received, faults included
        self.max_in_flight = 0
        self._in_flight = 0
        self._email_keys: dict[str, str] = {}  # email -> key of the contact holding it
        self._faults: deque[_Fault] = deque()
        self._always: int | None = None
        self._partial: dict[str, tuple[str, bool]] = {}  # ref -> (error list, nested)
        self._bad: set[str] = set()

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
        return f"http://{host}:{port}"

    # --- fault injection --------------------------------------------------------------------

    def fail_next(
        self, n: int = 1, status: int = 503, retry_after: str | None = None, body: Body = None
    ) -> None:
        """The next n requests answer `status` (with Retry-After/body if given), writing nothing."""
        self._script(_Fault(status, retry_after, _as_bytes(body)) for _ in range(n))

    def delay_next(self, n: int, seconds: float) -> None:
        """The next n requests wait `seconds` before being served normally (they still write)."""
        self._script(_Fault(delay=seconds) for _ in range(n))

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

    def _script(self, faults: Iterable[_Fault]) -> None:
        with self._lock:
            self._faults.extend(faults)

    # --- reading the state ------------------------------------------------------------------

    def contact(self, ref: str) -> dict[str, Any] | None:
        with self._lock:
            found = self.contacts.get(ref)
            if found is None and ref in self._email_keys:
                found = self.contacts.get(self._email_keys[ref])
            return found

    def value(self, ref: str, key: str) -> bool | None:
        """The audience boolean Planhat holds for a contact, or None when never written."""
        found = self.contact(ref)
        return None if found is None else found["custom"].get(key)

    def statuses(self) -> list[int]:
        with self._lock:
            return [r.status for r in self.requests]

    def state(self) -> dict[str, Any]:
        with self._lock:
            true: dict[str, int] = {}
            false: dict[str, int] = {}
            for contact in self.contacts.values():
                for key, flag in contact["custom"].items():
                    counts = true if flag is True else false if flag is False else None
                    if counts is not None:
                        counts[key] = counts.get(key, 0) + 1
            return {
                "contacts": len(self.contacts),
                "true": true,
                "false": false,
                "requests": len(self.requests),
            }

    # --- serving ----------------------------------------------------------------------------

    def handle(self, method: str, path: str, authorization: str | None, raw: bytes) -> _Answer:
        """Answer one request; called by the handler threads."""
        path = path.split("?", 1)[0]
        if method == "GET" and path == STATE_PATH:
            return _json_answer(200, self.state())
        route = self._routes().get((method, path))
        if route is None:
            return _json_answer(404, {"error": f"no route {method} {path}"})
        with self._lock:
            self._in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self._in_flight)
        try:
            return self._serve(method, path, authorization, raw, route)
        finally:
            with self._lock:
                self._in_flight -= 1

    def _routes(self) -> dict[tuple[str, str], Callable[[Any], _Answer]]:
        return {("POST", SEGMENT_PATH): self._segment, ("PUT", ENDUSERS_PATH): self._endusers}

    def _serve(
        self,
        method: str,
        path: str,
        authorization: str | None,
        raw: bytes,
        route: Callable[[Any], _Answer],
    ) -> _Answer:
        try:
            body = _loads(raw) if raw else None
        except ValueError:
            return self._record(method, path, None, _json_answer(400, {"error": "invalid JSON"}))
        if path == SEGMENT_PATH and isinstance(body, dict):
            with self._lock:
                self.message_ids.append(body.get("messageId"))
        fault = self._next_fault()
        if fault.delay:
            time.sleep(fault.delay)
        if fault.status is not None:
            return self._record(method, path, body, _fault_answer(fault))
        if authorization != self._expected_auth(path):
            return self._record(method, path, body, _json_answer(401, {"error": "Unauthorized"}))
        return route(body)

    def _next_fault(self) -> _Fault:
        with self._lock:
            if self._always is not None:
                return _Fault(self._always)
            return self._faults.popleft() if self._faults else _Fault()

    def _expected_auth(self, path: str) -> str:
        if path == SEGMENT_PATH:
            return "Basic " + base64.b64encode(f"{self.tenant_token}:".encode()).decode()
        return f"Bearer {self.api_token}"

    def _record(self, method: str, path: str, body: Any, answer: _Answer) -> _Answer:
        kept = body if self.keep_bodies else None
        with self._lock:
            self.requests.append(Recorded(method, path, kept, answer.status))
        return answer

    def _segment(self, message: Any) -> _Answer:
        def refuse(reason: str) -> _Answer:
            return self._record("POST", SEGMENT_PATH, message, _json_answer(400, {"error": reason}))

        if not isinstance(message, dict) or message.get("type") != "identify":
            return refuse("expected one identify message")
        traits = message.get("traits") or {}
        user_id = message.get("userId") or message.get("user_id")
        email = traits.get("email")
        if not (user_id or email):
            return refuse("identify has neither userId nor traits.email")
        with self._lock:
            bad = {user_id, email} & self._bad
        if bad:
            return refuse("bad item")
        fields = {
            "externalId": user_id,
            "email": email,
            "name": traits.get("name"),
            "title": traits.get("title"),
            "companyExternalId": traits.get("companyId"),
        }
        custom = {k: v for k, v in traits.items() if isinstance(v, bool)}
        with self._lock:
            self._upsert(fields, custom)
            self.requests.append(Recorded("POST", SEGMENT_PATH, message if self.keep_bodies else None, 200))
        return _json_answer(200, {"ok": True})

    def _endusers(self, items: Any) -> _Answer:
        def refuse(reason: str) -> _Answer:
            return self._record("PUT", ENDUSERS_PATH, items, _json_answer(400, {"error": reason}))

        if not isinstance(items, list) or not 0 < len(items) <= MAX_BULK:
            return refuse(f"expected an array of 1 to {MAX_BULK} items")
        if not all(isinstance(i, dict) and (i.get("externalId") or i.get("email")) for i in items):
            return refuse("every item needs externalId or email")
        with self._lock:
            bad = set(self._bad)
        if bad and any(_ref(i) in bad or i.get("email") in bad for i in items):
            return refuse("bad item")
        adopt = not self.keep_bodies  # a kept body must not change when its contact does
        report: dict[str, Any] = {"created": 0, "updated": 0}
        report.update({name: [] for name in ERROR_LISTS})
        with self._lock:
            for item in items:
                if self._partial and (refused := self._partial_error(item)) is not None:
                    where, error = refused
                    report.setdefault(where, []).append(error)
                    continue
                created = self._upsert(item, item.get("custom") or {}, adopt=adopt)
                report["created" if created else "updated"] += 1
            partial = any(report[name] for name in report if name.endswith("Errors"))
            status = 206 if partial else 200
            self.requests.append(Recorded("PUT", ENDUSERS_PATH, items if self.keep_bodies else None, status))
        return _json_answer(status, report)

    def _partial_error(self, item: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        rule = self._partial.get(_ref(item)) or self._partial.get(item.get("email", ""))
        if rule is None:
            return None
        where, nested = rule
        ids = {k: item[k] for k in ("externalId", "email") if item.get(k)}
        error = {"item": ids} if nested else dict(ids)
        error["error"] = "simulated failure"
        return where, error

    def _upsert(self, fields: dict[str, Any], custom: dict[str, Any], adopt: bool = False) -> bool:
        """Merge into the contact matched by externalId, else email; True when created.

        `fields` may hold a "custom" entry; `custom` replaces it. With `adopt`, a new contact
        is `fields` itself (a parsed item nobody else keeps): no copy per item in a benchmark.
        The caller holds the lock.
        """
        email = fields.get("email")
        key = fields.get("externalId") or self._email_keys.get(email, email)
        contact = self.contacts.get(key)
        created = contact is None
        if contact is None:
            if adopt:
                contact = fields
                contact["custom"] = custom
            else:
                contact = {name: value for name, value in fields.items() if value is not None}
                contact["custom"] = dict(custom)
            self.contacts[key] = contact
        else:
            for name, value in fields.items():
                if value is not None and name != "custom":
                    contact[name] = value
            contact["custom"].update(custom)
        if email:
            self._email_keys[email] = key
        return created


def _ref(item: dict[str, Any]) -> str:
    return item.get("externalId") or item.get("email") or ""


def _fault_answer(fault: _Fault) -> _Answer:
    headers = (("Retry-After", fault.retry_after),) if fault.retry_after is not None else ()
    body = fault.body
    if body is None:
        try:
            phrase = HTTPStatus(fault.status).phrase
        except ValueError:
            phrase = "simulated fault"
        body = _dumps({"error": phrase})
    return _Answer(fault.status or 500, body, headers)


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
        try:
            self.send_response(answer.status)
            for name, value in answer.headers:
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
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
    args = parser.parse_args(argv)
    # A benchmark holds a million contacts: collect young objects less often, so the
    # collector's passes over that state stop dominating the run time.
    gc.set_threshold(50_000, 20, 20)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    fake = FakePlanhat(args.tenant_token, args.api_token, port=args.port, keep_bodies=args.keep_bodies)
    with fake:
        print(fake.url, flush=True)
        while not stop.wait(0.2):
            pass
    return 0


if pytest is not None:

    @pytest.fixture
    def fake_planhat() -> Iterator[FakePlanhat]:
        with FakePlanhat() as fake:
            yield fake


if __name__ == "__main__":
    sys.exit(main())
