from datetime import timedelta
from pathlib import Path

import pytest

from audience_sync.config import Secret, load_settings, parse_duration
from audience_sync.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.toml"

MINIMAL = """
[database]
url = "sqlite:///state.db"

[planhat]
tenant_token = "file-token"

[sources.app]
url = "sqlite:///app.db"

[[audiences]]
name = "Order Completed Last 30days"
source = "app"
query = "SELECT id AS user_id FROM users"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def error_for(tmp_path: Path, text: str, environ: dict[str, str] | None = None) -> str:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ or {})
    message = str(raised.value)
    assert "\n" not in message
    assert str(path) in message
    return message


def test_the_example_config_loads() -> None:
    # Its account-level audience needs the API token on segment (PUT /companies): from the environment.
    settings = load_settings(EXAMPLE, {"PLANHAT_API_TOKEN": "api-token"})
    assert settings.audiences[0].key == "order_completed_last_30days"
    assert settings.schedule.min_interval == timedelta(hours=2)
    assert settings.schedule.max_interval == timedelta(hours=3)


def test_minimal_config_derives_key_and_defaults(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), {})
    audience = settings.audiences[0]
    assert audience.key == "order_completed_last_30days"
    assert settings.planhat.origin == "https://api.planhat.com"
    assert settings.planhat.tenant_token == Secret("file-token")


def test_environment_overrides_tokens_and_database(tmp_path: Path) -> None:
    environ = {
        "PLANHAT_TENANT_TOKEN": "env-token",
        "PLANHAT_API_TOKEN": "env-api",
        "AUDIENCE_SYNC_DATABASE_URL": "postgresql://u@db/state",
    }
    settings = load_settings(write(tmp_path, MINIMAL), environ)
    assert settings.planhat.tenant_token.reveal() == "env-token"  # type: ignore[union-attr]
    assert settings.planhat.api_token.reveal() == "env-api"  # type: ignore[union-attr]
    assert settings.database_url == "postgresql+psycopg://u@db/state"


def test_tokens_are_masked_in_repr(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, MINIMAL), {})
    assert "file-token" not in repr(settings)
    assert "file-token" not in str(settings.planhat)


def test_config_path_from_environment(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL)
    settings = load_settings(None, {"AUDIENCE_SYNC_CONFIG": str(path)})
    assert settings.path == path


def test_a_named_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "nope.toml", {})


def test_no_file_at_all_means_the_embedded_demo(tmp_path: Path) -> None:
    settings = load_settings(None, {})
    assert settings.path is None
    keys = [a.key for a in settings.audiences]
    assert keys == ["enterprise_plan", "order_completed_last_30days", "total_revenue_180_days"]


def test_env_references_in_urls_are_expanded(tmp_path: Path) -> None:
    text = MINIMAL.replace('"sqlite:///app.db"', '"postgresql://app:${APP_DB_PASSWORD}@db/app"')
    settings = load_settings(write(tmp_path, text), {"APP_DB_PASSWORD": "pw"})
    assert settings.sources["app"].url == "postgresql+psycopg://app:pw@db/app"
    message = error_for(tmp_path, text, {})
    assert "sources.app.url" in message and "APP_DB_PASSWORD" in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (('tenant_token = "file-token"', 'subdomain = "evil.example.com"'), "planhat.subdomain"),
        (('tenant_token = "file-token"', 'transport = "carrier-pigeon"'), "planhat.transport"),
        (('tenant_token = "file-token"', "tenant_tokn = 'x'"), "planhat.tenant_tokn: unknown key"),
        (('url = "sqlite:///state.db"', "url = 5"), "database.url: expected a string"),
        (('source = "app"', 'source = "warehouse"'), "unknown source 'warehouse'"),
        (('name = "Order Completed Last 30days"', 'name = "!!!"'), "yields an empty key"),
        (('tenant_token = "file-token"', "batch_size = 6000"), "planhat.batch_size"),
        (('query = "SELECT id AS user_id FROM users"', ""), "audiences[0].query: is required"),
        (('name = "Order Completed Last 30days"', 'name = "Email"'), "collides with a contact field"),
    ],
)
def test_invalid_settings_name_the_key_and_file(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    assert expected in error_for(tmp_path, MINIMAL.replace(*change))


def test_duplicate_audience_keys_are_refused(tmp_path: Path) -> None:
    text = MINIMAL + '\n[[audiences]]\nname = "order completed (last 30days)"\nsource = "app"\n' \
        'query = "SELECT 1 AS user_id"\n'  # fmt: skip
    assert "already the key of audience" in error_for(tmp_path, text)


def test_schedule_bounds_must_be_ordered(tmp_path: Path) -> None:
    text = MINIMAL + '\n[schedule]\nmin_interval = "3h"\nmax_interval = "2h"\n'
    assert "schedule.max_interval" in error_for(tmp_path, text)


def test_invalid_toml_is_one_line(tmp_path: Path) -> None:
    assert "invalid TOML" in error_for(tmp_path, "[database\nurl=")


@pytest.mark.parametrize(
    ("text", "seconds"), [("45s", 45), ("90m", 5400), ("2h", 7200), ("1d", 86400), (30, 30)]
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text).total_seconds() == seconds


@pytest.mark.parametrize("text", ["", "2 hours", "-5s", "0s", True])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
