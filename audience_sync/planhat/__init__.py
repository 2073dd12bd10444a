"""Delivery to Planhat, and reading it back.

    client      PlanhatClient: sends one chunk of contacts, reports each one's outcome
    segment     the Segment-compatible webhook: one message per request, several in flight
    bulk        the bulk upsert: up to 5,000 items per request, one request at a time
    exchange    the HTTP layer: rate limit, retries, retry budget, faults and what they prove
    limits      the rate limiter, the retry budget, Retry-After
    answers     what Planhat's answers prove (the one place that reads them)
    payloads    the messages and items sent
    outcome     accepted, failed, or failed in doubt
    reader      PlanhatReader: contacts and custom fields read back
    endpoints   the paths used

Nothing here touches the state database (an import-linter contract holds it).
"""

from __future__ import annotations

from .client import PlanhatClient
from .outcome import Outcome
from .payloads import AUDIENCES, Contact, KeyMeta
from .reader import PlanhatReader

__all__ = ["AUDIENCES", "Contact", "KeyMeta", "Outcome", "PlanhatClient", "PlanhatReader"]
