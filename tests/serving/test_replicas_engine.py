"""`kvplug serve --replicas 2` on a local Ray cluster: 2 real SmolLM2 engines (one core each) behind the router.

One server for the whole module (two engine starts are the expensive part); the replica-death test runs
last because it kills one of them.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.engine

CONTEXT = ("The library keeps these facts. " + " ".join(f"Item {i} is stored in box {i * 7 % 13}." for i in range(60)))


@pytest.fixture(scope="module")
def replicated(smollm2_path, tmp_path_factory):
    pytest.importorskip("ray")
    from tests import conftest

    # Two engines compiling at once on two shared cores: allow more than one engine's start time.
    saved, conftest.SERVER_START_TIMEOUT_S = conftest.SERVER_START_TIMEOUT_S, 1800
    try:
        server = start_server(["--replicas", "2", "--health-interval", "1", "--enforce-eager",  # routing, not speed
                               "--kv-cache-memory-bytes", str(512 << 20),  # ~22K tokens each: plenty
                               "--offload", "cpu:256MiB"],  # a CPU tier: the cache-events feed reports it
                              tmp_path_factory.mktemp("replicas") / "kvplug-serve-replicas.log")
    finally:
        conftest.SERVER_START_TIMEOUT_S = saved
    yield server
    stop_server(server)


def replica_info(server) -> dict:
    return httpx.get(f"{server.base_url}/replicas", timeout=10).json()


def metric_sum(text: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def chat(client: httpx.AsyncClient, base: str, messages: list[dict], max_tokens: int = 4,
               stream: bool = True) -> tuple[str, str, str | None]:
    """(replica, text, error) for one chat request; errors are returned, not raised."""
    body = {"model": "smollm2-135m-instruct", "messages": messages, "max_tokens": max_tokens,
            "temperature": 0, "stream": stream, "ignore_eos": True}
    try:
        if not stream:
            r = await client.post(f"{base}/v1/chat/completions", json=body)
            if r.status_code != 200:
                return r.headers.get("x-kvplug-replica", "?"), "", f"HTTP {r.status_code}: {r.text[:200]}"
            return r.headers["x-kvplug-replica"], r.json()["choices"][0]["message"]["content"], None
        async with client.stream("POST", f"{base}/v1/chat/completions", json=body) as r:
            replica = r.headers.get("x-kvplug-replica", "?")
            if r.status_code != 200:
                return replica, "", f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
            text, done = [], False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    return replica, "".join(text), obj["error"]["message"]
                text += [c["delta"].get("content") or "" for c in obj["choices"]]
            return replica, "".join(text), None if done else "stream ended without [DONE]"
    except httpx.HTTPError as exc:
        return "?", "", f"{type(exc).__name__}: {exc}"


def test_openai_endpoints_through_the_router(replicated):
    from openai import OpenAI

    client = OpenAI(base_url=f"{replicated.base_url}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == ["smollm2-135m-instruct"]
    comp = client.completions.create(model="smollm2-135m-instruct", prompt="One, two,", max_tokens=3,
                                     temperature=0)
    assert comp.choices[0].text and comp.usage.completion_tokens == 3
    pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Say hi"}], max_tokens=3,
        temperature=0, stream=True) if c.choices]
    assert "".join(pieces)
    info = replica_info(replicated)
    assert [r["healthy"] for r in info["replicas"]] == [True, True] and info["routing"] == "tier-aware"


def test_bad_requests_get_400(replicated):
    r = httpx.post(f"{replicated.base_url}/v1/chat/completions", content=b"{oops", timeout=30,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{replicated.base_url}/v1/chat/completions", json={"model": "x", "messages": "hi"}, timeout=30)
    assert r.status_code == 400 and "'messages'" in r.json()["error"]["message"]
    # vLLM's own 400s pass through unchanged (here: an unknown model name)
    r = httpx.post(f"{replicated.base_url}/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=30)
    assert r.status_code in (400, 404) and "nope" in r.text


def test_affinity_keeps_a_conversation_on_one_replica_and_its_prefix_cache_hits(replicated):
    before = replicated.metrics_text()

    async def conversation():
        async with httpx.AsyncClient(timeout=300) as client:
            messages = [{"role": "user", "content": CONTEXT + "\nWhere is item 3?"}]
            seen = []
            for turn in range(3):
                replica, text, err = await chat(client, replicated.base_url, messages)
                assert err is None, err
                seen.append(replica)
                messages += [{"role": "assistant", "content": text}, {"role": "user", "content": f"And item {turn}?"}]
            return seen

    seen = asyncio.run(conversation())
    assert len(set(seen)) == 1, seen
    home = seen[0]
    after = replicated.metrics_text()
    delta = lambda name, **kw: metric_sum(after, name, **kw) - metric_sum(before, name, **kw)  # noqa: E731
    assert delta("kvplug_router_affinity_hits_total", replica=home) == 3
    # the follow-up turns found the shared context in that replica's prefix cache
    assert delta("vllm:prefix_cache_hits_total", replica=home) > len(CONTEXT) // 8
    # /metrics carries both replicas' engine metrics and the plugin's, each with its replica label
    for r in ("r0", "r1"):
        assert metric_sum(after, "kvplug_info", replica=r) >= 1
        assert 'replica="%s"' % r in after


def test_tier_aware_routing_follows_the_replica_that_holds_the_prefix(replicated):
    """Turn 1 is pinned (x-session-id) to the replica that is *not* its prefix's affinity home; turn 2, sent
    without the header, goes where turn 1's blocks are (exact hashes: every full block of turn 1's prompt
    matches), not to the home."""
    from serving import routing

    ring = routing.Router(["r0", "r1"])  # the router's ring: same replica names, same points
    messages = [{"role": "user", "content": "TIER " + CONTEXT + "\nWhere is item 9?"}]
    home = ring.ring_order(routing.affinity_key("/v1/chat/completions", {"messages": messages}))[0]
    other = "r1" if home == "r0" else "r0"
    session = next(f"s{i}" for i in range(1000) if ring.ring_order(f"session:s{i}")[0] == other)
    body = {"model": "smollm2-135m-instruct", "messages": messages, "max_tokens": 4, "temperature": 0}
    first = httpx.post(f"{replicated.base_url}/v1/chat/completions", json=body, headers={"x-session-id": session},
                       timeout=300)
    assert first.status_code == 200 and first.headers["x-kvplug-replica"] == other, first.headers
    prompt_tokens = first.json()["usage"]["prompt_tokens"]
    deadline = time.monotonic() + 30
    feed = {}
    while time.monotonic() < deadline:  # the router polls the feeds every 0.25 s
        feed = next(r["cache_feed"] for r in replica_info(replicated)["replicas"] if r["name"] == other)
        if feed["live"] and sum(feed["blocks"].values()) >= prompt_tokens // (feed["block_size"] or 1):
            break
        time.sleep(0.5)
    assert feed.get("live"), f"replica {other}'s cache-events feed is not live: {feed}"
    messages += [{"role": "assistant", "content": first.json()["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "And item 4?"}]
    report = {"kv_transfer_params": {"kvplug_report": True}}
    second = httpx.post(f"{replicated.base_url}/v1/chat/completions", json={**body, **report, "messages": messages},
                        timeout=300)
    assert second.status_code == 200 and second.headers["x-kvplug-replica"] == other, second.headers
    why = dict(p.split("=", 1) for p in second.headers["x-kvplug-route"].split("; "))
    assert why["reason"] == "tier_hit", why
    assert int(why["matched_blocks"]) >= prompt_tokens // int(why["block_size"]), (why, prompt_tokens)
    # the replica's cache report passes through the router: header and body, streaming too
    assert second.headers["x-kvplug-cache"].startswith("gpu="), second.headers
    assert "kvplug_cache" in (second.json().get("kv_transfer_params") or {}), second.json()
    with httpx.stream("POST", f"{replicated.base_url}/v1/chat/completions", timeout=300,
                      json={**body, **report, "messages": messages, "stream": True}) as streamed:
        assert streamed.headers["x-kvplug-replica"] == other and streamed.headers["x-kvplug-cache"].startswith("gpu=")
        assert "tier_hit" in streamed.headers["x-kvplug-route"]
        assert "kvplug_cache" in streamed.read().decode()


def test_load_bound_spills_a_hot_context(replicated):
    before = replicated.metrics_text()

    async def burst():
        async with httpx.AsyncClient(timeout=300) as client:
            messages = [{"role": "user", "content": "HOT " + CONTEXT + "\nSummarize."}]
            return await asyncio.gather(*(chat(client, replicated.base_url, messages, max_tokens=12)
                                          for _ in range(4)))

    results = asyncio.run(burst())
    assert all(err is None for _, _, err in results), results
    assert len({replica for replica, _, _ in results}) == 2, results  # 4 at once > bound of one replica
    after = replicated.metrics_text()
    assert (metric_sum(after, "kvplug_router_fallbacks_total", reason="load_bound")
            - metric_sum(before, "kvplug_router_fallbacks_total", reason="load_bound")) >= 1


def test_replica_death_mid_run_loses_nothing(replicated):
    """Kill one engine while sessions run: every request ends ok or counted as an error; the run completes."""
    info = replica_info(replicated)
    victim = info["replicas"][0]
    before = replicated.metrics_text()
    sessions, turns = 6, 3

    async def session(client, i, results):
        messages = [{"role": "user", "content": f"Session {i}. " + CONTEXT + "\nWhere is item 5?"}]
        for t in range(turns):
            replica, text, err = await chat(client, replicated.base_url, messages, max_tokens=8)
            results.append((i, t, replica, err))
            messages += [{"role": "assistant", "content": text or "?"}, {"role": "user", "content": "Next?"}]

    async def run():
        results: list = []
        async with httpx.AsyncClient(timeout=300) as client:
            tasks = [asyncio.create_task(session(client, i, results)) for i in range(sessions)]
            while len(results) < 3:  # mid-run: some requests done, most still to come
                await asyncio.sleep(0.2)
            os.killpg(victim["pid"], signal.SIGKILL)
            await asyncio.gather(*tasks)
        return results

    t0 = time.monotonic()
    results = asyncio.run(run())
    assert len(results) == sessions * turns                     # the run completed, every request answered
    errors = [r for r in results if r[3] is not None]
    after = replicated.metrics_text()
    d = lambda name, **kw: metric_sum(after, name, **kw) - metric_sum(before, name, **kw)  # noqa: E731
    counted = d("kvplug_router_errors_total", kind="broken_stream") + d("kvplug_router_errors_total", kind="no_replica")
    assert len(errors) == counted, (errors, counted)             # client-visible failures are all counted
    assert d("kvplug_router_retries_total", replica=victim["name"]) + counted >= 1  # the death was noticed
    late = [r for r in results if r[1] == turns - 1]
    assert all(err is None and replica != victim["name"] for _, _, replica, err in late), late
    health = httpx.get(f"{replicated.base_url}/health", timeout=10).json()
    assert health["replicas_up"] == 1, health
    assert metric_sum(after, "kvplug_router_replica_up", replica=victim["name"]) == 0
    assert time.monotonic() - t0 < 600
