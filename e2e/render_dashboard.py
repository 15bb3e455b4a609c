"""A picture of the Grafana dashboard without Grafana: read the dashboard's JSON, evaluate each
panel's PromQL targets (template variables filled in) as range queries against a Prometheus,
and draw the panels in the dashboard's grid layout with matplotlib.

Only the dashboard's JSON format is read (panels, gridPos, targets, legendFormat, the unit);
none of Grafana's code is used. The committed docs/dashboard.png comes from one run of the e2e
test that drives real runtimes (e2e/test_monitoring.py, the picture test); see
docs/monitoring.md.

    python -m e2e.render_dashboard --prometheus http://127.0.0.1:9090 \\
        --var namespace=ml-team --var model=scorer --var version='.*' \\
        --minutes 10 --out dashboard.png
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "charts" / "kubeonnx" / "monitoring" / "dashboard.json"
ROW_HEIGHT_IN = 0.45  # inches per grid unit of height (Grafana: 30 px)
COL_WIDTH_IN = 0.85  # inches per grid column (Grafana: 24 columns across)
DPI = 80
# Grafana's built-in interval variables; the others are the dashboard's own.
BUILTIN = {"__rate_interval": "1m", "__interval": "15s"}


@dataclass
class Series:
    label: str
    times: list[float]
    values: list[float]


@dataclass
class Panel:
    title: str
    kind: str  # "row" or a panel type
    grid: dict[str, int]
    unit: str
    queries: list[str] = field(default_factory=list)
    series: list[Series] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def fill(expr: str, variables: Mapping[str, str]) -> str:
    """`$name` and `${name}` replaced by the variable's value, as Grafana does: a whole word
    (`$models` is not `$model`), a name not set is left as written."""
    values = {**BUILTIN, **variables}

    def value(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        return values.get(name, m.group(0))

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def legend(fmt: str, metric: Mapping[str, str], query: str) -> str:
    if not fmt:
        return "{" + ",".join(f'{k}="{v}"' for k, v in sorted(metric.items())) + "}" or query
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt)


def query_range(
    prometheus: str, expr: str, start: float, end: float, step: float
) -> list[dict[str, Any]]:
    answer = httpx.get(
        f"{prometheus}/api/v1/query_range",
        params={"query": expr, "start": start, "end": end, "step": step},
        timeout=60,
    )
    body = answer.json()
    if body.get("status") != "success":
        raise ValueError(f"{body.get('errorType')}: {body.get('error')}")
    return list(body["data"]["result"])


def evaluate(
    dashboard: Mapping[str, Any],
    prometheus: str,
    variables: Mapping[str, str],
    start: float,
    end: float,
    step: float = 1.0,
) -> list[Panel]:
    """Every panel of the dashboard with its targets' series over [start, end]; a query
    Prometheus refuses is kept in the panel's errors (and drawn as such)."""
    panels = []
    for p in dashboard["panels"]:
        unit = p.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        panel = Panel(p["title"], p["type"], p["gridPos"], unit)
        panels.append(panel)
        for target in p.get("targets", []):
            expr = fill(target["expr"], variables)
            panel.queries.append(expr)
            try:
                result = query_range(prometheus, expr, start, end, step)
            except ValueError as exc:
                panel.errors.append(f"{expr}: {exc}")
                continue
            for s in result:
                points = [(float(t), float(v)) for t, v in s["values"]]
                panel.series.append(
                    Series(
                        legend(target.get("legendFormat", ""), s["metric"], expr),
                        [t for t, _ in points],
                        [v for _, v in points],
                    )
                )
    return panels


def _formatter(unit: str) -> Any:
    from matplotlib.ticker import FuncFormatter

    def fmt(v: float, _pos: object = None) -> str:
        if unit == "percentunit":
            return f"{v * 100:.0f}%"
        if unit == "s":
            return f"{v * 1000:.0f} ms" if abs(v) < 1 else f"{v:.1f} s"
        if unit == "bytes":
            for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
                if abs(v) >= scale:
                    return f"{v / scale:.1f} {name}"
            return f"{v:.0f} B"
        suffix = {"reqps": " req/s", "ops": " ops/s"}.get(unit, "")
        return f"{v:.3g}{suffix}"

    return FuncFormatter(fmt)


def picture_size(panels: list[Panel]) -> tuple[float, float]:
    """Inches across and down: 24 columns, and the grid's height plus a heading."""
    bottom = max(p.grid["y"] + p.grid["h"] for p in panels)
    return 24 * COL_WIDTH_IN, (bottom + 2) * ROW_HEIGHT_IN


