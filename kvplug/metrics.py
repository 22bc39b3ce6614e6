"""kvplug's Prometheus metrics, written from every vLLM process.

vLLM's /metrics serves the multiprocess registry when PROMETHEUS_MULTIPROC_DIR is set (`kvplug serve`
sets a fresh one per run), so samples written here from the engine core and the workers show up next to
vLLM's own. Metrics are created lazily, once per process, after the env is known.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvplug.config import KvplugConfig

_lock = threading.Lock()
_metrics: "Metrics | None" = None


@dataclass
class Metrics:
    info: object
    plugin_loads: object
    attention_calls: object
    attention_tokens: object
    backend_instances: object
    sparse_prefill_tokens: object
    sparse_prefill_pairs: object


def process_role() -> str:
    """A readable name for this process (MainProcess, EngineCore_DP0, worker names...)."""
    return multiprocessing.current_process().name


def get(config: "KvplugConfig | None" = None) -> "Metrics | None":
    """The process-wide metrics, or None when metrics are disabled."""
    global _metrics
    if _metrics is not None:
        return _metrics
    if config is None:
        from kvplug import config as cfg_mod

        config = cfg_mod.from_process_env()
    if not config.metrics.enabled:
        return None
    with _lock:
        if _metrics is None:
            _metrics = _create(config.metrics.prefix)
    return _metrics


def _create(prefix: str) -> Metrics:
    from prometheus_client import Counter, Gauge

    multiproc = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
    gauge_kw = {"multiprocess_mode": "max"} if multiproc else {}
    return Metrics(
        info=Gauge(f"{prefix}_info", "kvplug build and enabled features (value is always 1)",
                   ["version", "vllm_version", "platform", "features"], **gauge_kw),
        plugin_loads=Counter(f"{prefix}_plugin_loads", "kvplug plugin registrations, by process",
                             ["process"]),
        attention_calls=Counter(f"{prefix}_attention_calls",
                                "Layer attention calls served by kvplug's backend, by phase",
                                ["phase", "backend"]),
        attention_tokens=Counter(f"{prefix}_attention_tokens",
                                 "Query tokens through kvplug's backend (per batch, not per layer), by phase",
                                 ["phase", "backend"]),
        backend_instances=Counter(f"{prefix}_backend_layers", "Attention layers built on kvplug's backend",
                                  ["backend", "process"]),
        sparse_prefill_tokens=Counter(f"{prefix}_sparse_prefill_tokens",
                                      "Prefill query tokens by attention mode (sparse or dense), per batch", ["mode"]),
        # density of sparse prefill = rate(pairs{kind="computed"}) / rate(pairs{kind="causal"})
        sparse_prefill_pairs=Counter(f"{prefix}_sparse_prefill_pairs",
                                     "Sparse-prefill (query, key) pairs over all layers and heads: computed vs "
                                     "the full causal mask", ["kind"]),
    )
