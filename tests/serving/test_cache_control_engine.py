"""Cache control through `kvplug serve` on the CPU engine (SmolLM2, CPU + disk tiers): every report equals the
metric deltas, the inventory and events show what is stored, a pinned prefix survives pressure and a restart.

One server for the module, then a second one on the same disk folder (the restart). Block size 128 tokens,
~2.9 MB per block: the CPU tier holds 8 blocks (pins: 4), the disk tier 16.
"""
from __future__ import annotations

import collections
import json

import httpx
import pytest

from serving import cache_cli
from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.engine

BLOCK = 128
ARGS = ["--enforce-eager", "--max-model-len", "2048", "--kv-cache-memory-bytes", str(64 << 20)]


def context(topic: str, sentences: int = 45) -> str:
    """A prompt of ~10 tokens per sentence, distinct per topic."""
    return f"Notes on {topic}. " + " ".join(f"Fact {i} about {topic}: item {i} is in box {i * 7 % 13}."
                                            for i in range(sentences))


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    return tmp_path_factory.mktemp("cache-control-disk")


@pytest.fixture(scope="module")
def server(smollm2_path, disk, tmp_path_factory):
    import os

    env = dict(os.environ, VLLM_SERVER_DEV_MODE="1")  # /reset_prefix_cache: empty vLLM's own GPU prefix cache
    s = start_server(["--offload", f"cpu:{24 << 20},disk:{disk}:{48 << 20}", *ARGS],
                     tmp_path_factory.mktemp("cc") / "serve.log", env=env)
    yield s
    stop_server(s)