def draw(dashboard: Mapping[str, Any], panels: list[Panel], out: Path, subtitle: str) -> None:
    """The panels where their gridPos puts them: 24 columns across, rows as headings."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    width, height = picture_size(panels)
    fig = plt.figure(figsize=(width, height), dpi=DPI, facecolor="#111217")
    fig.text(
        0.01,
        1 - 0.6 / height,
        f"{dashboard.get('title', 'dashboard')}  —  {subtitle}",
        color="#d8d9da",
        fontsize=15,
        va="center",
    )

    def box(grid: Mapping[str, int]) -> tuple[float, float, float, float]:
        # figure coordinates of a grid cell (a margin inside it for the axes' labels)
        left, right = 1.0 / width, 0.3 / width  # room for the y axis's labels
        x0 = grid["x"] / 24 + left
        w = grid["w"] / 24 - left - right
        top = (grid["y"] + 2) * ROW_HEIGHT_IN
        h = grid["h"] * ROW_HEIGHT_IN
        return (x0, 1 - (top + h * 0.66) / height, w, (h * 0.56) / height)

    for panel in panels:
        if panel.kind == "row":
            y = 1 - ((panel.grid["y"] + 2) * ROW_HEIGHT_IN + ROW_HEIGHT_IN * 0.5) / height
            fig.text(0.01, y, panel.title, color="#d8d9da", fontsize=13, weight="bold")
            continue
        ax = fig.add_axes(box(panel.grid), facecolor="#181b1f")
        ax.set_title(panel.title, color="#d8d9da", fontsize=11, loc="left")
        ax.tick_params(colors="#9fa7b3", labelsize=8)
        for spine in ax.spines.values():
            spine.set_color("#2c3235")
        ax.grid(color="#2c3235", linewidth=0.6)
        if panel.errors:
            ax.text(0.5, 0.5, "query refused", color="#f2495c", ha="center", transform=ax.transAxes)
        if not panel.series:
            ax.text(
                0.5, 0.5, "No data", color="#9fa7b3", ha="center", va="center",
                transform=ax.transAxes, fontsize=12,
            )  # fmt: skip
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for s in panel.series:
            times = [datetime.fromtimestamp(t, UTC) for t in s.times]
            ax.plot(mdates.date2num(times), s.values, linewidth=1.4, label=s.label)
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=UTC))
        ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=5))
        ax.yaxis.set_major_formatter(_formatter(panel.unit))
        ax.set_ylim(bottom=0)
        ax.legend(
            loc="upper left", bbox_to_anchor=(0, -0.1), ncol=3, fontsize=7.5, frameon=False,
            labelcolor="#d8d9da",
        )  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=fig.get_facecolor())
    plt.close(fig)


def render(
    prometheus: str,
    variables: Mapping[str, str],
    start: float,
    end: float,
    out: Path,
    dashboard_path: Path = DASHBOARD,
    step: float = 1.0,
) -> list[Panel]:
    """Evaluate and draw the dashboard at `dashboard_path` to `out` (a PNG); the panels, with
    their series, for the caller to check."""
    dashboard = json.loads(dashboard_path.read_text())
    panels = evaluate(dashboard, prometheus, variables, start, end, step)
    shown = ", ".join(f"{k}={v}" for k, v in variables.items())
    when = datetime.fromtimestamp(end, UTC).strftime("%Y-%m-%d %H:%M UTC")
    draw(dashboard, panels, out, f"{shown}  ({when})")
    return panels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="the Prometheus's URL")
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument(
        "--var", action="append", default=[], help="a template variable, NAME=VALUE (regex)"
    )
    parser.add_argument("--minutes", type=float, default=10, help="how far back from now")
    parser.add_argument("--step", type=float, default=5, help="seconds between points")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    variables = {}
    for v in args.var:
        name, sep, value = v.partition("=")
        if not sep or not name:
            parser.error(f"--var {v!r}: NAME=VALUE expected")
        variables[name] = value
    end = time.time()
    panels = render(
        args.prometheus,
        variables,
        end - args.minutes * 60,
        end,
        args.out,
        args.dashboard,
        args.step,
    )
    for p in panels:
        if p.kind != "row":
            print(f"{p.title}: {len(p.series)} series" + "".join(f"\n  {e}" for e in p.errors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
