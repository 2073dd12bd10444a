"""PlanhatClient against a real HTTP server on loopback (tests/fake_planhat.py).

Time-dependent behaviour (backoff, Retry-After, rate limit, retry budget) runs on `FakeTime`:
the client's injected clock and sleep, so waits are asserted as numbers, not wall time.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest

from audience_sync.config import PlanhatSettings, Secret
from audience_sync.errors import PlanhatAuthError
from audience_sync.planhat import Contact, Outcome, PlanhatClient
from audience_sync.planhat.limits import parse_retry_after
from audience_sync.planhat.payloads import build_enduser, build_identify
from tests.conftest import API_TOKEN, TENANT_TOKEN
from tests.fake_planhat import FakePlanhat

TENANT, API = TENANT_TOKEN, API_TOKEN
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
TRANSPORTS = ("segment", "endusers")


class FakeTime:
    """An injected clock and sleep: sleeping records the wait and moves the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.waits: list[float] = []
        self._lock = threading.Lock()

    def clock(self) -> float:
        with self._lock:
            return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.waits.append(seconds)
            self.now += seconds

    def retry_waits(self) -> list[float]:
        """Waits other than the rate limiter's (tests run it at 1e6 req/s: 1 µs slots)."""
        return [w for w in self.waits if w > 1e-5]


def settings(fake: FakePlanhat, transport: str = "endusers", **overrides: Any) -> PlanhatSettings:
    values: dict[str, Any] = {
        "transport": transport,
        "tenant_token": Secret(TENANT),
        "api_token": Secret(API),
        "base_url": fake.url,
        "max_requests_per_second": 1e6,
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 1.0,
        "timeout_seconds": 5.0,
        **overrides,
    }
    return PlanhatSettings(**values)


def client(
    fake: FakePlanhat, transport: str = "endusers", time_: FakeTime | None = None, **overrides: Any
) -> PlanhatClient:
    time_ = time_ or FakeTime()
    return PlanhatClient(
        settings(fake, transport, **overrides),
        sleep=time_.sleep,
        clock=time_.clock,
        rng=random.Random(7),
    )


def contact(ref: str, **values: bool) -> Contact:
    """A contact of company acme: Planhat creates a contact it does not have only under a company."""
    return with_company(ref, "acme", values)


def with_company(ref: str, company: str | None, values: dict[str, bool] | None = None) -> Contact:
    email_only = "@" in ref
    return Contact(
        ref=ref,
        user_id=None if email_only else ref,
        email=ref if email_only else f"{ref}@example.com",
        name=None,
        title=None,
        company_id=company,
        values=values or {"vip": True},
    )


def users(n: int, **values: bool) -> list[Contact]:
    return [contact(f"u{i}", **values) for i in range(1, n + 1)]


def members(fake: FakePlanhat, key: str) -> set[str]:
    """Every contact the fake holds with `key` true (keyed by externalId, else email)."""
    return {ref for ref, held in fake.contacts.items() if held["custom"].get(key) is True}


def sent_bodies(fake: FakePlanhat) -> list[Any]:
    return [r.body for r in fake.requests]


# --- payloads -----------------------------------------------------------------------------

FULL = Contact(
    ref="u1",
    user_id="u1",
    email="ada@example.com",
    name="Ada Lovelace",
    title="CTO",
    company_id="acme",
    values={"zeta_fans": False, "alpha_buyers": True},
)


def test_identify_payload_carries_every_known_field() -> None:
    message = build_identify(FULL, PlanhatSettings(source_marker="Segment"), "m-1", "2026-11-23T10:00:00Z")
    assert message == {
        "type": "identify",
        "userId": "u1",
        "user_id": "u1",
        "traits": {
            "alpha_buyers": True,
            "zeta_fans": False,
            "email": "ada@example.com",
            "name": "Ada Lovelace",
            "title": "CTO",
            "companyId": "acme",
        },
        "context": {
            "personas": {
                "computation_class": "audience",
                "computation_key": "alpha_buyers",
                "computation_keys": ["alpha_buyers", "zeta_fans"],
            }
        },
        "messageId": "m-1",
        "timestamp": "2026-11-23T10:00:00Z",
        "source": "Segment",
    }


def test_identify_for_email_only_contact_has_no_user_id() -> None:
    message = build_identify(with_company("ann@example.com", None), PlanhatSettings(), "m", "t")
    assert "userId" not in message and "user_id" not in message
    assert message["traits"] == {"vip": True, "email": "ann@example.com"}


