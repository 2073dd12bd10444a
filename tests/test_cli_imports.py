"""`status`, `history` and `--help` import only what they use. Loading the engine, the setup
check, httpx or Alembic (which brings Mako and Pygments) cost `status` and `history` about
0.2 s each and `--help` 0.45 s, so these tests fail when one of those comes back on the way:
no timing is asserted, only what a fresh interpreter loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from audience_sync import check as setup_check
from audience_sync import cli as cli_module
from tests.conftest import Cli

# Modules only the commands that send, check, schedule or serve need.
HEAVY = (
    "alembic",
    "mako",
    "pygments",
    "httpx",
    "apscheduler",
    "jinja2",
    "audience_sync.sync",
    "audience_sync.check",
    "audience_sync.planhat",
    "audience_sync.daemon",
    "audience_sync.http",
)

# Runs the CLI in a fresh interpreter, then prints the modules it loaded as the last line.
PROBE = """
import json, sys
from audience_sync.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def loaded(*args: str) -> tuple[int, set[str], str]:
    """(exit code, modules loaded, stdout before the last line) of `audience-sync ARGS`."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60, check=True
    )
    *output, last = done.stdout.splitlines()
    probe = json.loads(last)
    return probe["code"], set(probe["modules"]), "\n".join(output) + done.stderr


def heavy(modules: set[str]) -> list[str]:
    """The heavy modules loaded: third-party packages, and our subpackages, with what is under them."""
    return sorted(
        name
        for name in modules
        if name.split(".")[0] in HEAVY or any(name == h or name.startswith(h + ".") for h in HEAVY)
    )


@pytest.mark.slow
def test_status_and_history_load_neither_alembic_nor_the_engine_nor_httpx(state_url: str, cli: Cli) -> None:
    config = Path("audience_sync.toml")
    config.write_text(
        f'[database]\nurl = "{state_url}"\n\n[sources.app]\nurl = "sqlite:///source.db"\n\n'
        '[[audiences]]\nname = "Pro Plan"\nsource = "app"\nquery = "SELECT id AS user_id FROM users"\n'
    )
    assert cli("--config", str(config), "db", "upgrade").code == 0  # at head: the common path
    for command in (["status"], ["history"], ["status", "--json"], ["history", "--json"]):
        code, modules, output = loaded("--config", str(config), *command)
        assert code == 0, output
        assert heavy(modules) == [], command
        # rich's Table took 0.3 s to draw 200 audiences: the listings print plain columns.
        assert not any(name.split(".")[0] == "rich" for name in modules), command
        assert "audience_sync.state.database" in modules  # the command did read the state database
    assert "pro_plan" in loaded("--config", str(config), "status")[2]


@pytest.mark.slow
def test_help_loads_no_database_library() -> None:
    code, modules, output = loaded("--help")
    assert code == 0 and "status" in output
    # typer renders help with rich, which brings Pygments' core (not its lexers) along.
    assert [name for name in heavy(modules) if not name.startswith("pygments")] == []
    assert not {"sqlalchemy", "audience_sync.state", "audience_sync.config"} & modules


def test_the_check_commands_default_timeout_is_the_checks_own() -> None:
    assert cli_module.CHECK_TIMEOUT == setup_check.DEFAULT_TIMEOUT
