"""Planhat's endpoints audience-sync uses, and what its public clients are seen to read."""

from __future__ import annotations

SEGMENT_PATH = "/dock/segment"  # the Segment-compatible webhook (tenant token, Basic auth)
ENDUSERS_PATH = "/endusers"  # contacts: bulk upsert (PUT) and list (GET), API token
COMPANIES_PATH = "/companies"  # companies: account-level audiences and traits
CUSTOM_FIELDS_PATH = "/customfields"
MAX_PAGE = 5000  # contacts per read page: the most Planhat's public clients are seen to get
READ_RPS = 3.0  # reads count against the same 200 calls/minute soft quota as writes
