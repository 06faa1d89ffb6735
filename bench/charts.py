"""Charts of the benchmarks' results, drawn with Turbo's own SVG renderer (turbo_site.core.charts).

Every benchmark that reports latency percentiles (by concurrency, subscribers or transport) writes its
charts beside its JSON when it finishes (`bench/results/<name>.<chart>.svg`, git-ignored like the JSON):

- `proxy_overhead`: request latency (non-streamed) and time to the first token (streamed), p50 and p99,
  by concurrency, directly against the upstream, through Turbo and through every peer (LiteLLM) and
  server of the run; and the latency each one adds to the direct call;
- `fanout`: the delay from the upstream's delta to each subscriber, p50 and p99, by subscribers per
  chat, per channel layer;
- `stream_transport`: the delay from publishing a chat event to each reader, p50 and p99, per Redis
  transport (Streams, Pub/Sub, the Channels layer).

`bench/charts/` holds the charts that `bench/README.md` shows (committed: bench/results/ is not). After a
run worth showing, redraw them from the latest results:

    .venv/bin/python -m bench.charts            # bench/results/*latest.json -> bench/charts/*.svg
"""

import argparse
import json
import sys
from pathlib import Path

from turbo_site.core.charts import Series, bar_chart

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "bench" / "results"
CHARTS = PROJECT / "bench" / "charts"
# The latest result of each benchmark that has charts (proxy_overhead's is plain "latest.json").
LATEST = {
    "proxy_overhead": "latest.json",
    "fanout": "fanout-latest.json",
    "stream_transport": "stream_transport-latest.json",
}
PERCENTILES = ("p50", "p99")
# One hue per side (p50 light, p99 dark): the upstream directly in grey, Turbo in blue, then the others.
SHADES = [
    ("#a3aab5", "#5b6270"),
    ("#8fbbe8", "#2f6fb3"),
    ("#f3b98a", "#d0641f"),
    ("#9fd4ae", "#2f8a4c"),
    ("#c9b5ea", "#6e4fb0"),
    ("#eaa3ad", "#b33445"),
]
SIZE = {"width": 860, "height": 360}


def benchmark_of(report: dict) -> str | None:
    """Which benchmark wrote `report`, among those with charts."""
    rows = report.get("results") or []
    if rows and all("mode" in row and "concurrency" in row for row in rows):
        return "proxy_overhead"
    if report.get("case") != "many_chats" and rows and all("layer" in row and "subscribers" in row for row in rows):
        return "fanout"
    if rows and all("transport" in row and "delay_p99_ms" in row for row in rows):
        return "stream_transport"
    return None


def _figure(summary: dict | None, figure: str, percentile: str) -> float | None:
    values = (summary or {}).get(figure) or {}
    return values.get(percentile)


def _sides(report: dict) -> list[tuple[str, str]]:
    """(key in each row, label) of everything measured: the upstream directly, Turbo, then the others."""
    described = report.get("sides") or {}
    keys = ["direct", "via_turbo", *(key for key in described if key not in ("direct", "via_turbo"))]
    return [(key, "direct" if key == "direct" else described.get(key, {}).get("label", "Turbo")) for key in keys]


def _proxy_overhead(report: dict) -> dict[str, str]:
    rows = report["results"]
    sides = _sides(report)
    charts = {}
    for mode, figure, name, what in (
        ("plain", "latency_ms", "latency", "Non-streamed request latency"),
        ("stream", "ttft_ms", "ttft", "Streamed time to first token"),
    ):
        cells = sorted((row for row in rows if row["mode"] == mode), key=lambda row: row["concurrency"])
        if not cells:
            continue
        labels = [f"c={row['concurrency']}" for row in cells]
        charts[name] = bar_chart(
            title=f"{what} by concurrency, p50 and p99 (ms)",
            labels=labels,
            series=[
                Series(
                    f"{label} {percentile}",
                    [_figure(row.get(key), figure, percentile) for row in cells],
                    SHADES[place % len(SHADES)][shade],
                )
                for place, (key, label) in enumerate(sides)
                for shade, percentile in enumerate(PERCENTILES)
                if any(row.get(key) for row in cells)
            ],
            unit="ms",
            **SIZE,
        )
        added = [
            Series(
                f"{label} {percentile}",
                [
                    _figure((row.get("added_by_side") or {"via_turbo": row["added"]}).get(key), figure, percentile)
                    for row in cells
                ],
                SHADES[place % len(SHADES)][shade],
            )
            for place, (key, label) in enumerate(sides)
            if key != "direct"
            for shade, percentile in enumerate(PERCENTILES)
            if any(row.get(key) for row in cells)
        ]
        charts[f"{name}-added"] = bar_chart(
            title=f"{what}: added to the direct call, p50 and p99 (ms)", labels=labels, series=added, unit="ms", **SIZE
        )
    return charts


