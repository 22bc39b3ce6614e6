"""The Grafana dashboard (deploy/grafana/kvplug.json) queries only metrics the code defines, so it cannot rot:
kvplug's own (kvplug/metrics.py, created the way a server creates them), the router's (serving/router.py)
and vLLM's (names as they appear in the installed vLLM's metrics code)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

from serving.router import RouterMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "kvplug.json"
PROMQL_WORDS = {"and", "or", "unless", "offset", "bool", "inf", "nan"}
SUFFIXES = ("_total", "_bucket", "_sum", "_count", "_created")

# Every kvplug_* metric a server process can create: every getter of kvplug/metrics.py, in a fresh process
# (its default registry holds nothing else).
KVPLUG_NAMES_SCRIPT = """
import inspect, prometheus_client
from kvplug import metrics
for name, fn in inspect.getmembers(metrics, inspect.isfunction):
    if name.startswith("get") and fn.__module__ == metrics.__name__:
        fn()
print("\\n".join(sorted(prometheus_client.REGISTRY._names_to_collectors)))
"""


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (label matchers, ranges, grouping labels and functions
    are not metric names)."""
    e = re.sub(r'"[^"]*"', "", expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    return {n for n in re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", e)} - PROMQL_WORDS


def exprs() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p.get("targets", [])]


def defined_names() -> set[str]:
    out = subprocess.run([sys.executable, "-c", KVPLUG_NAMES_SCRIPT], capture_output=True, text=True, check=True,
                         cwd=DASHBOARD.parents[2])
    names = set(out.stdout.split())
    names |= set(RouterMetrics("kvplug").registry._names_to_collectors)
    vllm_metrics = Path(find_spec("vllm").submodule_search_locations[0]) / "v1" / "metrics"
    for f in vllm_metrics.glob("*.py"):
        for base in re.findall(r'"(vllm:[a-z_]+)"', f.read_text()):
            names |= {base} | {base + s for s in SUFFIXES}
    return names


def test_metric_name_extraction():
    assert metric_names('histogram_quantile(0.99, sum by (le, replica) (rate(a_b_bucket{x="y"}[5m])))') == {"a_b_bucket"}
    assert metric_names("(sum(rate(vllm:x_total[$__rate_interval])) + y) / z{a='b'}") == {"vllm:x_total", "y", "z"}


def test_every_dashboard_metric_exists_in_the_code():
    queries = exprs()
    assert len(queries) >= 20
    defined = defined_names()
    used = {n: title for title, e in queries for n in metric_names(e)}
    assert any(n.startswith("kvplug_router_") for n in used) and any(n.startswith("kvplug_offload_") for n in used)
    missing = {n: title for n, title in used.items() if n not in defined}
    assert not missing, f"the dashboard queries metrics no code defines (panel titles): {missing}"


def test_panels_have_unique_ids_and_fit_the_grid():
    dash = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
