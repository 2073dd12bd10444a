"""The layout is a checked contract: each state table's SQL has one owner in `state/`.

`lint-imports` (pyproject.toml) holds the layers; this test holds the tables. It reads every
module of the package (no import), finds the SQL it issues against each table of the state
database (text SQL in string literals and f-strings, and SQLAlchemy Core on the tables of
`state.models`), and fails when a module other than the table's owner writes to it, or when a
module outside `state/` reads a table it is not listed as reading below.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

from audience_sync.state import models

PACKAGE = Path(__file__).resolve().parent.parent / "audience_sync"
TABLES = frozenset(models.metadata.tables) | {"alembic_version"}

# The one module that writes each table.
OWNERS = {
    "audiences": "state.audiences",
    "baseline": "state.baseline",
    "pending": "state.outbox",
    "in_flight": "state.outbox",
    "runs": "state.runs",
    "changes": "state.changes",
    "leases": "state.leases",
    "resync_requests": "state.resyncs",
    "paused_audiences": "state.pauses",
    "run_requests": "state.run_requests",
    "planner_snapshots": "state.planner",
    "alembic_version": "state.migrations",
}

# Modules outside `state/` that read a table, each for a reason: the set-based diff reads the
# baseline in its own statements (over predicates `state.baseline` exports), and a reconcile
# compares what Planhat showed with it. Anything else reads through `state/`.
OUTSIDE_READERS: dict[str, set[str]] = {
    "baseline": {"snapshot.identities", "sync.reconcile"},
}

_WRITE = re.compile(r"\b(?:INSERT\s+INTO|UPDATE|DELETE\s+FROM)\s+(\w+)")
_READ = re.compile(r"\b(?:FROM|JOIN|USING)\s+(\w+)")
_CORE_WRITES = ("insert", "update", "delete")


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE).with_suffix("")
    parts = [part for part in relative.parts if part != "__init__"]
    return ".".join(parts)


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (prose, not SQL)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _texts(tree: ast.AST) -> list[str]:
    """Every string literal and f-string (its literal parts, placeholders as `{}`)."""
    skip = _docstrings(tree)
    texts = []
    inside_fstring = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts = []
            for value in node.values:
                inside_fstring.add(id(value))
                parts.append(value.value if isinstance(value, ast.Constant) else "{}")
            texts.append("".join(str(part) for part in parts))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in skip | inside_fstring
        ):
            texts.append(node.value)
    return texts


def _models_aliases(tree: ast.AST) -> set[str]:
    """Names bound to the state.models module (`from . import models as m`, ...)."""
    aliases = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for name in node.names:
                if name.name == "models" and (node.module is None or node.module.endswith("state")):
                    aliases.add(name.asname or name.name)
    return aliases


def _core_uses(tree: ast.AST) -> tuple[set[str], set[str]]:
    """(tables written, tables referenced) through SQLAlchemy Core on `models.<table>`."""
    aliases = _models_aliases(tree)
    writes, reads = set(), set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)):
            continue
        if node.value.id in aliases and node.attr in TABLES:
            reads.add(node.attr)
    for node in ast.walk(tree):
        # models.<table>.insert() / .update() / .delete()
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in _CORE_WRITES
        ):
            target = node.func.value
            if (
                isinstance(target, ast.Attribute)
                and isinstance(target.value, ast.Name)
                and target.value.id in aliases
                and target.attr in TABLES
            ):
                writes.add(target.attr)
        # dialect_insert(connection)(models.<table>)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Call):
            inner = node.func.func
            if isinstance(inner, ast.Name) and inner.id == "dialect_insert":
                for arg in node.args:
                    if (
                        isinstance(arg, ast.Attribute)
                        and isinstance(arg.value, ast.Name)
                        and arg.attr in TABLES
                    ):
                        writes.add(arg.attr)
    return writes, reads - writes


def sql_by_module() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(table -> modules that write it, table -> modules that read it)."""
    writers: dict[str, set[str]] = defaultdict(set)
    readers: dict[str, set[str]] = defaultdict(set)
    for path in sorted(PACKAGE.rglob("*.py")):
        if "migrations" in path.relative_to(PACKAGE).parts:
            continue
        name = module_name(path)
        tree = ast.parse(path.read_text(), str(path))
        for text in _texts(tree):
            for table in _WRITE.findall(text):
                if table in TABLES:
                    writers[table].add(name)
            for table in _READ.findall(text):
                if table in TABLES:
                    readers[table].add(name)
        core_writes, core_reads = _core_uses(tree)
        for table in core_writes:
            writers[table].add(name)
        for table in core_reads:
            readers[table].add(name)
    return writers, readers


