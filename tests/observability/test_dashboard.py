"""docs/grafana/treadle.json is valid JSON whose queries use only metrics Treadle
exports, and every exported metric is on it."""

from __future__ import annotations

import json
import re
from pathlib import Path

from treadle.adapters.otel import METRIC_NAMES

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "treadle.json"
DOC = Path(__file__).resolve().parents[2] / "docs" / "observability.md"


def _metrics_queried() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs
    found = set()
    for expr in exprs:
        for name in re.findall(r"\btreadle_[a-z_]+", expr):
            found.add(re.sub(r"_(bucket|sum|count)$", "", name))
    return found


def test_the_dashboard_queries_only_exported_metrics() -> None:
    """A renamed metric cannot leave a panel querying nothing."""
    queried = _metrics_queried()
    assert queried <= set(METRIC_NAMES), queried - set(METRIC_NAMES)


def test_every_metric_is_on_the_dashboard_and_in_the_docs() -> None:
    """Each exported metric has a panel and a row in docs/observability.md."""
    assert set(METRIC_NAMES) <= _metrics_queried()
    text = DOC.read_text()
    for name in METRIC_NAMES:
        assert f"`{name}`" in text, name
