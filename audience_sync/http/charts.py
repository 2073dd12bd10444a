"""Time-series line charts for the status page, drawn on the server as inline SVG.

No JavaScript and nothing fetched: a chart is numbers placed in a fixed viewBox. This module
computes the geometry only (points, ticks, dots); the template writes the SVG elements, so
every text in a chart (a label, a run's status) goes through the template's autoescaping.

A series with more points than the plot has pixel columns is thinned to each column's lowest
and highest value, which keeps its spikes and bounds the page's size whatever the history.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

WIDTH, HEIGHT = 360, 150
LEFT, RIGHT, TOP, BOTTOM = 46, 10, 10, 24  # margins: tick labels left and below
DOTS_UP_TO = 60  # callers label (and so dot) every point of a series up to this long


@dataclass(frozen=True)
class Point:
    at: datetime
    value: float
    label: str  # a point with a label is drawn as a dot with this tooltip; "" draws no dot
    flag: str = ""  # a class for its dot (a failed run)


@dataclass(frozen=True)
class Series:
    name: str
    css: str  # the class that gives the colour
    points: Sequence[Point]


@dataclass(frozen=True)
class Line:
    name: str
    css: str
    points: str  # "x,y x,y ..." in the viewBox


@dataclass(frozen=True)
class Dot:
    x: float
    y: float
    css: str
    label: str


@dataclass(frozen=True)
class Tick:
    at: float  # x or y in the viewBox
    label: str


@dataclass(frozen=True)
class Chart:
    title: str
    summary: str  # the text alternative: what the chart says, in words
    lines: tuple[Line, ...]
    dots: tuple[Dot, ...]
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM

    @property
    def empty(self) -> bool:
        return not any(line.points for line in self.lines)


def line_chart(
    title: str,
    start: datetime,
    end: datetime,
    series: Sequence[Series],
    *,
    unit: Callable[[float], str] = lambda v: compact(v),
) -> Chart:
    """A chart of `series` over [start, end], the y axis from 0 to a round maximum."""
    top_value = nice_ceiling(max((p.value for s in series for p in s.points), default=0))
    span = (end - start).total_seconds() or 1.0

    def x_of(at: datetime) -> float:
        share = min(max((at - start).total_seconds() / span, 0.0), 1.0)
        return round(LEFT + share * (WIDTH - RIGHT - LEFT), 1)

    def y_of(value: float) -> float:
        share = value / top_value if top_value else 0.0
        return round(HEIGHT - BOTTOM - share * (HEIGHT - BOTTOM - TOP), 1)

    lines, dots = [], []
    for s in series:
        placed = [(x_of(p.at), y_of(p.value), p) for p in s.points]
        coordinates = _thin([(x, y) for x, y, _ in placed])
        lines.append(Line(s.name, s.css, " ".join(f"{x},{y}" for x, y in coordinates)))
        dots += [Dot(x, y, f"{s.css} {p.flag}".strip(), p.label) for x, y, p in placed if p.label]
    y_ticks = tuple(Tick(y_of(v), unit(v)) for v in (0, top_value / 2, top_value)) if top_value else ()
    return Chart(
        title=title,
        summary=_summary(title, series, unit),
        lines=tuple(lines),
        dots=tuple(dots),
        y_ticks=y_ticks or (Tick(y_of(0), unit(0)),),
        x_ticks=_x_ticks(start, end, x_of),
    )


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """At most two points per pixel column: its highest and lowest (y grows downwards)."""
    if len(points) <= 2 * (WIDTH - LEFT - RIGHT):
        return points
    columns: dict[int, list[float]] = {}
    for x, y in points:
        columns.setdefault(int(x), []).append(y)
    thinned = []
    for column, ys in columns.items():
        thinned.append((float(column), min(ys)))
        if max(ys) != min(ys):
            thinned.append((float(column), max(ys)))
    return thinned


def _x_ticks(start: datetime, end: datetime, x_of: Callable[[datetime], float]) -> tuple[Tick, ...]:
    fmt = "%H:%M" if end - start <= timedelta(days=2) else "%d %b"
    middle = start + (end - start) / 2
    return tuple(Tick(x_of(at), at.strftime(fmt)) for at in (start, middle, end))


def _summary(title: str, series: Sequence[Series], unit: Callable[[float], str]) -> str:
    parts = []
    for s in series:
        if not s.points:
            parts.append(f"{s.name}: no data")
            continue
        values = [p.value for p in s.points]
        parts.append(
            f"{s.name}: latest {unit(values[-1])}, lowest {unit(min(values))}, highest {unit(max(values))}"
        )
    return f"{title}. " + "; ".join(parts)


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 times 10^n at or above `value` (0 stays 0)."""
    if value <= 0:
        return 0.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power  # pragma: no cover - the loop always returns


def compact(value: float) -> str:
    """1840 -> 1.8k, 2500000 -> 2.5M: an axis label."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}"


def seconds(value: float) -> str:
    """A duration for an axis or a tooltip: 0.4 s, 45 s, 12 min, 2.5 h."""
    if value < 60:
        return f"{value:.2g} s" if value < 10 else f"{value:.0f} s"
    if value < 3600:
        return f"{value / 60:.3g} min"
    return f"{value / 3600:.3g} h"