def test_every_table_is_written_by_its_owner_alone() -> None:
    writers, _ = sql_by_module()
    found = {table: sorted(modules) for table, modules in sorted(writers.items())}
    print("modules writing each table:", found)
    assert set(OWNERS) == TABLES, "every table has an owner"
    strays = {table: sorted(modules - {OWNERS[table]}) for table, modules in writers.items()}
    assert {table: modules for table, modules in strays.items() if modules} == {}
    # The scan sees the owners' own writes (or it would prove nothing).
    assert all(OWNERS[table] in writers[table] for table in ("audiences", "baseline", "pending", "runs"))


def test_only_the_listed_modules_outside_state_read_its_tables() -> None:
    _, readers = sql_by_module()
    outside = {
        table: sorted(m for m in modules if not m.startswith("state."))
        for table, modules in sorted(readers.items())
    }
    print("modules outside state/ reading each table:", outside)
    expected = {table: sorted(modules) for table, modules in OUTSIDE_READERS.items()}
    assert {table: modules for table, modules in outside.items() if modules} == expected


def test_the_scan_finds_sql_in_every_form_it_claims(tmp_path: Path) -> None:
    """A stray write in text SQL, an f-string or Core is found (else the tests above prove nothing)."""
    source = """
from .state import models as m
from .state.database import dialect_insert
from tests.conftest import runs, status

def stray(connection, table):
    connection.exec_driver_sql("UPDATE runs SET status = 'x'")
    connection.exec_driver_sql(f"DELETE FROM pending WHERE user_ref IN (SELECT 1 FROM {table})")
    connection.execute(m.baseline.insert())
    connection.execute(dialect_insert(connection)(m.leases))
    connection.execute(m.changes.select())
"""
    tree = ast.parse(source)
    texts = _texts(tree)
    written = {t for text in texts for t in _WRITE.findall(text)}
    assert written == {"runs", "pending"}
    core_writes, core_reads = _core_uses(tree)
    assert core_writes == {"baseline", "leases"} and core_reads == {"changes"}


def test_no_private_name_crosses_modules() -> None:
    """A name with a leading underscore is its module's own: shared ones are made public."""
    crossing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (
                node.level or (node.module or "").startswith("audience_sync")
            ):
                crossing += [
                    f"{module_name(path)}: from {'.' * node.level}{node.module or ''} import {alias.name}"
                    for alias in node.names
                    if alias.name.startswith("_") and not alias.name.startswith("__")
                ]
    assert crossing == []


_LOG_METHODS = frozenset({"debug", "info", "warning", "error", "exception", "critical", "log"})


def _logged_exceptions(tree: ast.AST) -> list[str]:
    """Log calls given a caught exception object itself as an argument."""
    found = []
    for handler in ast.walk(tree):
        if not isinstance(handler, ast.ExceptHandler) or not handler.name:
            continue
        for call in ast.walk(handler):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
                continue
            if call.func.attr not in _LOG_METHODS:
                continue
            if any(isinstance(arg, ast.Name) and arg.id == handler.name for arg in call.args):
                found.append(f"line {call.lineno}: {ast.unparse(call)}")
    return found


def test_no_log_call_keeps_a_caught_exception() -> None:
    """A log record keeps its arguments: any handler that holds records (a test's capture, a
    memory handler) would hold the exception, its traceback, the frames and an open source cursor
    with them, and a SQLite source stays locked for as long. Logs get the text (`first_line`)."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += [f"{module_name(path)} {hit}" for hit in _logged_exceptions(ast.parse(path.read_text()))]
    assert found == []


def test_the_log_scan_finds_an_exception_passed_to_a_log_call() -> None:
    sample = (
        "try:\n    pass\nexcept OSError as exc:\n"
        "    log.warning('%s: %s', key, exc)\n    log.info('%s', first_line(exc))\n"
    )
    assert _logged_exceptions(ast.parse(sample)) == ["line 4: log.warning('%s: %s', key, exc)"]
