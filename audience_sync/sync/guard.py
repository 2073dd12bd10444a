"""The mass-exit guard: a source that suddenly returns (almost) nothing must not tell Planhat
that everyone left."""

from __future__ import annotations

from ..config import SafetySettings
from ..snapshot.diff import DiffCounts


def blocked(counts: DiffCounts, safety: SafetySettings, key: str, *, force: bool) -> str | None:
    """Why the run must send nothing (None: it may): more than `max_exit_fraction` of an
    audience of at least `min_members` would exit. `force` lets a real mass exit through."""
    if force or counts.previous < safety.min_members:
        return None
    if counts.exit_fraction <= safety.max_exit_fraction:
        return None
    return (
        f"mass-exit guard: {counts.exited} of {counts.previous} members "
        f"({counts.exit_fraction:.0%}) would exit, above safety.max_exit_fraction "
        f"{safety.max_exit_fraction:g}; nothing sent. If the exit is real, run "
        f"`audience-sync sync --audience {key} --force`"
    )
