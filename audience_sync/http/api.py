"""The run API, for a data pipeline that wants a sync once its models are built (dbt, Airflow):

    POST /api/runs        body {"audiences": ["KEY", ...], "full": false} (both optional: all
                          configured audiences, incremental); records a run request that a
                          running daemon picks up within daemon.resync_poll, and answers 202
                          with {"id": N, "status": "pending", "url": "/api/runs/N"}
    GET  /api/runs/<id>   the request's state and its runs, as JSON

Always behind `Authorization: Bearer <token>`, on loopback too: the status page's token
(`metrics.token` or AUDIENCE_SYNC_STATUS_TOKEN); the page's login cookie does not count (a
browser would send it with a forged POST). Without a token the API is off and says how to turn
it on. Every input is checked, and refused with a 4xx whose JSON `error` names what is wrong.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from ..config import STATUS_TOKEN_ENV, Settings
from ..state import pauses, run_requests, runs
from ..state.database import database_error
from .status_page import Response

log = logging.getLogger(__name__)

PREFIX = "/api/"
RUNS = "/api/runs"
FIELDS = frozenset({"audiences", "full"})
JSON_TYPE = "application/json"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class RunApi:
    """Answers /api/ paths; `settings` is called per request (a reload shows new audiences)."""

    def __init__(self, engine: Engine, settings: Callable[[], Settings]) -> None:
        self.engine = engine
        self.settings = settings
        self.token = settings().metrics.token

    def handle(self, method: str, target: str, headers: Message, body: bytes = b"") -> Response | None:
        """The answer for an /api/ path, or None for any other path."""
        path = urlsplit(target).path
        if not path.startswith(PREFIX):
            return None
        try:
            self._authorize(headers)
            if path == RUNS:
                if method != "POST":
                    raise ApiError(405, f"use POST {RUNS} to request a run")
                return self._request(headers, body)
            if path.startswith(RUNS + "/"):
                if method != "GET":
                    raise ApiError(405, f"use GET {path}")
                return self._show(path[len(RUNS) + 1 :])
            raise ApiError(404, f"no such API path; try POST {RUNS} or GET {RUNS}/<id>")
        except ApiError as exc:
            extra = (("WWW-Authenticate", 'Bearer realm="audience-sync"'),) if exc.status == 401 else ()
            return _json(exc.status, {"error": str(exc)}, extra)
        except sa.exc.SQLAlchemyError as exc:
            message = database_error("cannot use the state database", self.engine.url, exc)
            log.warning("api: %s", message)
            return _json(503, {"error": message})

    def _authorize(self, headers: Message) -> None:
        if self.token is None:
            raise ApiError(
                404,
                f"the run API is off: set metrics.token (or {STATUS_TOKEN_ENV}) and restart, then send "
                "it as `Authorization: Bearer TOKEN`",
            )
        scheme, _, given = headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(401, "send the token as `Authorization: Bearer TOKEN`")
        if not hmac.compare_digest(given.strip().encode(), self.token.reveal().encode()):
            raise ApiError(401, "that is not the API token")

    # --- POST /api/runs -------------------------------------------------------------------

    def _request(self, headers: Message, body: bytes) -> Response:
        content_type = headers.get("Content-Type", JSON_TYPE).split(";", 1)[0].strip().lower()
        if content_type != JSON_TYPE:
            raise ApiError(415, f"the body must be JSON (Content-Type: {JSON_TYPE}), not {content_type}")
        keys, full = self._parse(body)
        with self.engine.begin() as connection:
            held_back = pauses.paused(connection, keys)
            if held_back:
                named = ", ".join(f"{key} ({pause.describe()})" for key, pause in held_back.items())
                raise ApiError(409, f"paused: {named}; `audience-sync resume {' '.join(held_back)}` first")
            request_id = run_requests.request(connection, keys, full, requested_by="api")
        log.info("api: run request %d for %s%s", request_id, ", ".join(keys), " (full)" if full else "")
        url = f"{RUNS}/{request_id}"
        answer = {"id": request_id, "status": "pending", "audiences": keys, "full": full, "url": url}
        return _json(202, answer, (("Location", url),))

    def _parse(self, body: bytes) -> tuple[list[str], bool]:
        """The audiences (default: all configured) and `full` of a request body."""
        try:
            data: Any = json.loads(body.decode("utf-8")) if body.strip() else {}
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ApiError(400, f"the body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(
                400, 'the body must be a JSON object, e.g. {"audiences": ["pro_plan"], "full": false}'
            )
        unknown = sorted(set(data) - FIELDS)
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r}; the fields are audiences and full")
        full = data.get("full", False)
        if not isinstance(full, bool):
            raise ApiError(400, f"full must be true or false, not {json.dumps(full)}")
        configured = [a.key for a in self.settings().audiences]
        given = data.get("audiences")
        if given is None:
            return configured, full
        if not isinstance(given, list) or not given or not all(isinstance(k, str) for k in given):
            raise ApiError(400, "audiences must be a non-empty list of audience keys")
        wrong = [key for key in given if key not in configured]
        if wrong:
            raise ApiError(
                422, f"unknown audience {wrong[0]!r} (configured: {', '.join(configured) or 'none'})"
            )
        return list(dict.fromkeys(given)), full

    # --- GET /api/runs/<id> ---------------------------------------------------------------

    def _show(self, raw: str) -> Response:
        if not raw.isdigit() or len(raw) > 18:
            raise ApiError(400, f"a run request id is a whole number, not {raw[:40]!r}")
        with self.engine.connect() as connection:
            found = run_requests.find(connection, int(raw))
            if found is None:
                raise ApiError(404, f"no run request {raw}")
            by_id = runs.by_id(connection, found.run_ids)
        answer = {
            "id": found.id,
            "status": found.status,
            "audiences": found.audiences,
            "full": found.full,
            "requested_at": _iso(found.requested_at),
            "started_at": _iso(found.started_at),
            "finished_at": _iso(found.finished_at),
            "error": found.error,
            "runs": [_run(by_id[i]) for i in found.run_ids if i in by_id],
        }
        return _json(200, answer)


def _run(record: dict[str, Any]) -> dict[str, Any]:
    keep = ("id", "audience", "kind", "status", "members", "entered", "exited", "sent", "failed",
            "pending", "in_doubt", "error", "duration_seconds")  # fmt: skip
    shown = {k: record[k] for k in keep}
    shown.update(started_at=_iso(record["started_at"]), finished_at=_iso(record["finished_at"]))
    return shown


def _iso(value: Any) -> str | None:
    return None if value is None else value.isoformat()


def _json(status: int, payload: dict[str, Any], headers: tuple[tuple[str, str], ...] = ()) -> Response:
    body = (json.dumps(payload) + "\n").encode()
    return Response(status, body, "application/json", (("Cache-Control", "no-store"), *headers))
