"""Writes deploy/grafana/kvplug.json (run from the repo root: python deploy/grafana/build.py). Edit panels here,
then regenerate; tests/deploy/test_grafana.py checks every metric the JSON queries is defined in the code."""
import json
R = "[$__rate_interval]"
panels = []
y = 0
pid = 0

def row(title):
    global y, pid
    pid += 1
    panels.append({"type": "row", "title": title, "id": pid, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})
    y += 1

cells = []
def panel(title, targets, unit="short", desc="", w=8, h=8, kind="timeseries", maxv=None):
    global y, pid
    pid += 1
    x = sum(c for c in cells)
    if x + w > 24:
        y += h; cells.clear(); x = 0
    cells.append(w)
    fc = {"defaults": {"unit": unit}, "overrides": []}
    if maxv is not None:
        fc["defaults"]["max"] = maxv; fc["defaults"]["min"] = 0
    panels.append({"type": kind, "title": title, "description": desc, "id": pid,
                   "datasource": {"type": "prometheus", "uid": "${datasource}"},
                   "gridPos": {"h": h, "w": w, "x": x, "y": y}, "fieldConfig": fc,
                   "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
                   "targets": [{"refId": chr(65 + i), "expr": e, "legendFormat": l,
                                "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                               for i, (e, l) in enumerate(targets)]})

def p50_p99(histogram):
    """The two targets of a latency panel: median and 99th percentile of ``histogram`` over all series."""
    return [(f"histogram_quantile({q}, sum by (le) (rate({histogram}_bucket{R})))", name)
            for q, name in ((0.5, "p50"), (0.99, "p99"))]


def endrow():
    global y
    y += 8; cells.clear()

row("Router (kvplug serve --replicas N)")
panel("Requests routed by replica and reason", [(f"sum by (replica, reason) (rate(kvplug_router_routed_total{R}))", "{{replica}} {{reason}}")], "reqps",
      "tier_hit: the replica holding the longest cached prefix; affinity: the prefix's home; load_bound / home_down: spilled")
panel("In flight per replica", [("sum by (replica) (kvplug_router_in_flight)", "{{replica}}")], "short", "Per-replica load the load bound acts on")
panel("Replica and cache-feed up", [("kvplug_router_replica_up", "{{replica}} up"), ("kvplug_router_feed_up", "{{replica}} feed")], "short",
      "feed: the replica's GET /kvplug/cache/events answers (0: routed by affinity)")
endrow()
panel("Predicted prefix hit (router view)", [(f"sum by (replica) (rate(kvplug_router_matched_blocks_total{R})) / sum by (replica) (rate(kvplug_router_prompt_blocks_total{R}))", "{{replica}}")], "percentunit",
      "Share of routed prompt blocks the chosen replica held in some tier when routed", maxv=1)
panel("Cached prefix blocks per tier (feeds)", [("sum by (replica, tier) (kvplug_router_cached_blocks)", "{{replica}} {{tier}}")], "short")
panel("Routing decision latency", p50_p99("kvplug_router_route_seconds"), "s",
      "Tokenizing + hashing the prompt + choosing, per request")
endrow()
panel("Router errors, retries, fallbacks", [(f"sum by (kind) (rate(kvplug_router_errors_total{R}))", "error {{kind}}"),
                                            (f"sum by (replica) (rate(kvplug_router_retries_total{R}))", "retry {{replica}}"),
                                            (f"sum by (reason) (rate(kvplug_router_fallbacks_total{R}))", "fallback {{reason}}"),
                                            (f"rate(kvplug_router_bad_requests_total{R})", "400")], "reqps")
panel("Completed by status", [(f"sum by (replica, status) (rate(kvplug_router_completed_total{R}))", "{{replica}} {{status}}")], "reqps")
endrow()
row("Cache hit rates and tiers")
panel("Prompt tokens from cache, all tiers", [
    (f"(sum(rate(vllm:prefix_cache_hits_total{R})) + sum(rate(vllm:external_prefix_cache_hits_total{R}))) / sum(rate(vllm:prefix_cache_queries_total{R}))", "all tiers"),
    (f"sum(rate(vllm:prefix_cache_hits_total{R})) / sum(rate(vllm:prefix_cache_queries_total{R}))", "GPU prefix cache"),
    (f"sum(rate(vllm:external_prefix_cache_hits_total{R})) / sum(rate(vllm:prefix_cache_queries_total{R}))", "CPU + disk tiers")], "percentunit",
    "vLLM's prefix-cache counters (tokens): GPU hits + hits through the kvplug connector over tokens queried", maxv=1)
panel("GPU prefix-cache hit rate per replica", [(f"sum by (replica) (rate(vllm:prefix_cache_hits_total{R})) / sum by (replica) (rate(vllm:prefix_cache_queries_total{R}))", "{{replica}}")], "percentunit", maxv=1)
panel("Offload hits by tier and misses (blocks/s)", [(f"sum by (tier) (rate(kvplug_offload_hits_total{R}))", "hit {{tier}}"),
                                                    (f"sum(rate(kvplug_offload_misses_total{R}))", "miss")], "short")
endrow()
panel("Offload bytes stored / loaded by tier", [(f"sum by (tier) (rate(kvplug_offload_bytes_stored_total{R}))", "stored {{tier}}"),
                                                (f"sum by (tier) (rate(kvplug_offload_bytes_loaded_total{R}))", "loaded {{tier}}")], "Bps")
panel("Evictions by tier and priority class", [(f"sum by (tier, class) (rate(kvplug_offload_evictions_total{R}))", "{{tier}} {{class}}")], "short")
panel("Offload load time per step", p50_p99("kvplug_offload_load_seconds"), "s")
endrow()
panel("Compression ratio by policy (p50)", [(f"histogram_quantile(0.5, sum by (le, policy) (rate(kvplug_offload_compression_ratio_bucket{R})))", "{{policy}}")], "short")
panel("Integrity and pressure", [(f"sum(rate(kvplug_offload_corrupt_entries_total{R}))", "corrupt"),
                                 (f"sum(rate(kvplug_offload_skipped_stores_total{R}))", "skipped store"),
                                 (f"sum by (reason) (rate(kvplug_offload_disk_write_failures_total{R}))", "disk write failed {{reason}}"),
                                 (f"sum by (policy) (rate(kvplug_offload_isolated_blocks_total{R}))", "isolated {{policy}}")], "short")
endrow()
panel("Prompt tokens by source (per-request reports)", [(f"sum by (source) (rate(kvplug_request_prompt_tokens_total{R}))", "{{source}}")], "short",
      "Where each prompt token came from: gpu (prefix cache), cpu / disk (offload tiers), recomputed")
panel("Misses by reason", [(f"sum by (reason) (rate(kvplug_offload_misses_total{R}))", "{{reason}}")], "short",
      "Why a looked-up block was not in the tiers (never seen, evicted from a tier, corrupt, other cache_salt, opted out)")
panel("Resident and pinned bytes by tier", [("sum by (tier, class) (kvplug_offload_resident_bytes)", "{{tier}} {{class}}"),
                                            ("sum by (tier) (kvplug_offload_pinned_bytes)", "pinned {{tier}}"),
                                            (f"sum(rate(kvplug_offload_pin_refusals_total{R}))", "pin refusals/s")], "bytes")
endrow()
panel("KV cache usage per replica", [("vllm:kv_cache_usage_perc", "{{replica}}")], "percentunit", maxv=1)
endrow()
row("Latency and load")
panel("Time to first token", p50_p99("vllm:time_to_first_token_seconds"), "s")
panel("Time to first token p99 per replica", [(f"histogram_quantile(0.99, sum by (le, replica) (rate(vllm:time_to_first_token_seconds_bucket{R})))", "{{replica}}")], "s")
panel("Inter-token latency", p50_p99("vllm:inter_token_latency_seconds"), "s")
endrow()
panel("Requests running / waiting per replica", [("vllm:num_requests_running", "running {{replica}}"), ("vllm:num_requests_waiting", "waiting {{replica}}")], "short")
panel("Prompt and generated tokens/s", [(f"sum by (replica) (rate(vllm:prompt_tokens_total{R}))", "prompt {{replica}}"),
                                        (f"sum by (replica) (rate(vllm:generation_tokens_total{R}))", "generated {{replica}}")], "short")
panel("Sparse attention (kvplug backend)", [(f"sum by (mode) (rate(kvplug_sparse_prefill_tokens_total{R}))", "prefill {{mode}}"),
                                            (f"sum by (mode) (rate(kvplug_retrieval_decode_tokens_total{R}))", "decode {{mode}}"),
                                            (f"sum by (decision, reason) (rate(kvplug_sparse_prefill_chunks_total{R}))", "prefill chunks {{decision}} ({{reason}})")], "short")

dash = {
    "__inputs": [{"name": "DS_PROMETHEUS", "label": "Prometheus", "type": "datasource", "pluginId": "prometheus", "pluginName": "Prometheus"}],
    "title": "kvplug: cache tiers, routing, latency", "uid": "kvplug", "schemaVersion": 39, "version": 1,
    "tags": ["kvplug", "vllm"], "timezone": "utc", "refresh": "10s", "time": {"from": "now-1h", "to": "now"},
    "description": "kvplug and router metrics. Scrape `kvplug serve` (one replica) or its router (--replicas N: every replica's metrics with a replica label) at /metrics. Assumes the default metric prefix 'kvplug'.",
    "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Prometheus", "current": {}}]},
    "panels": panels,
}
json.dump(dash, open("deploy/grafana/kvplug.json", "w"), indent=1)
print(f"wrote deploy/grafana/kvplug.json ({len(panels)} panels)")
