"""Bar and line charts as standalone SVG text, with no dependency: the admin's Usage page draws them inline
and the benchmarks write them as files (bench/charts.py).

Every chart has axes with labelled ticks, a legend when it has more than one series, and a `<title>` (a
tooltip) on every point naming its label, series and value; each point also carries `data-label`,
`data-series` and `data-value`, so a test (or a script) can read back what was drawn. Every text is
escaped. Styling is in presentation attributes, so a file opened on its own looks the same as the page.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from xml.sax.saxutils import escape, quoteattr

Number = int | float | Decimal

PALETTE = ("#2f6fb3", "#e07b39", "#3a9a5b", "#b8434e", "#7a5cb8", "#8c6d3f", "#c2569f", "#6b7280")
FONT = "system-ui, -apple-system, 'Segoe UI', Roboto, sans-serif"
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 64, 16, 36, 48
LEGEND_ROW = 18
MAX_X_LABELS = 12
MAX_BAR_WIDTH = 64
CHAR_WIDTH = 6.5  # about, at font-size 11: enough to keep labels under the axis apart


@dataclass(frozen=True)
class Series:
    """One named row of values, one per label of the chart (None: nothing to draw there)."""

    name: str
    values: Sequence[Number | None]
    color: str | None = None  # a CSS colour; None: the palette's, by the series' place


def _color(series: Sequence["Series"], index: int) -> str:
    return escape(series[index].color or PALETTE[index % len(PALETTE)], {'"': "&quot;"})


def _legend(series: Sequence["Series"], left: float, right: float) -> list[tuple[float, int]]:
    """Where each legend entry goes, (x, row), left to right and wrapped to the chart's width; none for
    a single series (the title names it)."""
    if len(series) < 2:
        return []
    places, x, row = [], left, 0
    for entry in series:
        width = 16 + len(entry.name) * CHAR_WIDTH + 18
        if x > left and x + width > right:
            x, row = left, row + 1
        places.append((x, row))
        x += width
    return places


def number_text(value: Number | None) -> str:
    """A value as people read it: `12`, `3.25`, `1,234`, `0.0000123` (a Decimal is shown exactly)."""
    if value is None:
        return "-"
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value else "0"
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    if abs(value) >= 100:
        return f"{value:,.1f}"
    return f"{value:.3f}".rstrip("0").rstrip(".") if abs(value) >= 0.001 else f"{value:.3g}"


def _nice_step(span: float, ticks: int) -> float:
    """A tick step of 1, 2 or 5 times a power of ten, about span / ticks."""
    raw = span / max(ticks, 1)
    power = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * power:
            return factor * power
    return 10 * power


def _scale(values: list[float], ticks: int = 5, *, whole: bool = False) -> tuple[float, float, list[float]]:
    """The y range, from nice numbers around every value and zero, and its ticks."""
    low, high = min([0.0, *values]), max([0.0, *values])
    if high == low:
        high = low + 1
    step = _nice_step(high - low, ticks)
    if whole:  # counts: no tick between two whole numbers
        step = max(step, 1.0)
    bottom = math.floor(low / step) * step
    top = math.ceil(high / step) * step
    count = round((top - bottom) / step)
    return bottom, top, [bottom + step * index for index in range(count + 1)]


def _attr(value: object) -> str:
    return quoteattr(str(value))


def _text(x: float, y: float, content: str, *, anchor: str = "middle", size: int = 11, **extra: object) -> str:
    attributes = "".join(f" {name.replace('_', '-')}={_attr(value)}" for name, value in extra.items())
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" fill="#333"'
        f"{attributes}>{escape(content)}</text>"
    )


class _Frame:
    """The plot area of one chart: where each label and value lands."""

    def __init__(self, *, width: int, height: int, labels: Sequence[str], series: Sequence[Series]):
        self.width, self.height = width, height
        self.labels = [str(label) for label in labels]
        self.legend = _legend(series, MARGIN_LEFT, width - MARGIN_RIGHT)
        legend_rows = max((row for _, row in self.legend), default=-1) + 1
        self.left, self.right = MARGIN_LEFT, width - MARGIN_RIGHT
        self.top = MARGIN_TOP + legend_rows * LEGEND_ROW
        self.bottom = height - MARGIN_BOTTOM
        drawn = [float(value) for row in series for value in row.values if value is not None]
        self.has_data = bool(drawn) and bool(self.labels)
        whole = all(isinstance(value, int) for row in series for value in row.values if value is not None)
        self.low, self.high, self.ticks = _scale(drawn, whole=whole)
        self.slot = (self.right - self.left) / max(len(self.labels), 1)

    def y(self, value: float) -> float:
        fraction = (value - self.low) / (self.high - self.low)
        return self.bottom - fraction * (self.bottom - self.top)

    def x_center(self, index: int) -> float:
        return self.left + self.slot * (index + 0.5)


def _open(frame: _Frame, title: str, unit: str, series: Sequence[Series], kind: str) -> list[str]:
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart chart-{kind}" role="img" '
        f'width="{frame.width}" height="{frame.height}" viewBox="0 0 {frame.width} {frame.height}" '
        f'font-family="{FONT}" aria-label={_attr(title)}>',
        f"<title>{escape(title)}</title>",
        f'<rect width="{frame.width}" height="{frame.height}" fill="#fff"/>',
        _text(frame.left, 18, title, anchor="start", size=13, font_weight="600"),
    ]
    if len(series) > 1:
        for index, (x, line) in enumerate(frame.legend):
            y = MARGIN_TOP - 2 + line * LEGEND_ROW
            parts.append(
                f'<rect class="legend" x="{x:.1f}" y="{y - 9}" width="10" height="10" fill="{_color(series, index)}"/>'
            )
            parts.append(_text(x + 16, y, series[index].name, anchor="start"))
    # Horizontal grid lines with the value of each, then the axes.
    for tick in frame.ticks:
        y = frame.y(tick)
        parts.append(f'<line x1="{frame.left}" y1="{y:.1f}" x2="{frame.right}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        parts.append(_text(frame.left - 6, y + 4, number_text(round(tick, 10)), anchor="end"))
    if unit:
        parts.append(
            _text(
                14,
                (frame.top + frame.bottom) / 2,
                unit,
                transform=f"rotate(-90 14 {(frame.top + frame.bottom) / 2:.1f})",
            )
        )
    baseline = frame.y(0.0)
    parts.append(
        f'<line class="axis" x1="{frame.left}" y1="{frame.top}" x2="{frame.left}" y2="{frame.bottom}" stroke="#555"/>'
    )
    parts.append(
        f'<line class="axis" x1="{frame.left}" y1="{baseline:.1f}" x2="{frame.right}" y2="{baseline:.1f}" '
        'stroke="#555"/>'
    )
    # Every label when they fit, else every n-th (the points keep their own titles).
    widest = max((len(label) for label in frame.labels), default=1) * CHAR_WIDTH + 12
    fitting = max(1, min(MAX_X_LABELS, int((frame.right - frame.left) // widest)))
    every = max(1, math.ceil(len(frame.labels) / fitting))
    for index, label in enumerate(frame.labels):
        if index % every == 0:
            parts.append(_text(frame.x_center(index), frame.bottom + 16, label))
    if not frame.has_data:
        parts.append(_text((frame.left + frame.right) / 2, (frame.top + frame.bottom) / 2, "no data", size=13))
    return parts


def _point_title(label: str, row: Series, value: Number, unit: str, value_text: Callable[[Number], str]) -> str:
    shown = value_text(value) + (f" {unit}" if unit else "")
    return f"{label}, {row.name}: {shown}"


def _point_data(label: str, row: Series, value: Number, value_text: Callable[[Number], str]) -> str:
    return f"data-label={_attr(label)} data-series={_attr(row.name)} data-value={_attr(value_text(value))}"


def bar_chart(
    *,
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    unit: str = "",
    width: int = 720,
    height: int = 300,
    value_text: Callable[[Number], str] = number_text,
) -> str:
    """Bars per label, side by side when there are several series; returns `<svg ...>...</svg>`."""
    frame = _Frame(width=width, height=height, labels=labels, series=series)
    parts = _open(frame, title, unit, series, "bar")
    band = min(frame.slot * 0.8, MAX_BAR_WIDTH * max(len(series), 1))
    bar_width = band / max(len(series), 1)
    baseline = frame.y(0.0)
    for index, label in enumerate(frame.labels):
        start = frame.x_center(index) - band / 2
        for number, row in enumerate(series):
            value = row.values[index] if index < len(row.values) else None
            if value is None:
                continue
            y = frame.y(float(value))
            top, size = min(y, baseline), abs(baseline - y)
            parts.append(
                f'<rect class="point" x="{start + number * bar_width:.1f}" y="{top:.1f}" '
                f'width="{max(bar_width - 1, 1):.1f}" height="{size:.1f}" fill="{_color(series, number)}" '
                f"{_point_data(label, row, value, value_text)}>"
                f"<title>{escape(_point_title(label, row, value, unit, value_text))}</title></rect>"
            )
    parts.append("</svg>")
    return "\n".join(parts)


def line_chart(
    *,
    title: str,
    labels: Sequence[str],
    series: Sequence[Series],
    unit: str = "",
    width: int = 720,
    height: int = 300,
    value_text: Callable[[Number], str] = number_text,
) -> str:
    """A line per series through its points (broken where a value is None); returns `<svg ...>...</svg>`."""
    frame = _Frame(width=width, height=height, labels=labels, series=series)
    parts = _open(frame, title, unit, series, "line")
    for number, row in enumerate(series):
        color = _color(series, number)
        runs: list[list[str]] = [[]]
        dots = []
        for index, label in enumerate(frame.labels):
            value = row.values[index] if index < len(row.values) else None
            if value is None:
                runs.append([])
                continue
            x, y = frame.x_center(index), frame.y(float(value))
            runs[-1].append(f"{x:.1f},{y:.1f}")
            dots.append(
                f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3.5" fill="{color}" '
                f"{_point_data(label, row, value, value_text)}>"
                f"<title>{escape(_point_title(label, row, value, unit, value_text))}</title></circle>"
            )
        for points in runs:
            if len(points) > 1:
                parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(points)}"/>')
        parts.extend(dots)
    parts.append("</svg>")
    return "\n".join(parts)