def _fanout(report: dict) -> dict[str, str]:
    rows = report["results"]
    sizes = sorted({row["subscribers"] for row in rows})
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    cell = {(row["layer"], row["subscribers"]): row for row in rows}
    series = [
        Series(
            f"{layer} {percentile}",
            [_figure(cell.get((layer, size)), "delay_ms", percentile) for size in sizes],
            SHADES[(place + 1) % len(SHADES)][shade],
        )
        for place, layer in enumerate(layers)
        for shade, percentile in enumerate(PERCENTILES)
    ]
    return {
        "delay": bar_chart(
            title="Delta delivery delay by subscribers per chat, p50 and p99 (ms)",
            labels=[f"{size} subscriber{'s' if size != 1 else ''}" for size in sizes],
            series=series,
            unit="ms",
            **SIZE,
        )
    }


def _stream_transport(report: dict) -> dict[str, str]:
    rows = report["results"]
    return {
        "delay": bar_chart(
            title="Chat event delivery delay by Redis transport, p50 and p99 of the delivered (ms)",
            labels=[f"{row['transport']} ({row['delivered']} of {row['expected']} delivered)" for row in rows],
            series=[
                Series(percentile, [row.get(f"delay_{percentile}_ms") for row in rows], SHADES[1][shade])
                for shade, percentile in enumerate(PERCENTILES)
            ],
            unit="ms",
            **SIZE,
        )
    }


def report_charts(report: dict) -> dict[str, str]:
    """The charts of one benchmark report, {name: SVG text}; none for a report without any."""
    benchmark = benchmark_of(report)
    if benchmark == "proxy_overhead":
        return _proxy_overhead(report)
    if benchmark == "fanout":
        return _fanout(report)
    if benchmark == "stream_transport":
        return _stream_transport(report)
    return {}


def charts_write(report: dict, json_paths: list[Path]) -> list[Path]:
    """Write the report's charts beside each of its JSON files (`<name>.<chart>.svg`); returns the paths.
    A chart that cannot be drawn is reported, never raised: the JSON is what a run must keep."""
    try:
        charts = report_charts(report)
    except Exception as exc:  # noqa: BLE001 - the results are written already
        print(f"could not draw the charts: {type(exc).__name__}: {exc}", file=sys.stderr)
        return []
    written = []
    for json_path in json_paths:
        for name, svg in charts.items():
            path = json_path.with_name(f"{json_path.stem}.{name}.svg")
            path.write_text(svg + "\n")
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON results are")
    parser.add_argument("--out", type=Path, default=CHARTS, help="where to write the charts (bench/charts)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    drawn = 0
    for benchmark, name in LATEST.items():
        source = args.results / name
        if not source.exists():
            print(f"{benchmark}: no {source} yet (run the benchmark first)", file=sys.stderr)
            continue
        report = json.loads(source.read_text())
        for chart, svg in report_charts(report).items():
            path = args.out / f"{benchmark}-{chart}.svg"
            path.write_text(svg + "\n")
            drawn += 1
            print(f"wrote {path.relative_to(PROJECT) if path.is_relative_to(PROJECT) else path}")
    if not drawn:
        sys.exit("no charts drawn")


if __name__ == "__main__":
    main()
