"""Reading Planhat back with the API token: every contact, a page at a time, and the custom
field definitions. The segment webhook's tenant token cannot read."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, Self

import httpx

from ..config import API_TOKEN_ENV, PlanhatSettings
from ..errors import PlanhatAuthError, PlanhatError, PlanhatUnavailable
from .answers import http_error, json_body, unproven
from .endpoints import CUSTOM_FIELDS_PATH, ENDUSERS_PATH, MAX_PAGE, READ_RPS
from .exchange import Exchange, GaveUp, Reply


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
        self._exchange = Exchange(
            read, settings.api_token.reveal(), transport=transport, workers=1, sleep=sleep, clock=clock,
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
                    f"reading {where} at offset {offset}: {http_error(reply, self._exchange.scrub)}"
                )
            page = contact_page(reply)
            if page is None:
                raise unproven(reply, where, self._exchange.scrub, "without a JSON array of contacts",
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
            raise PlanhatError(f"reading {where}: {http_error(reply, self._exchange.scrub)}")
        fields = contact_page(reply)  # the same shape: a JSON array of objects
        if fields is None:
            raise unproven(reply, where, self._exchange.scrub, "without a JSON array of custom fields",
                           "nothing was checked")  # fmt: skip
        return fields

    def create_custom_field(self, field: dict[str, Any]) -> dict[str, Any]:
        """Create one custom field (`POST /customfields`, sent once: a retried create could make
        two); returns Planhat's object. PlanhatError when it was refused or the answer lost."""
        where = self._exchange.where(CUSTOM_FIELDS_PATH)
        reply = self._exchange.request_once("POST", CUSTOM_FIELDS_PATH, json.dumps(field).encode())
        self.requests += 1
        if isinstance(reply, GaveUp):
            if self._exchange.auth_error is not None:
                raise self._exchange.auth_error
            raise PlanhatUnavailable(f"creating {field.get('name')!r} at {where}: {reply.text}")
        created = json_body(reply.content_type, reply.content)
        if reply.status not in (200, 201) or not isinstance(created, dict):
            why = http_error(reply, self._exchange.scrub)
            raise PlanhatError(f"creating {field.get('name')!r} at {where}: {why}")
        return created

    def _get(self, path: str, what: str) -> Reply:
        """One GET, answered with any status; raises when no answer came or the token was refused."""
        reply = self._exchange.request("GET", path, b"")
        self.requests += 1
        if isinstance(reply, GaveUp):
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


def contact_page(reply: Reply) -> list[dict[str, Any]] | None:
    data = json_body(reply.content_type, reply.content)
    if not isinstance(data, list) or not all(isinstance(item, dict) for item in data):
        return None
    return data
