"""Parsing a definition (an audience's `condition`, a trait's `value`) into the AST of ast.py.

lark parses the text with an LALR grammar (grammar.lark) that accepts any chain of calls and
any comparison; the transformer below then checks what may follow what, so that every
mistake is reported on one line with its position and, where it helps, the fix:

    condition: expected ')' or ',' at column 35: "...'Order Completed').within(30 days ^.count() >= 1"
    condition: unknown function 'wihtin' at column 26 (did you mean 'within'?): "..."

Every error is a ConfigError; the caller prefixes the audience's name.
"""

from __future__ import annotations

import difflib
import functools
import re
from dataclasses import dataclass, replace
from datetime import timedelta
from importlib.resources import files
from typing import Any, NoReturn

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedInput, UnexpectedToken, VisitError
from lark.tree import Meta

from audience_sync.errors import ConfigError

from .ast import (
    NOWHERE,
    Aggregate,
    AggregateFunction,
    And,
    AudienceRef,
    Compare,
    CompareOp,
    Condition,
    Literal,
    Not,
    Or,
    Position,
    Property,
    Scalar,
    Stream,
    Trait,
    Value,
    Window,
    walk,
)

EXCERPT = 24  # characters shown on each side of an error's position

STREAM_FUNCTIONS = ("where", "within", "between")
_REDUCERS: dict[str, AggregateFunction] = {
    "sum": "sum", "avg": "avg", "min": "min", "max": "max",
    "first": "first", "last": "last", "mode": "mode", "unique": "unique",
}  # fmt: skip
AGGREGATES = ("count", *_REDUCERS)
# Segment's comparator functions, with the symbols that are sugar for the first six.
COMPARATORS: dict[str, CompareOp] = {
    "equals": "=",
    "differs": "!=",
    "greater_than": ">",
    "at_least": ">=",
    "less_than": "<",
    "at_most": "<=",
    "exists": "exists",
    "absent": "absent",
    "contains": "contains",
    "omits": "omits",
    "starts_with": "starts_with",
    "ends_with": "ends_with",
    "one_of": "one_of",
}
SYMBOLS: dict[str, CompareOp] = {"=": "=", "==": "=", "!=": "!=", "<": "<", "<=": "<=", ">": ">", ">=": ">="}
EXTRACTORS = ("event", "trait", "property", "audience", "literal")
KNOWN = EXTRACTORS + STREAM_FUNCTIONS + AGGREGATES + tuple(COMPARATORS)
_TEXT_TESTS = ("contains", "omits", "starts_with", "ends_with")
_NUMBERS = ("count", "unique_count", "sum", "avg")  # aggregates that are always numbers
_OP_NAMES = {op: name for name, op in COMPARATORS.items()}
FLIPPED: dict[CompareOp, CompareOp] = {"=": "=", "!=": "!=", "<": ">", "<=": ">=", ">": "<", ">=": "<="}

# How lark's terminal names read in an error, in the order they are listed.
_TERMINALS = {
    "RPAR": "')'",
    "COMMA": "','",
    "DOT": "'.'",
    "COMP_OP": "a comparison (= != < <= > >=)",
    "UNIT": "'days' or 'hours'",
    "_AND": "'and'",
    "_OR": "'or'",
    "$END": "the end",
}
_VALUE_STARTS = {"STRING", "NUMBER", "NAME", "TRUE", "FALSE", "LPAR", "_NOT"}


def parse_condition(text: str) -> Condition:
    """An audience's condition: a comparison, or several joined by and/or/not."""
    result = _parse(text, "condition")
    if not isinstance(result, Compare | And | Or | Not | AudienceRef):
        _fail(text, _position_of(result), "condition", _not_a_condition(result))
    _no_property_outside_where(text, result, "condition")
    return result


def parse_value(text: str) -> Value:
    """A trait's value: an aggregate of an event stream, or trait('name')."""
    result = _parse(text, "value")
    if isinstance(result, Aggregate | Trait):
        _no_property_outside_where(text, result, "value")
        return result
    if isinstance(result, Property):
        _fail(text, result.at, "value", "property(...) belongs inside where(...) or an aggregate")
    if isinstance(result, _StreamSoFar):
        _fail(text, result.at, "value", f"{result.describe()} needs an aggregate, e.g. .count()")
    _fail(
        text,
        _position_of(result),
        "value",
        "a value is an aggregate (e.g. .sum(property('x'))) or trait('x')",
    )