def test_enduser_item_omits_unknown_fields() -> None:
    assert build_enduser(FULL) == {
        "externalId": "u1",
        "email": "ada@example.com",
        "name": "Ada Lovelace",
        "title": "CTO",
        "companyExternalId": "acme",
        "custom": {"zeta_fans": False, "alpha_buyers": True},
    }
    assert build_enduser(with_company("ann@example.com", None)) == {
        "email": "ann@example.com",
        "custom": {"vip": True},
    }


def test_segment_sends_one_identify_per_contact(fake_planhat: FakePlanhat) -> None:
    with client(fake_planhat, "segment", source_marker="audience-sync") as planhat:
        outcome = planhat.send([FULL, contact("u2")])
    assert outcome == Outcome(accepted=["u1", "u2"], failed={})
    assert [(r.method, r.path, r.status) for r in fake_planhat.requests] == [
        ("POST", "/dock/segment", 200)
    ] * 2
    body = next(b for b in sent_bodies(fake_planhat) if b["userId"] == "u1")
    assert body["traits"]["alpha_buyers"] is True and body["traits"]["zeta_fans"] is False
    assert body["context"]["personas"]["computation_keys"] == ["alpha_buyers", "zeta_fans"]
    assert body["source"] == "audience-sync"
    assert TIMESTAMP.match(body["timestamp"])
    assert all(UUID4.match(m) for m in fake_planhat.message_ids)
    assert len(set(fake_planhat.message_ids)) == 2
    # The coalesced contact carries both audiences in one call; Planhat holds both.
    assert fake_planhat.contact("u1") == {
        "externalId": "u1",
        "email": "ada@example.com",
        "name": "Ada Lovelace",
        "title": "CTO",
        "companyExternalId": "acme",
        "custom": {"alpha_buyers": True, "zeta_fans": False},
    }


def test_endusers_sends_one_bulk_upsert(fake_planhat: FakePlanhat) -> None:
    with client(fake_planhat, "endusers") as planhat:
        outcome = planhat.send([FULL, contact("u2", vip=False)])
    assert outcome == Outcome(accepted=["u1", "u2"], failed={})
    assert [(r.method, r.path, r.status) for r in fake_planhat.requests] == [("PUT", "/endusers", 200)]
    assert sent_bodies(fake_planhat)[0] == [build_enduser(FULL), build_enduser(contact("u2", vip=False))]
    assert fake_planhat.value("u1", "alpha_buyers") is True
    assert fake_planhat.value("u1", "zeta_fans") is False
    assert fake_planhat.value("u2", "vip") is False
    assert fake_planhat.contact("u1")["companyExternalId"] == "acme"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_email_only_contact_is_delivered(transport: str) -> None:
    with FakePlanhat() as fake, client(fake, transport) as planhat:
        outcome = planhat.send([contact("ann@example.com", vip=True)])
        assert outcome.accepted == ["ann@example.com"]
        assert fake.value("ann@example.com", "vip") is True
        assert "externalId" not in fake.contact("ann@example.com")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_endusers_splits_by_batch_size_and_chunk_size_follows_transport(transport: str) -> None:
    with FakePlanhat() as fake, client(fake, transport, batch_size=3, concurrency=5) as planhat:
        assert planhat.chunk_size == (3 if transport == "endusers" else 20)
        outcome = planhat.send(users(7))
        assert sorted(outcome.accepted) == sorted(f"u{i}" for i in range(1, 8))
        sizes = [len(b) if isinstance(b, list) else 1 for b in sent_bodies(fake)]
        assert sizes == ([3, 3, 1] if transport == "endusers" else [1] * 7)
        assert all(fake.value(f"u{i}", "vip") for i in range(1, 8))


# --- retries ------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_5xx_is_retried_with_full_jitter_then_succeeds(transport: str) -> None:
    clock = FakeTime()
    with FakePlanhat() as fake, client(fake, transport, clock, concurrency=1) as planhat:
        fake.fail_next(2, status=503)
        outcome = planhat.send([contact("u1")])
        assert outcome == Outcome(accepted=["u1"])
        assert fake.statuses() == [503, 503, 200]
        assert fake.value("u1", "vip") is True
    rng = random.Random(7)  # the client's draws: uniform(0, min(max, base * 2**attempt))
    assert clock.retry_waits() == [rng.uniform(0, 0.01), rng.uniform(0, 0.02)]
    if transport == "segment":  # every retry of a message reuses its messageId
        assert len(fake.message_ids) == 3 and len(set(fake.message_ids)) == 1


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_429_honours_retry_after_seconds(transport: str) -> None:
    clock = FakeTime()
    with FakePlanhat() as fake, client(fake, transport, clock) as planhat:
        fake.fail_next(1, status=429, retry_after="7")
        assert planhat.send([contact("u1")]).accepted == ["u1"]
        assert fake.statuses() == [429, 200]
        assert fake.value("u1", "vip") is True
    assert clock.retry_waits() == [7.0]


