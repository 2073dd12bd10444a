"""Helpers every layer may use, and that know nothing of audiences, Planhat or the state
database: time (`clock`), one-line texts (`text`), masking secrets (`redaction`), logging set-up
(`logs`), a read-ahead thread (`threads`) and the collector pause of bulk phases (`collector`).

Nothing here imports another part of audience_sync (an import-linter contract holds it).
"""
