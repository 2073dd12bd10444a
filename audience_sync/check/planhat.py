"""The Planhat lines: the token (the API token is proven by a read; the tenant token cannot be
without sending, so its line is a SKIP that says so), and the custom fields bulk upserts write.
Nothing is sent."""

from __future__ import annotations

import re
from dataclasses import replace
from functools import partial
from typing import Any

from ..config import API_TOKEN_ENV, PlanhatSettings, Settings
from ..errors import PlanhatAuthError, PlanhatError, PlanhatUnavailable
from ..planhat import PlanhatClient, PlanhatReader
from ..planhat.endpoints import CUSTOM_FIELDS_PATH, ENDUSERS_PATH, SEGMENT_PATH
from .results import CheckResult, fail, ok, skip
from .timebox import timeboxed

CHECKBOX_TYPES = frozenset({"checkbox", "boolean"})


def check_planhat(settings: Settings, timeout: float) -> list[CheckResult]:
    planhat = settings.planhat
    # A check asks once more at most, and within the time limit.
    quick = replace(
        planhat,
        timeout_seconds=min(planhat.timeout_seconds, timeout),
        max_attempts=min(planhat.max_attempts, 2),
        retry_budget_seconds=min(planhat.retry_budget_seconds, timeout / 2),
    )
    if planhat.transport == "segment":
        results = [_check_tenant_token(quick)]
        if planhat.api_token is not None or settings.reconcile.interval is not None:
            api = partial(_check_api_token, "planhat api token", quick)
            results.append(timeboxed("planhat api token", timeout, api))
        return results
    token = timeboxed("planhat token", timeout, partial(_check_api_token, "planhat token", quick))
    if token.status != "OK":
        return [token, skip("planhat fields", "needs the API token to be accepted (above)")]
    keys = [audience.key for audience in settings.audiences]
    return [token, timeboxed("planhat fields", timeout, partial(_check_fields, quick, keys))]


def _check_tenant_token(planhat: PlanhatSettings) -> CheckResult:
    item = "planhat token"
    if planhat.tenant_token is None:
        return fail(item, "no tenant token set: nothing can be sent", f"set {planhat.token_setting}")
    problem = _token_form_problem(planhat)
    if problem is not None:
        return fail(item, problem, f"check {planhat.token_setting}")
    return skip(
        item,
        f"tenant token set, not verifiable without sending: POST {SEGMENT_PATH}, the "
        "only endpoint that takes it, has no read; the first delivery proves it "
        "(a 401/403 stops that run at once, nothing is lost)",
    )


def _check_api_token(item: str, planhat: PlanhatSettings) -> CheckResult:
    setting = f"planhat.api_token (or {API_TOKEN_ENV})"
    if planhat.api_token is None:
        why = "the endusers transport" if planhat.transport == "endusers" else "reconcile.interval"
        return fail(item, f"no API token set, and {why} needs it", f"set {setting}")
    reading = replace(planhat, transport="endusers")
    problem = _token_form_problem(reading)
    if problem is not None:
        return fail(item, problem, f"check {setting}")
    where = f"GET {reading.origin}{ENDUSERS_PATH}?limit=1"
    try:
        with PlanhatReader(reading, page_size=1) as reader:
            next(reader.pages(), None)
    except PlanhatAuthError as exc:
        return fail(item, f"{where}: {exc}", f"set {setting} to a valid API token")
    except PlanhatError as exc:
        return fail(
            item, str(exc), "check planhat.subdomain (or base_url) and that this host reaches Planhat"
        )
    return ok(item, f"API token accepted: {where} answered 200 (a read; nothing sent)")


def _token_form_problem(planhat: PlanhatSettings) -> str | None:
    """What the client refuses before sending (a token with spaces, an invalid base_url)."""
    try:
        PlanhatClient(planhat).close()
    except PlanhatError as exc:
        return str(exc)
    return None


def _check_fields(planhat: PlanhatSettings, keys: list[str]) -> CheckResult:
    """Bulk upserts write `custom.<key>`: each key must be a checkbox field on contacts."""
    item, where = "planhat fields", f"GET {planhat.origin}{CUSTOM_FIELDS_PATH}"
    try:
        with PlanhatReader(planhat) as reader:
            fields = reader.custom_fields()
    except PlanhatAuthError:
        return skip(
            item, f"not checked: Planhat refused {where} to the API token (it may lack that permission)"
        )
    except PlanhatUnavailable as exc:
        return fail(item, str(exc), "check that this host reaches Planhat, then check again")
    except PlanhatError as exc:
        return skip(item, f"not checked: {exc}")
    if fields is None:
        return skip(item, f"not checked: Planhat does not list custom fields here ({where} answered 404)")
    on_contacts = {str(f.get("name")): f for f in fields if _on_contacts(f)}
    missing = [key for key in keys if key not in on_contacts]
    wrong = [(key, on_contacts[key].get("type")) for key in keys if key in on_contacts]
    wrong = [
        (key, kind) for key, kind in wrong if kind is not None and str(kind).lower() not in CHECKBOX_TYPES
    ]
    if not missing and not wrong:
        return ok(item, f"a checkbox field on contacts for each audience: {', '.join(keys)}")
    problems = [f"no custom field on contacts named {', '.join(missing)}"] if missing else []
    problems += [f"{key} is a {kind!r} field, not a checkbox" for key, kind in wrong]
    return fail(
        item,
        "; ".join(problems),
        "run `audience-sync fields --create`, which creates each missing field typed right and "
        "never touches an existing one (or, in Planhat, create a checkbox custom field on contacts "
        "named exactly as each audience key: bulk upserts write custom.<key> = true/false)",
    )


def _on_contacts(field: dict[str, Any]) -> bool:
    """A field of Planhat's contact model (parent EndUser); one naming no parent is not ruled out."""
    parent = field.get("parent")
    return parent is None or re.sub(r"[^a-z]", "", str(parent).lower()) in ("enduser", "endusers")
