"""The `audience-sync` command line (typer): `app` holds the commands, `output` what they
print, `progress` the delivery progress bar."""

from __future__ import annotations

from .app import CHECK_TIMEOUT, app, entrypoint, main

__all__ = ["CHECK_TIMEOUT", "app", "entrypoint", "main"]