def test_429_honours_retry_after_http_date() -> None:
    clock = FakeTime()
    with FakePlanhat() as fake, client(fake, "endusers", clock) as planhat:
        fake.fail_next(1, status=429, retry_after=formatdate(time.time() + 60, usegmt=True))
        assert planhat.send([contact("u1")]).accepted == ["u1"]
    [wait] = clock.retry_waits()
    assert 0 < wait <= 60  # until that date (whole seconds), however long the request took


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None
    assert parse_retry_after("") is None
    assert parse_retry_after(None) is None


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_timeout_is_retried(transport: str) -> None:
    clock = FakeTime()
    with FakePlanhat() as fake, client(fake, transport, clock, timeout_seconds=0.2) as planhat:
        fake.delay_next(1, 1.0)
        outcome = planhat.send([contact("u1")])
        assert outcome == Outcome(accepted=["u1"])
        assert fake.value("u1", "vip") is True
    assert len(clock.retry_waits()) == 1


def test_timeouts_on_every_attempt_fail_without_raising() -> None:
    with FakePlanhat() as fake:
        fake.delay_next(2, 1.0)
        with client(fake, "endusers", timeout_seconds=0.2, max_attempts=2) as planhat:
            outcome = planhat.send([contact("u1")])
    assert outcome.accepted == []
    assert outcome.failed == {"u1": "timeout after 0.2s (after 2 attempts)"}
    assert not planhat.exhausted


def test_connection_refused_fails_after_max_attempts() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = PlanhatSettings(
        transport="endusers",
        api_token=Secret(API),
        base_url=f"http://127.0.0.1:{port}",
        max_attempts=3,
        backoff_base_seconds=0.01,
        max_requests_per_second=1e6,
    )
    clock = FakeTime()
    with PlanhatClient(base, sleep=clock.sleep, clock=clock.clock) as planhat:
        outcome = planhat.send([contact("u1")])
    assert outcome.failed["u1"].startswith("connection error: ConnectError")
    assert outcome.failed["u1"].endswith("(after 3 attempts)")
    assert len(clock.retry_waits()) == 2


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_other_4xx_is_not_retried(transport: str) -> None:
    with FakePlanhat() as fake, client(fake, transport) as planhat:
        fake.fail_next(1, status=422, body='{"error": "field title is too long"}')
        outcome = planhat.send([contact("u1")])
        assert outcome.failed == {"u1": 'HTTP 422: {"error": "field title is too long"}'}
        assert fake.statuses() == [422]
        assert fake.value("u1", "vip") is None


def test_max_attempts_caps_retries_without_spending_the_budget() -> None:
    with FakePlanhat() as fake, client(fake, "endusers", max_attempts=3) as planhat:
        fake.always(503)
        outcome = planhat.send([contact("u1")])
        assert outcome.failed == {"u1": "503 Service Unavailable (after 3 attempts)"}
        assert fake.statuses() == [503] * 3
        assert not planhat.exhausted


