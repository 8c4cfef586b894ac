"""Writes docker/grafana/dashboards/press.json. Run after changing panels: python docker/build_dashboard.py"""

from __future__ import annotations

import json
from pathlib import Path

DS = {"type": "prometheus", "uid": "press-prometheus"}


def quantiles(metric: str) -> list[dict]:
    return [
        {"expr": f"histogram_quantile({q}, sum by (le) (rate(press:{metric}_bucket[1m])))", "legendFormat": f"p{p}"}
        for q, p in ((0.5, 50), (0.95, 95))
    ]


def mean(metric: str, window: str = "1m", legend: str = "mean") -> dict:
    expr = f"sum(rate(press:{metric}_sum[{window}])) / sum(rate(press:{metric}_count[{window}]))"
    return {"expr": expr, "legendFormat": legend}


def rate(counter: str, legend: str, by: str = "") -> dict:
    grouping = f" by ({by})" if by else ""
    return {"expr": f"sum{grouping}(rate(press:{counter}[1m]))", "legendFormat": legend}


PANELS = [
    ("Committed tokens/s", "short", [rate("generation_tokens_total", "tok/s")]),
    ("Requests/s by finish reason", "reqps", [rate("request_success_total", "{{finished_reason}}", "finished_reason")]),
    ("Time to first token (first committed canvas)", "s", quantiles("time_to_first_token_seconds")),
    ("Time to first draft (first refinement pass)", "s", quantiles("time_to_first_draft_seconds")),
    ("Passes per canvas", "short", [mean("denoising_steps_per_canvas"), *quantiles("denoising_steps_per_canvas")]),
    ("Tokens per forward", "short", [mean("tokens_per_forward", "5m", "mean per request")]),
    ("Pass batch size", "short", [mean("pass_batch_size", legend="mean rows per pass")]),
    ("Pass duration", "s", quantiles("pass_duration_seconds")),
    (
        "Running and waiting requests",
        "short",
        [
            {"expr": "sum(press:num_requests_running)", "legendFormat": "running"},
            {"expr": "sum(press:num_requests_waiting)", "legendFormat": "waiting"},
        ],
    ),
    ("Queue time", "s", quantiles("request_queue_time_seconds")),
    ("End-to-end latency", "s", quantiles("e2e_request_latency_seconds")),
    ("Canvas positions evaluated/s", "short", [rate("canvas_positions_evaluated_total", "positions/s")]),
]


def main() -> None:
    panels = []
    for i, (title, unit, targets) in enumerate(PANELS):
        panels.append({
            "id": i + 1, "type": "timeseries", "title": title, "datasource": DS,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{**t, "refId": chr(65 + j), "datasource": DS} for j, t in enumerate(targets)],
        })  # fmt: skip
    dashboard = {
        "uid": "press", "title": "Press", "tags": ["press", "diffusion"], "timezone": "browser",
        "schemaVersion": 39, "version": 1, "refresh": "10s", "time": {"from": "now-30m", "to": "now"},
        "panels": panels,
    }  # fmt: skip
    out = Path(__file__).parent / "grafana" / "dashboards" / "press.json"
    out.write_text(json.dumps(dashboard, indent=1) + "\n")
    print(out)


if __name__ == "__main__":
    main()
