import pytest

from audience_sync.config.keys import derive_key
from audience_sync.snapshot.contract import MAX_IDENTIFIER_LENGTH, clean_identifier


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("Order Completed Last 30days", "order_completed_last_30days"),
        ("Café Owners", "cafe_owners"),
        ("1st Time Buyers", "1st_time_buyers"),
        ("  Enterprise -- Plan!! ", "enterprise_plan"),
        ("Straße Kunden", "strasse_kunden"),
        ("already_snake_case", "already_snake_case"),
    ],
)
def test_keys_follow_engage_snake_case(name: str, key: str) -> None:
    assert derive_key(name) == key


def test_a_name_of_only_symbols_yields_an_empty_key() -> None:
    assert derive_key("!!! ???") == ""


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("u1", "u1"),
        ("  u1 ", "u1"),
        (42, "42"),
        ("", None),
        (None, None),
        (True, None),
        (3.5, None),
        (b"u1", None),
        ("x" * MAX_IDENTIFIER_LENGTH, "x" * MAX_IDENTIFIER_LENGTH),
        ("x" * (MAX_IDENTIFIER_LENGTH + 1), None),
    ],
)
def test_identifiers_must_be_short_text_or_integers(raw: object, clean: str | None) -> None:
    assert clean_identifier(raw) == clean