def test_retries_are_logged_without_the_token(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with FakePlanhat() as fake, client(fake, "segment") as planhat:
        fake.fail_next(1, status=503)
        planhat.send([contact("u1")])
    retries = [r for r in caplog.records if r.name.startswith("audience_sync.planhat")]
    assert len(retries) == 1 and retries[0].levelno == logging.WARNING
    assert "503 Service Unavailable" in retries[0].getMessage()
    assert re.search(r"in \d+\.\d\ds", retries[0].getMessage())
    assert TENANT not in caplog.text and API not in caplog.text


# --- authentication -----------------------------------------------------------------------


def test_401_raises_at_once_without_retry_or_token() -> None:
    secret = "wrong-tenant-token-123"
    with FakePlanhat() as fake:
        base = settings(fake, "segment", tenant_token=Secret(secret), concurrency=1)
        with PlanhatClient(base) as planhat:
            outcome = planhat.send(users(3))
            # Reported once the chunk's outcome is known, so the engine can acknowledge it.
            assert isinstance(outcome.stop, PlanhatAuthError)
            assert outcome.accepted == [] and set(outcome.failed) == {"u1", "u2", "u3"}
            assert outcome.in_doubt == set()  # refused: Planhat wrote nothing
            message = str(outcome.stop)
            assert message == (
                "Planhat rejected the tenant token (401): "
                "check planhat.tenant_token (or PLANHAT_TENANT_TOKEN)"
            )
            assert secret not in message and secret not in repr(planhat)
            assert fake.statuses() == [401]
            with pytest.raises(PlanhatAuthError):  # the run is over: no further request
                planhat.send(users(1))
            assert len(fake.requests) == 1
        assert fake.contacts == {}


def test_403_on_endusers_names_the_api_token_setting() -> None:
    with FakePlanhat() as fake, client(fake, "endusers") as planhat:
        fake.always(403)
        outcome = planhat.send(users(2))
        assert isinstance(outcome.stop, PlanhatAuthError)
        assert re.search(r"API token \(403\): check planhat\.api_token", str(outcome.stop))
        assert fake.statuses() == [403]


def test_401_stops_every_segment_worker() -> None:
    with FakePlanhat(tenant_token="other") as fake, client(fake, "segment", concurrency=5) as c:
        outcome = c.send(users(40))
        assert isinstance(outcome.stop, PlanhatAuthError) and not outcome.accepted
        assert 1 <= len(fake.requests) <= 5  # only what was in flight, nothing after


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_missing_token_names_the_setting(transport: str) -> None:
    with pytest.raises(PlanhatAuthError) as raised:
        PlanhatClient(PlanhatSettings(transport=transport))  # type: ignore[arg-type]
    setting = "planhat.tenant_token" if transport == "segment" else "planhat.api_token"
    assert setting in str(raised.value)


@pytest.mark.parametrize("token", ["api-secret\n", "api secret", "api-sécret"])
def test_malformed_token_is_refused_without_showing_it(token: str) -> None:
    base = PlanhatSettings(transport="endusers", api_token=Secret(token))
    with pytest.raises(PlanhatAuthError) as raised:
        PlanhatClient(base)
    assert "check planhat.api_token (or PLANHAT_API_TOKEN)" in str(raised.value)
    assert "secret" not in str(raised.value) and "sécret" not in str(raised.value)


# --- partial failures ---------------------------------------------------------------------


@pytest.mark.parametrize(("where", "nested"), [("updatedErrors", True), ("createdErrors", False)])
def test_206_fails_only_the_named_items(where: str, nested: bool) -> None:
    batch = [*users(4), contact("ann@example.com")]
    with FakePlanhat() as fake, client(fake, "endusers") as planhat:
        fake.partial_fail({"u2", "ann@example.com"}, where=where, nested=nested)
        outcome = planhat.send(batch)
        assert fake.statuses() == [206]
        assert outcome.accepted == ["u1", "u3", "u4"]
        assert outcome.failed == {"u2": "simulated failure", "ann@example.com": "simulated failure"}
        assert members(fake, "vip") == {"u1", "u3", "u4"}  # the refused two were not written


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (206, {"created": 1, "updatedErrors": ["something went wrong"]}),
        (200, {"created": 1, "permissionErrors": [{"externalId": "stranger", "error": "no"}]}),
        (206, "not json"),
    ],
)
def test_unattributable_partial_failure_fails_the_whole_batch(status: int, body: Any) -> None:
    with FakePlanhat() as fake, client(fake, "endusers") as planhat:
        fake.fail_next(1, status=status, body=body)
        outcome = planhat.send(users(3))
    assert outcome.accepted == []
    assert set(outcome.failed) == {"u1", "u2", "u3"}


def test_400_splits_the_batch_to_isolate_bad_items() -> None:
    with FakePlanhat() as fake, client(fake, "endusers") as planhat:
        fake.bad_items({"u3", "u6"})
        outcome = planhat.send(users(8))
        assert sorted(outcome.accepted) == ["u1", "u2", "u4", "u5", "u7", "u8"]
        assert set(outcome.failed) == {"u3", "u6"}
        assert outcome.failed["u3"] == 'HTTP 400: {"error":"bad item"}'
        assert members(fake, "vip") == {"u1", "u2", "u4", "u5", "u7", "u8"}
        # 8 -> 4 + 4 -> 2 + 2 + 2 + 2 -> the two bad pairs split into singles.
        assert sorted(len(b) for b in sent_bodies(fake)) == [1, 1, 1, 1, 2, 2, 2, 2, 4, 4, 8]


