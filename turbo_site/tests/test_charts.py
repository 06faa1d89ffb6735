"""The SVG chart renderer: well-formed SVG whatever it is given, text escaped, a title per point, and
something sensible for no data."""

import xml.etree.ElementTree as ET
from decimal import Decimal

import pytest

from turbo_site.core.charts import Series, bar_chart, line_chart, number_text

SVG = "{http://www.w3.org/2000/svg}"
CHARTS = [bar_chart, line_chart]


def parsed(svg: str) -> ET.Element:
    root = ET.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def points(root: ET.Element) -> list[ET.Element]:
    return [element for element in root.iter() if element.get("class") == "point"]


@pytest.mark.parametrize("chart", CHARTS)
def test_every_point_is_drawn_with_its_label_series_value_and_title(chart):
    root = parsed(
        chart(
            title="Latency by concurrency",
            labels=["1", "4", "16"],
            series=[Series("direct", [7.5, 9.25, 25]), Series("Turbo", [10, 12.5, 30.125])],
            unit="ms",
        )
    )
    assert root.find(f"{SVG}title").text == "Latency by concurrency"
    assert root.get("aria-label") == "Latency by concurrency"
    drawn = [(p.get("data-label"), p.get("data-series"), p.get("data-value")) for p in points(root)]
    assert sorted(drawn) == sorted(
        [
            ("1", "direct", "7.5"),
            ("4", "direct", "9.25"),
            ("16", "direct", "25"),
            ("1", "Turbo", "10"),
            ("4", "Turbo", "12.5"),
            ("16", "Turbo", "30.125"),
        ]
    )
    titles = [p.find(f"{SVG}title").text for p in points(root)]
    assert "16, Turbo: 30.125 ms" in titles
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "direct" in texts and "Turbo" in texts  # a legend for two series
    assert "1" in texts and "16" in texts  # the labels under the axis
    assert "ms" in texts  # the unit beside the value axis


@pytest.mark.parametrize("chart", CHARTS)
def test_text_is_escaped(chart):
    nasty = '<script>alert("x")</script> & </svg>'
    svg = chart(title=nasty, labels=[nasty, "b"], series=[Series(nasty, [1, 2]), Series("other", [3, 4])])
    root = parsed(svg)  # would not parse if anything leaked through
    assert "<script>" not in svg
    assert root.find(f"{SVG}title").text == nasty
    assert root.get("aria-label") == nasty
    assert any(p.get("data-series") == nasty and p.get("data-label") == nasty for p in points(root))
    assert not list(root.iter("script")) and not list(root.iter(f"{SVG}script"))


@pytest.mark.parametrize("chart", CHARTS)
@pytest.mark.parametrize(
    ("labels", "series"),
    [([], []), (["a", "b"], []), ([], [Series("s", [])]), (["a", "b"], [Series("s", [None, None])])],
)
def test_no_data_is_an_empty_chart_that_says_so(chart, labels, series):
    root = parsed(chart(title="Nothing yet", labels=labels, series=series))
    assert points(root) == []
    assert "no data" in [t.text for t in root.iter(f"{SVG}text")]


def test_bars_go_both_ways_from_zero_and_skip_missing_values():
    root = parsed(bar_chart(title="added", labels=["a", "b", "c"], series=[Series("s", [-3.2, None, 5])]))
    bars = {p.get("data-label"): p for p in points(root)}
    assert set(bars) == {"a", "c"}
    axis = next(
        line for line in root.iter(f"{SVG}line") if line.get("class") == "axis" and line.get("y1") == line.get("y2")
    )
    zero = float(axis.get("y1"))
    negative, positive = bars["a"], bars["c"]
    assert float(negative.get("y")) == pytest.approx(zero, abs=0.1)  # hangs down from the zero line
    assert float(positive.get("y")) + float(positive.get("height")) == pytest.approx(zero, abs=0.1)
    assert float(negative.get("height")) > 0 and float(positive.get("height")) > float(negative.get("height"))


def test_a_line_breaks_where_a_value_is_missing():
    root = parsed(line_chart(title="t", labels=list("abcde"), series=[Series("s", [1, 2, None, 4, 5])]))
    lines = list(root.iter(f"{SVG}polyline"))
    assert len(lines) == 2 and all(len(line.get("points").split()) == 2 for line in lines)
    assert len(points(root)) == 4


def test_many_labels_are_thinned_under_the_axis_but_every_point_keeps_its_own():
    labels = [f"2026-12-{day:02d} {hour:02d}:00" for day in range(1, 8) for hour in range(24)]
    root = parsed(line_chart(title="per hour", labels=labels, series=[Series("requests", list(range(len(labels))))]))
    assert len(points(root)) == len(labels)
    shown = [t.text for t in root.iter(f"{SVG}text") if t.text in labels]
    assert 2 <= len(shown) <= 12


def test_values_are_shown_as_people_read_them():
    assert number_text(Decimal("0.0000123000")) == "0.0000123"
    assert number_text(Decimal("0")) == "0"
    assert number_text(1234) == "1,234"
    assert number_text(3.0) == "3"
    assert number_text(2.4567) == "2.457"
    assert number_text(1234.56) == "1,234.6"
    assert number_text(None) == "-"
    root = parsed(bar_chart(title="cost", labels=["d"], series=[Series("cost", [Decimal("0.00450645")])], unit="USD"))
    (point,) = points(root)
    assert point.get("data-value") == "0.00450645"  # a cost is exact: no float rounding


def test_counts_get_whole_ticks_and_a_lone_bar_stays_narrow():
    root = parsed(bar_chart(title="failed calls", labels=["today"], series=[Series("5xx", [1])], width=860))
    ticks = [t.text for t in root.iter(f"{SVG}text") if t.get("text-anchor") == "end"]
    assert ticks == ["0", "1"]
    (bar,) = points(root)
    assert float(bar.get("width")) < 100
