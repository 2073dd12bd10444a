"""What Planhat's answers prove. Planhat documents little of them; this is the one place that
reads them:

    segment    a 2xx with a JSON body counts as a delivery (`segment_answer_proves`)
    bulk       the upsert's JSON object with `created` and `updated` counters (`bulk_answer`);
               items named in a `*Errors` list were not written (`bulk_failures`), and those
               in `createdErrors` match no contact Planhat has (`not_created`); counters
               that account for fewer items than were sent leave the rest in doubt
               (`counted_shortfall`)

An answer that proves nothing (HTML, empty, not JSON, JSON of another shape) is `Unproven`:
the items are in doubt and the run stops.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson

from ..errors import PlanhatError
from .exchange import Reply
from .payloads import Contact

log = logging.getLogger(__name__)

Scrub = Callable[[str], str]  # masks the token in a text that may echo it
EXCERPT_CHARS = 200
# Identity fields in an error object of a bulk response, used to find the contact it names.
_IDENTITY_FIELDS = ("externalId", "email")
_ERROR_TEXT_FIELDS = ("error", "message", "msg", "reason")


def excerpt(content: bytes) -> str:
    return " ".join(content.decode("utf-8", "replace").split())[:EXCERPT_CHARS]


def http_error(reply: Reply, scrub: Scrub) -> str:
    return scrub(f"HTTP {reply.status}: {excerpt(reply.content)}")


class Unproven(PlanhatError):
    """Planhat's answer does not prove the items were written: they are in doubt, the run stops."""


_RESENT = "the changes sent stay in doubt and are sent again on the next run"


def unproven(reply: Reply, where: str, scrub: Scrub, why: str, then: str = _RESENT) -> Unproven:
    body = excerpt(reply.content)[:60] or "(empty)"
    content_type = reply.content_type or "no content type"
    return Unproven(scrub(f"{where} answered {reply.status} ({content_type}) {why}: {body!r}; {then}"))


def segment_answer_proves(content_type: str, content: bytes) -> bool:
    """Whether a 2xx from the Segment endpoint counts as a delivery: JSON, as a webhook that
    processed the message answers. Planhat does not document this answer; this is the one
    place that decides it. An HTML page or an empty body (a proxy, a load balancer answering
    for a backend it never reached) proves nothing."""
    kind = media_type(content_type)
    return (kind == "application/json" or kind.endswith("+json")) and json_body(
        content_type, content
    ) is not NO_JSON


NO_JSON = object()


def json_body(content_type: str, content: bytes) -> Any:
    """The answer's parsed JSON, or NO_JSON when it is a web page, empty or not JSON."""
    if media_type(content_type) in ("text/html", "application/xhtml+xml") or not content.strip():
        return NO_JSON
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return NO_JSON


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


# Planhat documents the bulk upsert's answer as {"created": n, "updated": n, "createdErrors":
# [...], "updatedErrors": [...], "permissionErrors": [...], ...}. Its exact counting rules are
# not documented; this is the one place that reads them.

_COUNTERS = ("created", "updated")


def bulk_answer(reply: Reply) -> dict[str, Any] | None:
    """The answer's JSON object when it has the documented counters, else None (it proves
    nothing: HTML, empty, not JSON, or JSON of another shape)."""
    data = json_body(reply.content_type, reply.content)
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
    errors = len(error_items(data))
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


def bulk_failures(
    data: dict[str, Any], status: int, batch: Sequence[Contact], scrub: Scrub
) -> tuple[dict[str, str], str | None]:
    """(ref -> error for the items the answer names as not written, or the reason the whole
    batch is in doubt when an error names no contact of the batch or a 206 names none)."""
    errors = error_items(data)
    if not errors:
        if status == 206:
            return {}, "HTTP 206 without error details"
        return {}, None
    by_id, by_email = _by_identity(batch)
    failed: dict[str, str] = {}
    for error in errors:
        text = scrub(_error_text(error))
        refs = _refs_named(error, by_id, by_email)
        if not refs:
            return {}, f"partial failure not attributable to a contact: {text}"
        for ref in refs:
            failed.setdefault(ref, text)
    return failed, None


def not_created(data: dict[str, Any], batch: Sequence[Contact]) -> set[str]:
    """The refs of the batch named in `createdErrors`: items that matched no contact Planhat
    has and could not be created (a new contact needs a company). Planhat holds nothing for
    them."""
    by_id, by_email = _by_identity(batch)
    named = data.get("createdErrors")
    errors = named if isinstance(named, list) else [named] if named else []
    return {ref for error in errors for ref in _refs_named(error, by_id, by_email)}


def _by_identity(batch: Sequence[Contact]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The batch's refs by externalId and by email (casefolded), to find whom an error names."""
    by_id: dict[str, list[str]] = {}
    by_email: dict[str, list[str]] = {}
    for contact in batch:
        if contact.user_id is not None:
            by_id.setdefault(contact.user_id, []).append(contact.ref)
        if contact.email is not None:
            by_email.setdefault(contact.email.casefold(), []).append(contact.ref)
    return by_id, by_email


def error_items(data: object) -> list[object]:
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
