"""The text of `make bench-peers`: a line per row and, under each tunio row, its ratios to the
best peer and to the plain path, metric by metric.

A ratio is tunio's figure over the reference's: above 1 is better for Gbit/s and conn/s, worse
for rr latency, memory and CPU. "Best peer" is, for each metric on its own, the best of the peer
rows with the same outbound as the tunio row (socks to danted, or direct): like with like.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench_peers_rows import PEER, TUNIO, Row

NAME_WIDTH = 30


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    width: int
    fmt: str
    higher_is_better: bool


METRICS = (
    Metric("gbps_up_1", "1 up", 7, ".2f", True),
    Metric("gbps_up_8", "8 up", 7, ".2f", True),
    Metric("gbps_down_1", "1 down", 7, ".2f", True),
    Metric("gbps_down_8", "8 down", 7, ".2f", True),
    Metric("conn_per_s", "conn/s", 8, ".0f", True),
    Metric("rr_p50_us", "rr p50", 8, ".0f", False),
    Metric("rr_p99_us", "rr p99", 8, ".0f", False),
    Metric("rss_mb", "RSS MB", 8, ".1f", False),
    Metric("peak_rss_mb", "peak MB", 8, ".1f", False),
    Metric("pss_mb", "PSS MB", 8, ".1f", False),
    Metric("cpu_us_per_conn_all", "CPU/conn", 9, ".0f", False),
    Metric("cpu_us_per_conn_forwarder", "fwd/conn", 9, ".0f", False),
)
PLAIN_KEY = "plain"


def best_peer(rows: list[Row], results: dict[str, dict[str, float]], outbound: str,
              metric: Metric) -> tuple[str, float] | None:
    """(name, value) of the best peer row with `outbound` for `metric`, None without one."""
    found = [(r.name, results[r.name][metric.key]) for r in rows
             if r.kind == PEER and r.outbound == outbound
             and metric.key in results.get(r.name, {})]  # fmt: skip
    if not found:
        return None
    pick = max if metric.higher_is_better else min
    return pick(found, key=lambda item: item[1])


def ratios(rows: list[Row], results: dict[str, dict[str, float]]) -> dict[str, Any]:
    """For each measured tunio row and metric: the best peer, and tunio / best peer and
    tunio / plain (None where a figure is missing, e.g. plain has no forwarder's memory)."""
    plain = next((results.get(r.name, {}) for r in rows if r.key == PLAIN_KEY), {})
    out: dict[str, Any] = {}
    for row in rows:
        figures = results.get(row.name)
        if row.kind != TUNIO or figures is None:
            continue
        per_metric: dict[str, Any] = {}
        for m in METRICS:
            if m.key not in figures:
                continue
            best = best_peer(rows, results, row.outbound, m)
            value = figures[m.key]
            per_metric[m.key] = {
                "best_peer": best[0] if best else None,
                "to_best_peer": value / best[1] if best and best[1] else None,
                "to_plain": value / plain[m.key] if plain.get(m.key) else None,
            }
        out[row.name] = per_metric
    return out


def _cell(value: float | None, m: Metric, fmt: str | None = None) -> str:
    text = "" if value is None else format(value, fmt or m.fmt)
    return f"{text:>{m.width}}"


def table(rows: list[Row], results: dict[str, dict[str, float]], missing: dict[str, str]) -> str:
    head = f"{'path':<{NAME_WIDTH}}" + "".join(f"{m.label:>{m.width}}" for m in METRICS)
    lines = [head]
    rel = ratios(rows, results)
    for row in rows:
        if row.name in missing:
            lines.append(f"{row.name:<{NAME_WIDTH}}{missing[row.name]}")
            continue
        figures = results.get(row.name)
        if figures is None:
            continue
        lines.append(f"{row.name:<{NAME_WIDTH}}"
                     + "".join(_cell(figures.get(m.key), m) for m in METRICS))  # fmt: skip
        for label, field in (("/ best peer", "to_best_peer"), ("/ plain", "to_plain")):
            if row.name in rel:
                cells = [rel[row.name].get(m.key, {}).get(field) for m in METRICS]
                pairs = zip(cells, METRICS, strict=True)
                text = "".join(_cell(c, m, ".2f") for c, m in pairs)
                if not any(c is not None for c in cells):
                    text = f"(no {row.outbound} peer measured in this run)"
                lines.append(f"{'  ' + label:<{NAME_WIDTH}}{text}")
    return "\n".join(lines)


def best_peers(rows: list[Row], results: dict[str, dict[str, float]]) -> str:
    """Which peer was the best, metric by metric, for each outbound: the table's denominators."""
    lines = []
    for outbound in sorted({r.outbound for r in rows if r.kind == TUNIO}):
        picks = []
        for m in METRICS:
            best = best_peer(rows, results, outbound, m)
            if best is not None:
                picks.append(f"{m.label}: {best[0]}")
        if picks:
            lines.append(f"best peer ({outbound}): " + "; ".join(picks))
    return "\n".join(lines)


def cost_table(rows: list[Row], results: dict[str, dict[str, float]]) -> str:
    """CPU per short connection (µs) and per GB of 8 upload flows (ms): the machine's, the
    forwarder's process tree's, danted's, and the rest (clients, servers, interrupt work)."""
    groups = ("all", "forwarder", "danted", "other")
    head = (f"{'CPU cost':<{NAME_WIDTH}}" + "".join(f"{g[:9] + ' µs':>13}" for g in groups)
            + "".join(f"{g[:9] + ' ms/GB':>16}" for g in groups))  # fmt: skip
    lines = [head]
    for row in rows:
        r = results.get(row.name)
        if r is None:
            continue
        conn = [r.get(f"cpu_us_per_conn_{g}") for g in groups]
        gb = [r.get(f"cpu_s_per_gb_{g}") for g in groups]
        cells = [f"{'' if v is None else f'{v:.0f}':>13}" for v in conn]
        cells += [f"{'' if v is None else f'{v * 1000:.0f}':>16}" for v in gb]
        lines.append(f"{row.name:<{NAME_WIDTH}}" + "".join(cells))
    return "\n".join(lines)
