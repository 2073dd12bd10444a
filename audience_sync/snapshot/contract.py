"""The query contract: which columns a source query returns, and how its rows become members.

    user level      `user_id` and/or `email` identify a user (user_id when present, else
                    email); `name`, `title` and `company_id` travel as traits
    account level   `company_id` (the company's externalId in Planhat) and an optional `name`
    computed trait  the same, plus `value`, normalised to canonical JSON text (values.py)

Rows with no usable identifier, or a value a trait cannot carry, are skipped and counted in
`ReadStats` with a few samples. A chunk of rows is read at a time: this module never holds an
audience. `check` reads an audience's first rows through the same functions as a sync.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import AudienceSettings
from ..errors import SourceError
from .values import UnusableValue, canonical

IDENTIFIER_COLUMNS = ("user_id", "email")
TRAIT_COLUMNS = ("name", "title", "company_id")
VALUE_COLUMN = "value"  # a computed trait's value
MAX_SAMPLES = 5
MAX_TRAIT_LENGTH = 1024
# Longest identifier accepted from a source; longer ones are skipped as bad data.
MAX_IDENTIFIER_LENGTH = 255

# One staged member: (user_id, email, name, title, company_id), at least one of user_id and
# email set; the identity the diff keys on is user_id when known, else email. Plain tuples:
# a million of them pass through here per run, and a NamedTuple costs a Python call each.
# A computed trait's member has a sixth field: its value as canonical JSON text.
Member = tuple[str | None, ...]
MEMBER_FIELDS = ("user_id", "email", "name", "title", "company_id")


@dataclass
class ReadStats:
    rows: int = 0
    skipped: int = 0
    samples: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(reason)


RowReader = Callable[[Any, ReadStats], list[Member]]


def row_reader(keys: list[str], audience: AudienceSettings, where: str) -> RowReader:
    """How chunks of rows with these column names become the audience's members; raises
    SourceError naming `where` when the columns do not meet the contract."""
    value_at = value_position(keys, where) if audience.trait else -1
    if audience.level == "account":
        company_at, name_at = company_position(keys, where), position(keys, "name")
        return lambda rows, stats: companies(rows, company_at, name_at, value_at, stats)
    columns = column_positions(keys, where)
    decode = getattr(audience.compiled, "decode_value", None) if audience.trait else None
    if decode is None or audience.compiled.value_kind != "list":
        return lambda rows, stats: members(rows, columns, stats, value_at)

    def decoded(rows: Any, stats: ReadStats) -> list[Member]:
        """A `unique(...)` trait's value comes as a list or JSON text by driver: made a list first."""
        fixed = [(*row[:value_at], decode(row[value_at]), *row[value_at + 1 :]) for row in rows]
        return members(fixed, columns, stats, value_at)

    return decoded


def clean_identifier(value: object) -> str | None:
    """A usable identifier as text, or None when the value cannot identify a user.

    Integers are accepted (ids are often numeric) and rendered as text; anything else that is
    not a non-empty string of at most MAX_IDENTIFIER_LENGTH characters is refused.
    """
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int):
        text = str(value)
    elif isinstance(value, str):
        text = value.strip()
    else:
        return None
    if not text or len(text) > MAX_IDENTIFIER_LENGTH:
        return None
    return text


def column_positions(keys: list[str], where: str) -> dict[str, int]:
    lowered = [key.lower() for key in keys]
    if not any(column in lowered for column in IDENTIFIER_COLUMNS):
        shown = ", ".join(keys) or "none"
        raise SourceError(f"{where}: the query returns neither user_id nor email (columns: {shown})")
    wanted = IDENTIFIER_COLUMNS + TRAIT_COLUMNS
    return {column: lowered.index(column) for column in wanted if column in lowered}


def position(keys: list[str], column: str) -> int:
    lowered = [key.lower() for key in keys]
    return lowered.index(column) if column in lowered else -1


def company_position(keys: list[str], where: str) -> int:
    at = position(keys, "company_id")
    if at < 0:
        shown = ", ".join(keys) or "none"
        raise SourceError(f"{where}: an account-level query must return company_id (columns: {shown})")
    return at


