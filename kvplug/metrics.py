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

from kvplug.config import KvplugConfigError, Section

_lock = threading.Lock()
_metrics: "Metrics | None" = None
_configured: "MetricsConfig | None" = None


class MetricsConfig(Section):
    enabled: bool = True
    # Prefix of every kvplug metric name on /metrics.
    prefix: str = "kvplug"

    def validate(self, path: str) -> None:
        if not self.prefix or not self.prefix.replace("_", "a").isalnum() or self.prefix[0].isdigit():
            raise KvplugConfigError(f"{path}.prefix: {self.prefix!r} is not a valid Prometheus metric name prefix")


def configure(section: MetricsConfig) -> None:
    """The metrics section of this process's config (kvplug/plugin.py register() sets it)."""
    global _configured
    _configured = section


def _section(config: "MetricsConfig | None") -> MetricsConfig:
    """``config``, else the configured section, else the defaults (a process where register() never ran:
    unit tests driving a runner directly)."""
    if config is not None:
        return config
    return _configured if _configured is not None else MetricsConfig()


@dataclass
class Metrics:
    info: object
    plugin_loads: object
    attention_calls: object
    attention_tokens: object
    backend_instances: object
    sparse_prefill_tokens: object
    sparse_prefill_pairs: object
    sparse_prefill_chunks: object
    sparse_prefill_config: object
    retrieval_decode_tokens: object
    retrieval_decode_blocks: object
    retrieval_decode_refreshed_summaries: object


def process_role() -> str:
    """A readable name for this process (MainProcess, EngineCore_DP0, worker names...)."""
    return multiprocessing.current_process().name


def get(config: MetricsConfig | None = None) -> "Metrics | None":
    """The process-wide metrics, or None when metrics are disabled (``config``: else the configured section)."""
    global _metrics
    if _metrics is not None:
        return _metrics
    section = _section(config)
    if not section.enabled:
        return None
    with _lock:
        if _metrics is None:
            _metrics = _create(section.prefix)
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
        sparse_prefill_chunks=Counter(f"{prefix}_sparse_prefill_chunks",
                                      "Prefill chunks by sparse prefill's decision (sparse or dense) and its reason "
                                      "(cost_model, below_floor, threshold)", ["decision", "reason"]),
        sparse_prefill_config=Gauge(f"{prefix}_sparse_prefill_config_info",
                                    "Sparse prefill's per-head config in use, why it was chosen, and the "
                                    "per-chunk decision rule (value is always 1)",
                                    ["pattern_config", "reason", "decision_rule"], **gauge_kw),
        retrieval_decode_tokens=Counter(f"{prefix}_retrieval_decode_tokens",
                                        "Decode tokens by attention mode: sparse (top-k blocks) or dense", ["mode"]),
        # blocks read per sparse token = rate(blocks{kind="read"}) / rate(tokens{mode="sparse"}) (per kv-head);
        # fraction of KV read = rate(blocks{kind="read"}) / rate(blocks{kind="total"})
        retrieval_decode_blocks=Counter(f"{prefix}_retrieval_decode_blocks",
                                        "KV blocks per kv-head of retrieval-decode tokens: read vs what dense "
                                        "decoding reads", ["kind"]),
        # > 0 with offload on: decode over reloaded blocks scores their own keys, not a previous occupant's
        retrieval_decode_refreshed_summaries=Counter(f"{prefix}_retrieval_decode_refreshed_summaries",
                                                     "Block summaries (one per KV block and layer) rebuilt from KV "
                                                     "a KV connector loaded into the paged cache"),
    )


# --- offload tiers and cache policies (offload/connector.py) ------------------------------------------
@dataclass
class OffloadMetrics:
    hits: object  # blocks found, by tier (scheduler side)
    misses: object  # blocks the tiers could have supplied and did not, by why the request's first one missed
    evictions: object  # entries evicted, by tier
    bytes_stored: object  # by tier and policy (worker side)
    bytes_loaded: object  # by tier and policy
    load_seconds: object  # histogram of one step's load (fetch + decode + copy into the paged cache)
    compression_ratio: object  # histogram of raw/stored bytes per saved batch, by policy
    corrupt_entries: object  # disk entries that failed their checksum/length check (never served)
    skipped_stores: object  # stores that fit no tier (full tiers evict; this counts entries too big)
    isolated_blocks: object  # GPU blocks of lossy reloads taken out of vLLM's prefix cache, by policy
    disk_write_failures: object  # disk writes not done, by reason: error (disk full, I/O) or queue_full
    prompt_tokens: object  # prompt tokens of finished requests, by source: gpu, cpu, disk, recomputed
    pin_refusals: object  # pins refused because a tier's pin budget was full, by tier
    pinned_bytes: object  # gauge: bytes of pinned entries, by tier
    resident_bytes: object  # gauge: bytes held, by tier and priority class