# --- lark ------------------------------------------------------------------------------------


@functools.cache
def _lark() -> Lark:
    grammar = files(__package__).joinpath("grammar.lark").read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def _parse(text: str, what: str) -> Any:
    if not text.strip():
        raise ConfigError(f"{what}: empty")
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as exc:
        _syntax_error(text, exc, what)
    try:
        return _Builder(text, what).transform(tree)
    except VisitError as exc:
        if isinstance(exc.orig_exc, ConfigError):
            raise exc.orig_exc from None
        raise


def _syntax_error(text: str, exc: UnexpectedInput, what: str) -> NoReturn:
    if isinstance(exc, UnexpectedToken):
        token = exc.token
        if token.type == "$END":
            found, at = "the end", _end_of(text)
        else:
            found, at = repr(str(token.value)), (token.line or 1, token.column or 1)
        message = f"expected {_expected(exc.expected)}, found {found}"
    elif isinstance(exc, UnexpectedCharacters):
        at = (exc.line, exc.column)
        message = f"unexpected character {exc.char!r}"
        if exc.char in "\u2018\u2019\u201c\u201d":
            message += " (an unmatched typographic quote: use straight quotes)"
        elif exc.char in "'\"":
            message += " (a quote that is never closed)"
    else:  # pragma: no cover - LALR raises only the two above
        at, message = (exc.line, exc.column), "syntax error"
    _fail(text, at, what, message)


def _expected(names: set[str]) -> str:
    words = [_TERMINALS[name] for name in _TERMINALS if name in names]
    if names == {"LPAR"}:  # after a function's name
        words.append("'('")
    elif names & _VALUE_STARTS:
        words.append("a value")
    words += sorted(name for name in names if name not in _TERMINALS and name not in _VALUE_STARTS)
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " or " + words[-1]


def _end_of(text: str) -> Position:
    lines = text.rstrip().split("\n")
    return (len(lines), len(lines[-1]) + 1)


def _fail(text: str, at: Position, what: str, message: str) -> NoReturn:
    """Raise the one-line error: the message, the position, and the text around it."""
    line, column = at
    if line <= 0:
        raise ConfigError(f"{what}: {message}")
    lines = text.split("\n")
    where = f"column {column}" if len(lines) == 1 else f"line {line}, column {column}"
    source = lines[line - 1] if line <= len(lines) else ""
    before, after = source[: column - 1], source[column - 1 :]
    before = ("..." + before[-EXCERPT:]) if len(before) > EXCERPT else before
    after = (after[:EXCERPT] + "...") if len(after) > EXCERPT else after
    excerpt = re.sub(r"\s+", " ", f"{before}^{after}").strip()
    raise ConfigError(f'{what}: {message} at {where}: "{excerpt}"')


# --- from the parse tree to the AST -----------------------------------------------------------


@dataclass(frozen=True)
class _Duration:
    delta: timedelta
    at: Position


@dataclass(frozen=True)
class _Call:
    name: str
    arguments: tuple[Any, ...]
    at: Position


@dataclass(frozen=True)
class _StreamSoFar:
    """`event(...)` and its filters, before the aggregate that makes it a value."""

    stream: Stream
    at: Position
    has_window: bool = False

    def describe(self) -> str:
        return f"event({self.stream.event!r})"


def _meta_position(meta: Meta) -> Position:
    return (getattr(meta, "line", 0) or 0, getattr(meta, "column", 0) or 0)


def _position_of(node: object) -> Position:
    at: Position = getattr(node, "at", NOWHERE)
    if at != NOWHERE:
        return at
    if isinstance(node, And | Or):
        return _position_of(node.items[0])
    if isinstance(node, Not):
        return _position_of(node.item)
    if isinstance(node, Compare):
        return _position_of(node.subject)
    return NOWHERE


def _not_a_condition(node: object) -> str:
    if isinstance(node, _StreamSoFar):
        return f"{node.describe()} needs an aggregate and a comparison, e.g. .count() >= 1"
    if isinstance(node, Aggregate | Trait | Property):
        return f"{_describe(node)} is a value, not a condition: compare it, e.g. >= 1"
    if isinstance(node, Literal):
        return f"{node.value!r} is a literal, not a condition"
    return "not a condition"