def complete(server, prompt: str, stream: bool = False, **params) -> tuple[dict, str]:
    """(the body report, the x-kvplug-cache header) of one completion."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": 2, "temperature": 0, "stream": stream,
            "kv_transfer_params": {"kvplug_report": True, **params}}
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    if stream:
        events = [json.loads(e[len("data: "):]) for e in r.text.split("\n\n") if e.startswith("data: {")]
        report = events[-1]["kvplug_cache"]
    else:
        report = r.json()["kv_transfer_params"]["kvplug_cache"]
    return report, r.headers["x-kvplug-cache"]


def reset_gpu_cache(server) -> None:
    assert httpx.post(f"{server.base_url}/reset_prefix_cache", timeout=60).status_code == 200


def counters(server) -> collections.Counter:
    from prometheus_client.parser import text_string_to_metric_families

    out: collections.Counter = collections.Counter()
    for fam in text_string_to_metric_families(server.metrics_text()):
        for s in fam.samples:
            if s.name in ("kvplug_request_prompt_tokens_total", "kvplug_offload_misses_total",
                          "kvplug_offload_hits_total", "kvplug_offload_pin_refusals_total"):
                out[(s.name, tuple(sorted(s.labels.items())))] += s.value
    return out


def test_reports_equal_the_metric_deltas_and_the_header(server):
    before = counters(server)
    reports = []
    ctx = context("the harbour")
    reports.append(complete(server, ctx + " Q1")[0])  # computed
    reports.append(complete(server, ctx + " Q2", stream=True)[0])  # vLLM's GPU prefix cache
    reset_gpu_cache(server)
    report, header = complete(server, ctx + " Q3")  # the offload tiers
    reports.append(report)
    assert reports[0]["recomputed_tokens"] == reports[0]["prompt_tokens"]
    assert reports[0]["first_miss"]["reason"] == "never_seen"
    assert reports[1]["gpu_tokens"] >= 3 * BLOCK and reports[1]["first_miss"] is None
    assert report["gpu_tokens"] == 0 and report["cpu_tokens"] + report["disk_tokens"] >= 3 * BLOCK
    assert header == (f"gpu=0; cpu={report['cpu_tokens']}; disk={report['disk_tokens']}; "
                      f"recomputed={report['recomputed_tokens']}; policy=keep; miss=none; final=1")
    reports.append(complete(server, ctx + " Q4", kvplug_offload=False)[0])  # opted out: GPU only
    delta = counters(server) - before
    for source in ("gpu", "cpu", "disk", "recomputed"):
        assert delta[("kvplug_request_prompt_tokens_total", (("source", source),))] == \
            sum(r[f"{source}_tokens"] for r in reports), source
        if source in ("cpu", "disk"):
            assert delta[("kvplug_offload_hits_total", (("tier", source),))] * BLOCK == \
                sum(r[f"{source}_tokens"] for r in reports)
    misses = collections.Counter()
    for r in reports:
        if r["first_miss"]:
            misses[r["first_miss"]["reason"]] += r["missed_blocks"]
    assert {k[1][0][1]: v for k, v in delta.items() if k[0] == "kvplug_offload_misses_total"} == dict(misses)


def test_inventory_events_and_the_cli(server, capsys):
    complete(server, context("the orchard"))
    listing = httpx.get(f"{server.base_url}/kvplug/cache", params={"limit": 1}, timeout=30).json()
    assert listing["total_prefixes"] >= 1 and len(listing["prefixes"]) == 1
    assert {"cpu", "disk"} == set(listing["totals"]) and listing["block_size"] == BLOCK
    top = listing["prefixes"][0]
    assert top["tokens"] >= 3 * BLOCK and top["bytes"] > 0 and "head_token_ids" not in top
    feed = httpx.get(f"{server.base_url}/kvplug/cache/events", params={"since": 0}, timeout=30).json()
    assert feed["block_size"] == BLOCK
    assert top["prefix"] in {h for h, _ in feed["stored"] + feed.get("resident", [])}
    later = httpx.get(f"{server.base_url}/kvplug/cache/events",
                      params={"since": feed["seq"], "epoch": feed["epoch"], "wait_s": 0}, timeout=30).json()
    assert not later["reset"] and later["stored"] == later["removed"] == []
    assert cache_cli.main(["ls", "--endpoint", server.base_url]) == 0
    assert top["prefix"][:16] in capsys.readouterr().out


PINNED = context("the lighthouse", 30)  # 3 full blocks: within the CPU tier's pin budget


def test_a_pinned_prefix_survives_pressure_and_a_full_pin_budget_refuses(server):
    before = counters(server)
    report, header = complete(server, PINNED, kvplug_pin=True, kvplug_ttl_s=3600, kvplug_priority="high")
    assert report["pin"]["pinned"] and "pin=ok" in header
    big, header = complete(server, context("the glacier", 80), kvplug_pin=True)  # 6 blocks > the CPU pin budget
    assert not big["pin"]["pinned"] and "full of pins" in big["pin"]["error"] and "pin=refused" in header
    assert (counters(server) - before)[("kvplug_offload_pin_refusals_total", (("tier", "cpu"),))] == 1
    for i in range(8):  # 32+ blocks through 8 CPU + 16 disk blocks
        complete(server, context(f"pressure {i}"))
    reset_gpu_cache(server)
    again, _ = complete(server, PINNED)
    assert again["cpu_tokens"] == report["pin"]["blocks"] * BLOCK and again["first_miss"] is None
    pinned = httpx.get(f"{server.base_url}/kvplug/cache", params={"pinned": "true"}, timeout=30).json()
    assert [p["prefix"] for p in pinned["prefixes"]] == [report["pin"]["prefix"]]
    assert pinned["prefixes"][0]["priority"] == "high" and 0 < pinned["prefixes"][0]["pin_ttl_s"] <= 3600


def test_pins_survive_a_restart(server, disk, tmp_path_factory):
    prefix = httpx.get(f"{server.base_url}/kvplug/cache", params={"pinned": "true"}, timeout=30).json()["prefixes"]
    assert prefix, "run after the pressure test"
    stop_server(server)
    again = start_server(["--offload", f"cpu:{24 << 20},disk:{disk}:{48 << 20}", *ARGS],
                         tmp_path_factory.mktemp("cc-restart") / "serve.log")
    try:
        listing = httpx.get(f"{again.base_url}/kvplug/cache", params={"pinned": "true"}, timeout=30).json()
        assert [p["prefix"] for p in listing["prefixes"]] == [prefix[0]["prefix"]]
        report, _ = complete(again, PINNED)
        assert report["disk_tokens"] == prefix[0]["tokens"] and report["first_miss"] is None
    finally:
        stop_server(again)