_offload_metrics: "OffloadMetrics | None" = None


def get_offload(config: MetricsConfig | None = None) -> "OffloadMetrics | None":
    """The offload metrics of this process (None when metrics are disabled)."""
    global _offload_metrics
    base = get(config)
    if base is None:
        return None
    with _lock:
        if _offload_metrics is None:
            from prometheus_client import Counter, Gauge, Histogram

            p = _section(config).prefix
            gauge_kw = {"multiprocess_mode": "livemax"} if os.environ.get("PROMETHEUS_MULTIPROC_DIR") else {}
            _offload_metrics = OffloadMetrics(
                hits=Counter(f"{p}_offload_hits", "Offloaded KV blocks found on lookup, by tier", ["tier"]),
                misses=Counter(f"{p}_offload_misses",
                               "Prompt blocks past vLLM's prefix-cache hit that the offload tiers did not supply "
                               "(recomputed), by why the request's first missing block missed (never_seen, "
                               "evicted_from_cpu, evicted_from_disk, unreadable, different_cache_salt, other_policy, "
                               "opted_out, deleted, not_stored)", ["reason"]),
                evictions=Counter(f"{p}_offload_evictions", "Offloaded entries evicted, by tier and priority class",
                                  ["tier", "class"]),
                bytes_stored=Counter(f"{p}_offload_bytes_stored", "Bytes written to an offload tier",
                                     ["tier", "policy"]),
                bytes_loaded=Counter(f"{p}_offload_bytes_loaded", "Bytes read from an offload tier",
                                     ["tier", "policy"]),
                load_seconds=Histogram(f"{p}_offload_load_seconds",
                                       "Time to load one step's offloaded blocks into the paged KV cache",
                                       buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                                                0.5, 1.0, 2.5, 5.0, 10.0)),
                compression_ratio=Histogram(f"{p}_offload_compression_ratio",
                                            "Raw KV bytes over stored bytes, per saved batch", ["policy"],
                                            buckets=(1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 6.0, 8.0, 16.0)),
                corrupt_entries=Counter(f"{p}_offload_corrupt_entries",
                                        "Disk entries that failed verification (treated as misses)"),
                skipped_stores=Counter(f"{p}_offload_skipped_stores",
                                       "Entries not stored because they fit in no tier"),
                isolated_blocks=Counter(f"{p}_offload_isolated_blocks",
                                        "GPU blocks holding (or computed from) a lossy reload, kept out of "
                                        "vLLM's prefix cache so no request of another policy reads them",
                                        ["policy"]),
                disk_write_failures=Counter(f"{p}_offload_disk_write_failures",
                                            "Disk-tier writes not done (the entry becomes a miss), by reason: "
                                            "error (disk full, I/O error) or queue_full (the disk fell behind)",
                                            ["reason"]),
                prompt_tokens=Counter(f"{p}_request_prompt_tokens",
                                      "Prompt tokens of finished requests by where their KV came from: gpu (vLLM's "
                                      "prefix cache), cpu / disk (offload tiers), recomputed", ["source"]),
                pin_refusals=Counter(f"{p}_offload_pin_refusals",
                                     "Pins refused because the tier's pinned entries would pass max_pinned_fraction",
                                     ["tier"]),
                pinned_bytes=Gauge(f"{p}_offload_pinned_bytes", "Bytes of pinned entries, by tier", ["tier"],
                                   **gauge_kw),
                resident_bytes=Gauge(f"{p}_offload_resident_bytes", "Bytes held, by tier and priority class",
                                     ["tier", "class"], **gauge_kw),
            )
    return _offload_metrics