def companies(rows: Any, company_at: int, name_at: int, value_at: int, stats: ReadStats) -> list[Member]:
    """An account-level chunk: the company's externalId stands where a user's id does (the
    stage keys on it), its `name` travels with it, and a trait's value ends the tuple."""
    members: list[Member] = []
    for row in rows:
        company = clean_identifier(row[company_at])
        if company is None:
            raw = row[company_at]
            stats.skip("row without company_id" if raw is None else f"unusable company_id {_sample(raw)}")
            continue
        value = None
        if value_at >= 0:
            try:
                value = canonical(row[value_at])
            except UnusableValue as exc:
                stats.skip(f"unusable value for company {_sample(company)}: {exc}")
                continue
            if value is None:
                continue
        name = row[name_at] if name_at >= 0 else None
        name = str(name).strip()[:MAX_TRAIT_LENGTH] or None if name is not None else None
        member: Member = (company, None, name, None, None)
        members.append(member if value is None else (*member, value))
    return members


def value_position(keys: list[str], where: str) -> int:
    lowered = [key.lower() for key in keys]
    if VALUE_COLUMN not in lowered:
        shown = ", ".join(keys) or "none"
        raise SourceError(f"{where}: a trait's query must return a value column (columns: {shown})")
    return lowered.index(VALUE_COLUMN)


def members(rows: Any, columns: dict[str, int], stats: ReadStats, value_at: int = -1) -> list[Member]:
    """One chunk of rows as members. Rows of plain text take the inline path (this loop runs a
    million times per large audience); anything else (numbers, blanks, over-long values, a
    missing identifier) goes through `_member`, which applies the full contract.

    With `value_at` (a computed trait), each member ends with its value as canonical JSON; a
    row whose value is NULL has no value (the user is not in the trait), and a value the trait
    cannot carry skips the row, counted like a bad identifier."""
    user_id_at, email_at, name_at, title_at, company_at = (columns.get(c, -1) for c in MEMBER_FIELDS)
    longest, trait_limit = MAX_IDENTIFIER_LENGTH, MAX_TRAIT_LENGTH
    members: list[Member] = []
    append = members.append
    for row in rows:
        value = None
        if value_at >= 0:
            try:
                value = canonical(row[value_at])
            except UnusableValue as exc:
                who = row[user_id_at] if user_id_at >= 0 else row[email_at] if email_at >= 0 else None
                stats.skip(f"unusable value for {_sample(who)}: {exc}")
                continue
            if value is None:
                continue
        user_id = row[user_id_at] if user_id_at >= 0 else None
        email = row[email_at] if email_at >= 0 else None
        name = row[name_at] if name_at >= 0 else None
        title = row[title_at] if title_at >= 0 else None
        company = row[company_at] if company_at >= 0 else None
        if (
            (user_id.__class__ is str or user_id is None)
            and (email.__class__ is str or email is None)
            and (name.__class__ is str or name is None)
            and (title.__class__ is str or title is None)
            and (company.__class__ is str or company is None)
        ):
            usable = True
            if user_id is not None:
                user_id = user_id.strip()
                usable = 0 < len(user_id) <= longest
            if email is not None:
                email = email.strip()
                if not 0 < len(email) <= longest:
                    email = None  # without a user_id the slow path below says why
            if usable and (user_id or email):
                member = (
                    user_id,
                    email,
                    name.strip()[:trait_limit] or None if name is not None else None,
                    title.strip()[:trait_limit] or None if title is not None else None,
                    company.strip()[:longest] or None if company is not None else None,
                )
                append(member if value is None else (*member, value))
                continue
        checked = _member(row, columns, stats)
        if checked is not None:
            append(checked if value is None else (*checked, value))
    return members


def _member(row: Any, columns: dict[str, int], stats: ReadStats) -> Member | None:
    raw_id = row[columns["user_id"]] if "user_id" in columns else None
    raw_email = row[columns["email"]] if "email" in columns else None
    user_id = clean_identifier(raw_id)
    email = clean_identifier(raw_email)
    if raw_id is not None and user_id is None:
        stats.skip(f"unusable user_id {_sample(raw_id)}")
        return None
    if user_id is None and email is None:
        if raw_email is not None:
            stats.skip(f"unusable email {_sample(raw_email)}")
        else:
            stats.skip("row with neither user_id nor email")
        return None
    return (
        user_id,
        email,
        _trait(row, columns, "name"),
        _trait(row, columns, "title"),
        _trait(row, columns, "company_id", MAX_IDENTIFIER_LENGTH),
    )


def _trait(row: Any, columns: dict[str, int], column: str, limit: int = MAX_TRAIT_LENGTH) -> str | None:
    if column not in columns:
        return None
    value = row[columns[column]]
    if value is None or isinstance(value, bool):
        return None
    text = str(value).strip()
    return text[:limit] or None


def _sample(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