# --- retry budget -------------------------------------------------------------------------


def test_retry_budget_exhaustion_fails_the_rest_and_stops_sending() -> None:
    clock = FakeTime()
    overrides = {"retry_budget_seconds": 1.0, "backoff_base_seconds": 0.3, "max_attempts": 50}
    with FakePlanhat() as fake, client(fake, "endusers", clock, batch_size=2, **overrides) as c:
        fake.always(503)
        first = c.send(users(2))
        assert c.exhausted
        assert first.failed == {
            "u1": "retry budget spent: 503 Service Unavailable",
            "u2": "retry budget spent: 503 Service Unavailable",
        }
        assert sum(clock.retry_waits()) == pytest.approx(1.0)  # the last wait was capped
        sent = len(fake.requests)
        later = c.send([contact("u3")])
        assert later.failed == {"u3": "retry budget spent: 503 Service Unavailable"}
        assert len(fake.requests) == sent  # nothing more was sent
        assert fake.contacts == {}


def test_retry_after_is_capped_by_the_remaining_budget() -> None:
    clock = FakeTime()
    with FakePlanhat() as fake, client(fake, "endusers", clock, retry_budget_seconds=5) as c:
        fake.fail_next(1, status=429, retry_after="30")
        assert c.send([contact("u1")]).accepted == ["u1"]
        assert clock.retry_waits() == [5.0]
        assert not c.exhausted  # spent, but nothing has needed it since
        fake.fail_next(1, status=503)
        failed = c.send([contact("u2")]).failed
        assert failed == {"u2": "retry budget spent: 503 Service Unavailable"}
        assert c.exhausted


def test_retry_budget_exhaustion_with_segment_workers() -> None:
    clock = FakeTime()
    overrides = {"retry_budget_seconds": 0.5, "backoff_base_seconds": 0.2, "max_attempts": 100}
    with FakePlanhat() as fake, client(fake, "segment", clock, concurrency=5, **overrides) as c:
        fake.always(503)
        outcome = c.send(users(20))
        assert c.exhausted
        assert outcome.accepted == []
        assert set(outcome.failed) == {f"u{i}" for i in range(1, 21)}
        assert all(t.startswith("retry budget spent: 503") for t in outcome.failed.values())
        assert len(fake.requests) < 100
        assert fake.contacts == {}


# --- rate limit and concurrency -----------------------------------------------------------


def test_rate_limiter_spaces_requests() -> None:
    clock = FakeTime()
    with FakePlanhat() as fake:
        with client(fake, "endusers", clock, max_requests_per_second=2, batch_size=1) as c:
            assert len(c.send(users(5)).accepted) == 5
        assert len(fake.requests) == 5
    assert clock.waits == pytest.approx([0.5] * 4)


def test_rate_limiter_is_shared_by_segment_workers() -> None:
    with FakePlanhat() as fake:
        base = settings(fake, "segment", max_requests_per_second=25, concurrency=10)
        with PlanhatClient(base) as planhat:
            started = time.monotonic()
            assert len(planhat.send(users(10)).accepted) == 10
            elapsed = time.monotonic() - started
    assert elapsed >= 9 / 25 * 0.95  # ten requests need nine intervals of 40 ms


def test_segment_keeps_requests_in_flight_concurrently() -> None:
    with FakePlanhat() as fake:
        fake.delay_next(10, 0.5)  # each held long enough for the others to arrive meanwhile
        base = settings(fake, "segment", concurrency=10, max_requests_per_second=150)
        with PlanhatClient(base) as planhat:
            outcome = planhat.send(users(10))
        assert len(outcome.accepted) == 10
        assert all(fake.value(f"u{i}", "vip") for i in range(1, 11))
        assert fake.max_in_flight >= 5  # one at a time would never have two


def test_endusers_never_sends_in_parallel() -> None:
    with FakePlanhat() as fake, client(fake, "endusers", batch_size=2, concurrency=10) as c:
        fake.delay_next(3, 0.05)
        assert len(c.send(users(6)).accepted) == 6
        assert fake.max_in_flight == 1


# --- secrets ------------------------------------------------------------------------------


