"""Scrape a server's Prometheus ``/metrics`` and compute deltas.

vLLM (v1 engine, 0.32) exports the prefix cache as token counters
``vllm:prefix_cache_queries_total`` and ``vllm:prefix_cache_hits_total``;
kvplug exports ``kvplug_*`` samples.  Both are summed over label sets.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
HEADLINE = (
    "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
    "vllm:request_success_total", "vllm:external_prefix_cache_hits_total",
    "vllm:external_prefix_cache_queries_total",
) + PREFIX_HITS + PREFIX_QUERIES
KVPLUG_PREFIXES = ("kvplug_", "kvplug:")


def sample_key(name: str, labels: dict) -> str:
    if not labels:
        return name
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}"


def parse(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[sample_key(s.name, s.labels)] = float(s.value)
    return out


def scrape(client: httpx.Client, server_base: str) -> tuple[dict[str, float] | None, str | None]:
    """``(samples, error)``; a missing or broken endpoint is not fatal."""
    try:
        r = client.get(server_base + "/metrics")
        if r.status_code != 200:
            return None, f"HTTP {r.status_code}"
        return parse(r.text), None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {e}"


def _name(key: str) -> str:
    return key.split("{", 1)[0]


def _sum(samples: dict[str, float], names: tuple[str, ...]) -> float | None:
    vals = [v for k, v in samples.items() if _name(k) in names]
    return sum(vals) if vals else None


def summarize(before: dict[str, float] | None, after: dict[str, float] | None) -> dict:
    """Prefix-cache hit rate over the run plus deltas of kvplug and headline samples."""
    if before is None or after is None:
        return {"available": False, "prefix_cache_hit_rate": None, "deltas": {}}
    deltas: dict[str, float] = {}
    for k, v in after.items():
        n = _name(k)
        if n.startswith(KVPLUG_PREFIXES) or n in HEADLINE:
            deltas[k] = v - before.get(k, 0.0)
    hits_a, hits_b = _sum(after, PREFIX_HITS), _sum(before, PREFIX_HITS)
    q_a, q_b = _sum(after, PREFIX_QUERIES), _sum(before, PREFIX_QUERIES)
    rate = hits = queries = None
    if hits_a is not None and q_a is not None:
        hits, queries = hits_a - (hits_b or 0.0), q_a - (q_b or 0.0)
        rate = hits / queries if queries > 0 else None
    return {
        "available": True,
        "prefix_cache_hit_rate": rate,
        "prefix_cache_hits": hits,
        "prefix_cache_queries": queries,
        "deltas": dict(sorted(deltas.items())),
    }
