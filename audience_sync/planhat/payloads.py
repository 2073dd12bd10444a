"""What is sent: Segment-spec messages (identify, track) and bulk upsert items, built
from one contact's changes. A full sync builds a million of these: plain dicts, no models."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from ..config import PlanhatSettings


@dataclass(frozen=True, slots=True)
class KeyMeta:
    """How the keys of one delivery go out; one object per run, shared by its contacts."""

    traits: frozenset[str] = frozenset()  # computed traits (computation_class "trait")
    events: frozenset[str] = frozenset()  # also sent as track events (send_as events or both)
    events_only: frozenset[str] = frozenset()  # not sent as a property (send_as events)
    # The refs are Planhat company externalIds, sent to PUT /companies on either transport:
    # Planhat's /dock/segment ignores every call but identify and track.
    account: bool = False


AUDIENCES = KeyMeta()


@dataclass(frozen=True, slots=True)
class Contact:
    ref: str  # identity audience-sync keys on: user_id when known, else email
    user_id: str | None
    email: str | None
    name: str | None
    title: str | None
    company_id: str | None  # the company's externalId in Planhat
    values: dict[str, Any]  # key -> membership (audience) or value (trait), one user's changes
    meta: KeyMeta = AUDIENCES


def build_identify(
    contact: Contact, settings: PlanhatSettings, message_id: str, timestamp: str
) -> dict[str, Any]:
    """One Segment-spec identify, as Engage sends it to Planhat's Segment destination."""
    meta = contact.meta
    keys = sorted(k for k in contact.values if k not in meta.events_only)
    traits: dict[str, Any] = {key: contact.values[key] for key in keys}
    # Identity traits are set last so they win over an audience key of the same name.
    for name, value in (
        ("email", contact.email),
        ("name", contact.name),
        ("title", contact.title),
        ("companyId", contact.company_id),
    ):
        if value is not None:
            traits[name] = value
    personas: dict[str, Any] = {"computation_class": computation_class(keys, meta)}
    if keys:
        personas["computation_key"] = keys[0]
        personas["computation_keys"] = keys
    message: dict[str, Any] = {"type": "identify"}
    if contact.user_id is not None:
        # Segment's spec says userId; Planhat documents reading user_id. Send both.
        message["userId"] = contact.user_id
        message["user_id"] = contact.user_id
    message.update(
        traits=traits,
        context={"personas": personas},
        messageId=message_id,
        timestamp=timestamp,
        source=settings.source_marker,
    )
    return message


def computation_class(keys: list[str], meta: KeyMeta) -> str:
    """`trait` when every key is a computed trait, else `audience` (a user's traits and
    audiences go out together in one message)."""
    return "trait" if keys and meta.traits.issuperset(keys) else "audience"


def build_track(
    contact: Contact, key: str, settings: PlanhatSettings, message_id: str, timestamp: str
) -> dict[str, Any]:
    """One Segment-spec track, as Engage sends an audience or computed trait as events:
    `Audience Entered` / `Audience Exited`, or `Trait Computed`."""
    value = contact.values[key]
    if key in contact.meta.traits:
        event, properties = "Trait Computed", {"trait_key": key, key: value}
    else:
        event = "Audience Entered" if value else "Audience Exited"
        properties = {"audience_key": key, key: bool(value)}
    message: dict[str, Any] = {"type": "track", "event": event}
    if contact.user_id is not None:
        message["userId"] = contact.user_id
        message["user_id"] = contact.user_id
    # The email identifies an email-only user, as on an identify; the company lets Planhat
    # create a contact it does not have yet (it discards the call otherwise).
    context_traits = {
        name: value
        for name, value in (("email", contact.email), ("companyId", contact.company_id))
        if value is not None
    }
    if context_traits:
        message["context"] = {"traits": context_traits}
    message.update(
        properties=properties, messageId=message_id, timestamp=timestamp, source=settings.source_marker
    )
    return message


def build_company(contact: Contact) -> dict[str, Any]:
    """One item of a PUT /companies bulk upsert, matched on the company's externalId."""
    item: dict[str, Any] = {"externalId": contact.ref}
    if contact.name is not None:
        item["name"] = contact.name
    item["custom"] = dict(contact.values)
    return item


def build_messages(contact: Contact, settings: PlanhatSettings, timestamp: str) -> list[dict[str, Any]]:
    """Every Segment message one contact's changes make: the identify carrying the properties,
    then a track per key sent as events. (Companies never go this way: see `build_company`.)"""
    meta = contact.meta
    messages = []
    if any(key not in meta.events_only for key in contact.values):
        messages.append(build_identify(contact, settings, str(uuid.uuid4()), timestamp))
    if meta.events:
        for key in sorted(contact.values):
            if key in meta.events:
                messages.append(build_track(contact, key, settings, str(uuid.uuid4()), timestamp))
    return messages


def build_enduser(contact: Contact) -> dict[str, Any]:
    """One item of a PUT /endusers bulk upsert; audience booleans go to custom fields."""
    # Spelled out rather than looped: a full sync builds a million of these.
    item: dict[str, Any] = {}
    if contact.user_id is not None:
        item["externalId"] = contact.user_id
    if contact.email is not None:
        item["email"] = contact.email
    if contact.name is not None:
        item["name"] = contact.name
    if contact.title is not None:
        item["title"] = contact.title
    if contact.company_id is not None:
        item["companyExternalId"] = contact.company_id
    item["custom"] = dict(contact.values)
    return item


def encode(payload: Any) -> bytes:
    """Compact UTF-8 JSON. orjson: encoding was a fifth of a full sync's time with the stdlib."""
    return orjson.dumps(payload)