def test_tokens_stay_out_of_repr_and_failure_texts() -> None:
    with FakePlanhat() as fake, client(fake, "endusers") as planhat:
        echo = json.dumps({"error": f"bad header Bearer {API}"})
        fake.fail_next(1, status=418, body=echo)
        outcome = planhat.send([contact("u1")])
        assert API not in outcome.failed["u1"] and "********" in outcome.failed["u1"]
        assert API not in repr(planhat)
        assert repr(planhat) == f"PlanhatClient(transport='endusers', origin={fake.url!r})"


# --- the fake itself ----------------------------------------------------------------------


def test_fake_checks_basic_auth_exactly(fake_planhat: FakePlanhat) -> None:
    wrong = base64.b64encode(b"tenant-secret:x").decode()
    request = urllib.request.Request(
        f"{fake_planhat.url}/dock/segment",
        data=json.dumps({"type": "identify", "userId": "u1", "traits": {"a": True}}).encode(),
        headers={"Authorization": f"Basic {wrong}"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as raised:
        urllib.request.urlopen(request, timeout=5)
    assert raised.value.code == 401
    assert fake_planhat.contacts == {}


def test_fake_runs_as_a_script_and_reports_state() -> None:
    script = Path(__file__).with_name("fake_planhat.py")
    process = subprocess.Popen(
        [sys.executable, str(script), "--port", "0", "--api-token", "T"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        url = process.stdout.readline().strip()  # type: ignore[union-attr]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url)
        with PlanhatClient(
            PlanhatSettings(transport="endusers", api_token=Secret("T"), base_url=url)
        ) as planhat:
            assert planhat.send([contact("u1", a=True), contact("u2", a=False)]).failed == {}
        with urllib.request.urlopen(f"{url}/_state", timeout=5) as response:
            state = json.load(response)
        assert state == {"contacts": 2, "true": {"a": 1}, "false": {"a": 1}, "requests": 1}
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0


# --- the fake is as strict as Planhat documents itself ------------------------------------------


def test_the_fake_ignores_and_discards_what_planhat_documents_it_does(fake_planhat: FakePlanhat) -> None:
    """planhat/docs, "User Tracking" > "3. Segment": calls other than identify and track, and
    calls with neither user id nor email, are "completely ignored"; a call for a user Planhat
    does not have, with no customer id, is discarded. All answered 200."""
    import httpx

    def post(message: dict[str, Any]) -> int:
        return httpx.post(
            f"{fake_planhat.url}/dock/segment", auth=(TENANT_TOKEN, ""), json=message
        ).status_code

    assert post({"type": "group", "groupId": "c1", "traits": {"vip": True}}) == 200
    assert post({"type": "page", "userId": "u1"}) == 200
    assert post({"type": "identify", "traits": {"vip": True}}) == 200  # neither user id nor email
    assert [i["reason"] for i in fake_planhat.ignored] == [
        "not of type identify or track",
        "not of type identify or track",
        "both user id and email are missing",
    ]
    assert post({"type": "identify", "userId": "u1", "traits": {"vip": True}}) == 200
    assert post({"type": "track", "userId": "u2", "event": "Audience Entered"}) == 200
    assert fake_planhat.unassigned == [{"type": "identify", "ref": "u1"}, {"type": "track", "ref": "u2"}]
    assert fake_planhat.contacts == {} and fake_planhat.companies == {} and fake_planhat.events == []

    # With a company id Planhat creates the contact; a known contact needs none.
    assert post({"type": "identify", "userId": "u1", "traits": {"vip": True, "companyId": "acme"}}) == 200
    assert post({"type": "identify", "userId": "u1", "traits": {"vip": False}}) == 200
    assert fake_planhat.value("u1", "vip") is False
    track = {"type": "track", "userId": "u2", "event": "E", "context": {"traits": {"companyId": "acme"}}}
    assert post(track) == 200 and fake_planhat.events_of("u2") == [("E", {})]


def test_the_fake_bulk_upsert_creates_no_contact_without_a_company(fake_planhat: FakePlanhat) -> None:
    fake_planhat.add_contact("u9", "u9@example.com")
    settings = PlanhatSettings(transport="endusers", api_token=Secret(API_TOKEN), base_url=fake_planhat.url)
    with PlanhatClient(settings) as planhat:
        outcome = planhat.send([with_company("u1", None), contact("u2"), with_company("u9", None)])
    assert list(outcome.failed) == ["u1"] and "a new contact needs a company" in outcome.failed["u1"]
    assert fake_planhat.find("u1") is None
    assert fake_planhat.value("u2", "vip") is True and fake_planhat.value("u9", "vip") is True
    assert fake_planhat.statuses() == [206]