def _describe(node: object) -> str:
    if isinstance(node, Aggregate):
        argument = "" if node.property_name is None else f"property({node.property_name!r})"
        name = "unique" if node.function == "unique_count" else node.function
        tail = ".count()" if node.function == "unique_count" else ""
        return f"event({node.stream.event!r})...{name}({argument}){tail}"
    if isinstance(node, Trait):
        return f"trait({node.name!r})"
    if isinstance(node, Property):
        return f"property({node.name!r})"
    if isinstance(node, _StreamSoFar):
        return node.describe()
    return "this"


def _no_property_outside_where(text: str, node: Condition | Value, what: str) -> None:
    """property(...) names a column of an event row: it has no meaning for a user."""
    pending: list[object] = [node]
    while pending:
        item = pending.pop()
        if isinstance(item, And | Or):
            pending.extend(item.items)
        elif isinstance(item, Not):
            pending.append(item.item)
        elif isinstance(item, Compare) and isinstance(item.subject, Property):
            _fail(text, item.subject.at, what, "property(...) belongs inside where(...) or an aggregate")


@v_args(meta=True)
class _Builder(Transformer[Token, Any]):
    """Bottom-up: each rule's children are already AST nodes (or the helpers above)."""

    def __init__(self, text: str, what: str) -> None:
        super().__init__()
        self.text, self.what = text, what

    def fail(self, at: Position, message: str) -> NoReturn:
        _fail(self.text, at, self.what, message)

    # literals

    def string(self, meta: Meta, children: list[Token]) -> Literal:
        raw = str(children[0])
        body = raw[1:-1]
        if raw[0] in "'\"":
            body = re.sub(r"\\(.)", r"\1", body, flags=re.DOTALL)
        return Literal(body, "text")

    def number(self, meta: Meta, children: list[Token]) -> Literal:
        raw = str(children[0])
        if re.fullmatch(r"[+-]?\d+", raw):
            return Literal(int(raw), "number")
        return Literal(float(raw), "number")

    def true(self, meta: Meta, children: list[Token]) -> Literal:
        return Literal(True, "boolean")

    def false(self, meta: Meta, children: list[Token]) -> Literal:
        return Literal(False, "boolean")

    def duration(self, meta: Meta, children: list[Token]) -> _Duration:
        amount, unit = str(children[0]), str(children[1]).lower()
        at = _meta_position(meta)
        if not re.fullmatch(r"\+?\d+", amount) or int(amount) <= 0:
            self.fail(at, f"a window is a whole number of days or hours above 0, not {amount}")
        count = int(amount)
        return _Duration(timedelta(days=count) if unit.startswith("day") else timedelta(hours=count), at)

    # boolean structure

    def or_(self, meta: Meta, children: list[Any]) -> Or:
        items = [self.condition(child) for child in children]
        return Or(tuple(part for item in items for part in (item.items if isinstance(item, Or) else (item,))))

    def and_(self, meta: Meta, children: list[Any]) -> And:
        items = [self.condition(child) for child in children]
        return And(
            tuple(part for item in items for part in (item.items if isinstance(item, And) else (item,)))
        )

    def not_(self, meta: Meta, children: list[Any]) -> Not:
        return Not(self.condition(children[0]))

    def condition(self, node: Any) -> Condition:
        if isinstance(node, Compare | And | Or | Not | AudienceRef):
            return node
        self.fail(_position_of(node), _not_a_condition(node))

    def compare(self, meta: Meta, children: list[Any]) -> Compare:
        left, token, right = children
        op = SYMBOLS[str(token)]
        at = (token.line or 0, token.column or 0)
        if isinstance(left, Literal) and not isinstance(right, Literal):
            left, right, op = right, left, FLIPPED[op]  # `100 <= x` is `x >= 100`
        subject = self.scalar(left, f"'{token}'", at)
        if not isinstance(right, Literal):
            self.fail(at, f"compare {_describe(subject)} with a literal (text, a number, true or false)")
        self.operands(subject, op, (right,), at)
        return Compare(subject, op, (right,), at=_position_of(subject))

    def operands(self, subject: Scalar, op: CompareOp, literals: tuple[Literal, ...], at: Position) -> None:
        """Literals a comparison can take: a count or a sum is a number; text tests take text."""
        if op in _TEXT_TESTS and any(not literal.value for literal in literals):
            self.fail(at, f"{_OP_NAMES.get(op, op)}(...) takes non-empty text")
        if isinstance(subject, Aggregate) and subject.function in _NUMBERS:
            if op in _TEXT_TESTS:
                self.fail(at, f"{_describe(subject)} is a number: {op}(...) tests text")
            if any(literal.kind != "number" for literal in literals):
                self.fail(at, f"{_describe(subject)} is a number: compare it with a number")

    def scalar(self, node: Any, before: str, at: Position) -> Scalar:
        """The value a comparison applies to; `before` names the comparison in errors."""
        if isinstance(node, Aggregate) and node.is_list:
            self.fail(
                node.at,
                "unique(...) is a list: compare unique(...).count(), or use it as a trait's value",
            )
        if isinstance(node, Aggregate | Trait | Property):
            return node
        if isinstance(node, _StreamSoFar):
            self.fail(node.at, f"{node.describe()} needs an aggregate before {before}, e.g. .count()")
        if isinstance(node, Literal):
            self.fail(at, f"{before} compares a value (an aggregate, trait or property), not a literal")
        self.fail(
            _position_of(node) if _position_of(node) != NOWHERE else at,
            f"nothing can be compared with {before} here",
        )

    # calls

    def call(self, meta: Meta, children: list[Any]) -> _Call:
        name = children[0]
        arguments = tuple(child for child in children[1:] if child is not None)
        return _Call(str(name), arguments, (name.line or 0, name.column or 0))

    def chain(self, meta: Meta, children: list[_Call]) -> Any:
        first, rest = children[0], children[1:]
        current = self.extractor(first)
        for call in rest:
            current = self.apply(current, call)
        return current

    def unknown(self, call: _Call) -> NoReturn:
        close = difflib.get_close_matches(call.name.lower(), KNOWN, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        self.fail(call.at, f"unknown function {call.name!r}{hint}")

    def extractor(self, call: _Call) -> Any:
        name = call.name
        if name == "event":
            event = self.text_argument(call)
            return _StreamSoFar(Stream(event), call.at)
        if name == "trait":
            return Trait(self.text_argument(call), at=call.at)
        if name == "property":
            return Property(self.text_argument(call), at=call.at)
        if name == "audience":
            return AudienceRef(self.text_argument(call), at=call.at)
        if name == "literal":
            self.arity(call, 1)
            if not isinstance(call.arguments[0], Literal):
                self.fail(call.at, "literal(...) takes text, a number, true or false")
            return call.arguments[0]
        if name in KNOWN:
            self.fail(
                call.at,
                f"{name}(...) cannot start an expression: start with event(...), trait(...) or audience(...)",
            )
        self.unknown(call)

    def apply(self, current: Any, call: _Call) -> Any:
        name = call.name
        if name not in KNOWN:
            self.unknown(call)
        if isinstance(current, _StreamSoFar):
            return self.on_stream(current, call)
        if isinstance(current, Aggregate) and current.is_list:
            if name == "count":
                self.arity(call, 0)
                return replace(current, function="unique_count")
            self.fail(call.at, f"unique(...) is a list: only .count() may follow it, not {name}(...)")
        if isinstance(current, Aggregate | Trait | Property):
            if name in COMPARATORS:
                return self.comparator(current, call)
            if name in AGGREGATES or name in STREAM_FUNCTIONS:
                self.fail(call.at, f"{name}(...) follows event(...), not {_describe(current)}")
        if isinstance(current, Compare | And | Or | Not | AudienceRef):
            self.fail(call.at, f"nothing can follow a condition: {name}(...)")
        if isinstance(current, Literal):
            self.fail(call.at, f"nothing can follow a literal: {name}(...)")
        self.fail(call.at, f"{name}(...) cannot follow {_describe(current)}")

    def on_stream(self, current: _StreamSoFar, call: _Call) -> Any:
        name, stream = call.name, current.stream
        if name == "where":
            self.arity(call, 1)
            condition = self.filter(call.arguments[0], call)
            where = condition if stream.where is None else And((stream.where, condition))
            return replace(current, stream=replace(stream, where=where))
        if name in ("within", "between"):
            if current.has_window:
                self.fail(
                    call.at, "a stream takes one window: within(...) or between(...), not both or twice"
                )
            window = self.within(call) if name == "within" else self.between(call)
            return replace(current, stream=replace(stream, window=window), has_window=True)
        if name == "count":
            self.arity(call, 0, "count() takes no argument (count what: add .where(...) before it)")
            return Aggregate(stream, "count", at=call.at)
        if name in AGGREGATES:
            if name == "mode":
                if len(call.arguments) not in (1, 2):
                    self.fail(call.at, "mode(...) takes property('name') and an optional minimum frequency")
                minimum = self.minimum_frequency(call) if len(call.arguments) == 2 else None
                return Aggregate(stream, "mode", self.property_argument(call), minimum, at=call.at)
            self.arity(call, 1, f"{name}(...) takes property('name'), e.g. {name}(property('revenue'))")
            return Aggregate(stream, _REDUCERS[name], self.property_argument(call), at=call.at)
        self.fail(call.at, f"{current.describe()} needs an aggregate before {name}(...), e.g. .count()")

    def filter(self, argument: Any, call: _Call) -> Condition:
        """where(...)'s argument: a condition over the event's properties only."""
        if isinstance(argument, _Duration):
            self.fail(
                argument.at,
                "where(...) takes a condition on properties, e.g. where(property('price') >= 100)",
            )
        condition = self.condition(argument)
        for node in walk(condition):
            if isinstance(node, AudienceRef):
                self.fail(
                    node.at, "where(...) filters events by their properties: audience(...) belongs outside it"
                )
            if isinstance(node, Compare) and not isinstance(node.subject, Property):
                self.fail(
                    node.at,
                    f"where(...) compares properties with literals: {_describe(node.subject)} goes outside",
                )
        return condition

    def within(self, call: _Call) -> Window:
        self.arity(call, 1, "within(...) takes one duration, e.g. within(30 days)")
        return Window(timedelta(0), self.duration_argument(call.arguments[0], call))

    def between(self, call: _Call) -> Window:
        self.arity(call, 2, "between(...) takes two durations ago, e.g. between(7 days, 14 days)")
        first, second = (self.duration_argument(argument, call) for argument in call.arguments)
        if first == second:
            self.fail(call.at, "between(...) of two equal durations is an empty window")
        return Window(min(first, second), max(first, second))

    def duration_argument(self, argument: Any, call: _Call) -> timedelta:
        if not isinstance(argument, _Duration):
            self.fail(call.at, f"{call.name}(...) takes durations such as 30 days or 12 hours")
        return argument.delta

    def minimum_frequency(self, call: _Call) -> int:
        minimum = call.arguments[1]
        if not (isinstance(minimum, Literal) and minimum.kind == "number" and isinstance(minimum.value, int)):
            self.fail(call.at, "mode(...)'s second argument is a whole number (the minimum frequency)")
        if minimum.value < 1:
            self.fail(call.at, "mode(...)'s minimum frequency is at least 1")
        return int(minimum.value)

    def property_argument(self, call: _Call) -> str:
        argument = call.arguments[0]
        if not isinstance(argument, Property):
            self.fail(
                call.at, f"{call.name}(...) takes property('name'), e.g. {call.name}(property('revenue'))"
            )
        return argument.name

    def text_argument(self, call: _Call) -> str:
        self.arity(call, 1, f"{call.name}(...) takes one quoted name, e.g. {call.name}('Order Completed')")
        argument = call.arguments[0]
        if not (isinstance(argument, Literal) and argument.kind == "text"):
            self.fail(call.at, f"{call.name}(...) takes a quoted name, e.g. {call.name}('Order Completed')")
        if not str(argument.value).strip():
            self.fail(call.at, f"{call.name}(...) with an empty name")
        return str(argument.value)

    def arity(self, call: _Call, count: int, message: str | None = None) -> None:
        if len(call.arguments) != count:
            wanted = {0: "no argument", 1: "one argument"}.get(count, f"{count} arguments")
            self.fail(call.at, message or f"{call.name}(...) takes {wanted}")

    def comparator(self, subject: Scalar, call: _Call) -> Compare:
        op = COMPARATORS[call.name]
        arguments = call.arguments
        if op in ("exists", "absent"):
            self.arity(call, 0)
        elif op in ("contains", "omits", "one_of"):
            if not arguments:
                self.fail(call.at, f"{call.name}(...) takes at least one value")
        else:
            self.arity(call, 1)
        literals: list[Literal] = []
        for argument in arguments:
            if not isinstance(argument, Literal):
                self.fail(call.at, f"{call.name}(...) takes literals (text, numbers, true or false)")
            if op in _TEXT_TESTS and argument.kind != "text":
                self.fail(call.at, f"{call.name}(...) takes quoted text")
            literals.append(argument)
        self.operands(subject, op, tuple(literals), call.at)
        return Compare(subject, op, tuple(literals), at=_position_of(subject))
