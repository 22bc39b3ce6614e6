"""Tier-aware routing without engines: the feed state (routing.ReplicaBlocks), the policy, and the router over
fake replicas that serve the cache-events contract (GET /kvplug/cache/events) and an x-kvplug-cache report."""
from __future__ import annotations

import asyncio
import hashlib
import json

import httpx
import pytest

from serving import routing
from serving.router import ReplicaEndpoint, ReplicaRouter
from tests.serving.test_replicas_routing import FakeReplicas, samples

BLOCK = 4  # characters per "token" block of the fake hasher below


def h(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def hashes(*ids: int) -> list[bytes]:
    return [bytes.fromhex(h(i)) for i in ids]


# --- ReplicaBlocks: the feed contract --------------------------------------------------------------------

def test_feed_reset_then_deltas_then_removal():
    b = routing.ReplicaBlocks()
    b.apply({"epoch": "e1", "seq": 3, "reset": True, "block_size": 16,
             "resident": [[h(1), "gpu"], [h(2), "gpu"], [h(2), "cpu"]], "stored": [], "removed": []})
    assert (b.epoch, b.seq, b.block_size) == ("e1", 3, 16)
    assert b.blocks_per_tier() == {"gpu": 2, "cpu": 1, "disk": 0}
    b.apply({"epoch": "e1", "seq": 5, "reset": False, "block_size": 16,
             "stored": [[h(3), "disk"], [h(1), "gpu"]],                       # a repeated store counts once
             "removed": [[h(2), "gpu"], [h(9), "cpu"], [h(3), "cpu"]]})         # unknown removals: no-ops
    assert b.seq == 5 and b.blocks_per_tier() == {"gpu": 1, "cpu": 1, "disk": 1}
    m = b.match(hashes(1, 2, 3, 4))
    assert m.blocks == 3 and m.per_tier == {"gpu": 1, "cpu": 1, "disk": 1}
    assert b.match(hashes(2, 3)).blocks == 2
    assert b.match(hashes(7, 1)).blocks == 0          # a prefix match starts at the first block
    b.apply({"epoch": "e1", "seq": 6, "reset": True, "block_size": 16, "resident": [[h(4), "cpu"]]})
    assert b.blocks_per_tier() == {"gpu": 0, "cpu": 1, "disk": 0}  # reset replaces everything


def test_new_engine_life_answering_deltas_is_resynced_from_zero():
    b = routing.ReplicaBlocks()
    b.apply({"epoch": "e1", "seq": 40, "reset": True, "block_size": 16, "resident": [[h(1), "gpu"]]})
    b.apply({"epoch": "e2", "seq": 45, "reset": False, "block_size": 16, "stored": [[h(2), "gpu"]]})
    assert b.seq == 0 and b.epoch is None and not b.tiers  # next poll asks since=0: the full state


@pytest.mark.parametrize("feed, fragment", [
    ({"seq": 1, "block_size": 16}, "KeyError"),
    ({"epoch": "e", "seq": 1, "block_size": 16, "reset": True, "resident": [[h(1), "ssd"]]}, "'ssd'"),
    ({"epoch": "e", "seq": 1, "block_size": 16, "reset": True, "resident": [["zz", "gpu"]]}, "ValueError"),
    ({"epoch": "e", "seq": 1, "block_size": 0, "reset": True, "resident": []}, "'block_size' must be >= 1"),
])
def test_malformed_feed_is_a_feed_error_and_changes_nothing(feed, fragment):
    b = routing.ReplicaBlocks()
    b.apply({"epoch": "e0", "seq": 2, "reset": True, "block_size": 16, "resident": [[h(1), "gpu"]]})
    with pytest.raises(routing.FeedError, match=fragment):
        b.apply(feed)
    assert (b.epoch, b.seq) == ("e0", 2) and b.match(hashes(1)).blocks == 1


# --- the policy -------------------------------------------------------------------------------------------

def match(blocks: int, **tiers: int) -> routing.PrefixMatch:
    return routing.PrefixMatch(blocks, {t: tiers.get(t, 0) for t in routing.TIERS})


def key_homed_on(r: routing.Router, replica: str) -> str:
    return next(k for k in (f"prefix:conversation {i}" for i in range(1000)) if r.ring_order(k)[0] == replica)


def test_tier_hit_wins_over_the_affinity_home():
    r = routing.Router(["r0", "r1", "r2"], mode="tier-aware")
    key = key_homed_on(r, "r0")
    d = r.choose(key, matches={"r0": match(0), "r1": match(5, cpu=5), "r2": match(2, gpu=2)})
    assert (d.replica, d.reason, d.match.blocks, d.match.per_tier["cpu"]) == ("r1", "tier_hit", 5, 5)
    # the same request by affinity goes home, where nothing of it is cached
    r.mode = "affinity"
    assert r.choose(key, matches={"r1": match(5)}).replica == "r0"


def test_no_holder_or_no_feed_falls_back_to_affinity():
    r = routing.Router(["r0", "r1"], mode="tier-aware")
    key = key_homed_on(r, "r1")
    assert r.choose(key, matches={"r0": match(0), "r1": match(0)}).reason == "affinity"
    d = r.choose(key, matches={})
    assert (d.replica, d.reason) == ("r1", "affinity")


def test_ties_follow_the_ring_and_the_load_bound_spills_to_the_next_longest():
    r = routing.Router(["r0", "r1", "r2"], mode="tier-aware", load_factor=1.0)
    key = key_homed_on(r, "r2")
    matches = {"r0": match(4, gpu=4), "r1": match(4, disk=4), "r2": match(1, gpu=1)}
    ring = r.ring_order(key)
    first_of_tied = next(x for x in ring if x in ("r0", "r1"))
    assert r.choose(key, matches=matches).replica == first_of_tied
    other = "r1" if first_of_tied == "r0" else "r0"
    for _ in range(2):
        r.started(first_of_tied)   # 2 in flight, capacity ceil(1.0 * 3 / 3) = 1: full
    d = r.choose(key, matches=matches)
    assert (d.replica, d.reason, d.best_blocks) == (other, "tier_hit", 4)   # the other holder of 4
    r.started(other)
    r.started(other)
    d = r.choose(key, matches=matches)
    assert (d.replica, d.reason, d.match.blocks, d.best_blocks) == ("r2", "load_bound", 1, 4)


def test_exclusions_and_dead_replicas_never_get_the_request():
    r = routing.Router(["r0", "r1"], mode="tier-aware")
    r.mark("r1", False)
    d = r.choose("prefix:x", matches={"r1": match(9)})
    assert d.replica == "r0"
    with pytest.raises(routing.NoReplicaAvailable):
        r.choose("prefix:x", exclude={"r0"}, matches={"r1": match(9)})


# --- the router over fake replicas serving the feed -----------------------------------------------------

class TextHasher:
    """Stands in for serving.prompt_blocks.PromptHasher: one 'block' per BLOCK characters of the last user
    turn's conversation text, chained like vLLM's."""

    def __init__(self):
        self.calls = 0

    def warm_up(self):
        pass

    @staticmethod
    def text(path, body):
        return "".join(f"<{m['role']}>{m['content']}" for m in body["messages"])

    def block_hashes(self, path, body, block_size):
        self.calls += 1
        text, parent, out = self.text(path, body), b"", []
        for i in range(0, len(text) - BLOCK + 1, BLOCK):
            parent = hashlib.sha256(parent + text[i:i + BLOCK].encode()).digest()
            out.append(parent)
        return out


class FeedReplicas(FakeReplicas):
    """Fake replicas that cache every prompt they serve (GPU) and report it through the events feed;
    ``no_feed`` answer 404 there (an old replica)."""

    def __init__(self, names):
        super().__init__(names)
        self.no_feed: set[str] = set()
        self.events = {n: [] for n in names}   # (seq, kind, hash_hex, tier)
        self.polls = {n: [] for n in names}
        self.params = {n: [] for n in names}
        self.refuse_wait: set[str] = set()   # answer 400 to wait_s (a replica without long polls)

    def hold(self, name, body, tier="gpu"):
        for digest in TextHasher().block_hashes("/v1/chat/completions", body, BLOCK):
            self.events[name].append((len(self.events[name]) + 1, "stored", digest.hex(), tier))

    async def handler(self, request: httpx.Request) -> httpx.Response:
        name = request.url.host.split(".")[0]
        if request.url.path == "/kvplug/cache/events" and name not in self.dead:
            if name in self.no_feed:
                return httpx.Response(404, json={"detail": "Not Found"})
            self.params[name].append(dict(request.url.params))
            if name in self.refuse_wait and "wait_s" in request.url.params:
                return httpx.Response(400, json={"error": {"message": "unknown parameter wait_s"}})
            since = int(request.url.params["since"])
            self.polls[name].append(since)
            ev = self.events[name]
            return httpx.Response(200, json={
                "epoch": f"life-{name}", "seq": len(ev), "reset": since == 0, "block_size": BLOCK,
                "resident": [[d, t] for _, k, d, t in ev if k == "stored"] if since == 0 else [],
                "stored": [[d, t] for s, k, d, t in ev if k == "stored" and s > since] if since else [],
                "removed": []})
        response = await super().handler(request)
        if request.url.path.startswith("/v1/"):
            response.headers["x-kvplug-cache"] = f"gpu=0; cpu=12; disk=0; recomputed=3; replica={name}"
            if not json.loads(request.content).get("stream"):
                self.hold(name, json.loads(request.content))
        return response


def run(fake, coro_fn, **kw):
    kw.setdefault("health_interval_s", 0.05)
    kw.setdefault("feed_interval_s", 0.01)
    kw.setdefault("feed_wait_s", 0.0)
    router = ReplicaRouter([ReplicaEndpoint(n, fake.url(n)) for n in fake.names], mode="tier-aware",
                           transport=httpx.MockTransport(fake.handler), **kw)

    async def main():
        async with router.app.router.lifespan_context(router.app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router.app),
                                         base_url="http://router") as client:
                for _ in range(200):  # until every feed answered once
                    if all(router.feed_live[n] or n in getattr(fake, "no_feed", ()) for n in fake.names):
                        break
                    await asyncio.sleep(0.01)
                return await coro_fn(client, router)
    return asyncio.run(main())


def route(response) -> dict[str, str]:
    return dict(part.split("=", 1) for part in response.headers["x-kvplug-route"].split("; "))


def conversation(i: int) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": f"conversation {i}: " + "context " * 20}]}


def test_follow_up_goes_to_the_replica_holding_its_prefix_in_a_tier_and_says_why():
    fake = FeedReplicas(["r0", "r1"])
    hasher = TextHasher()

    async def go(client, router):
        # conversation homed on r0 by affinity, but r1 holds its prefix in its CPU tier
        key = lambda i: routing.affinity_key("/v1/chat/completions", conversation(i))  # noqa: E731
        i = next(i for i in range(100) if router.policy.ring_order(key(i))[0] == "r0")
        fake.hold("r1", conversation(i), tier="cpu")
        await asyncio.sleep(0.1)  # a few feed polls
        body = conversation(i)
        body["messages"] += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "and then?"}]
        plain = await client.post("/v1/chat/completions", json=body)
        await asyncio.sleep(0.1)  # r1's feed reports what the first follow-up left on its GPU
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True})
        fresh = await client.post("/v1/chat/completions", json=conversation(i + 1000))
        info = (await client.get("/replicas")).json()
        return plain, streamed, fresh, info, samples((await client.get("/metrics")).text)

    plain, streamed, fresh, info, s = run(fake, go, prompt_hasher=hasher)
    n_prefix = len(TextHasher().block_hashes("", conversation(0), BLOCK))
    for r in (plain, streamed):
        assert r.status_code == 200 and r.headers["x-kvplug-replica"] == "r1"
        why = route(r)
        assert why["reason"] == "tier_hit" and why["mode"] == "tier-aware" and why["feeds"] == "2/2"
        assert why["block_size"] == str(BLOCK) and int(why["cpu"]) >= n_prefix - 1
        # the replica's own cache report passes through, streaming too
        assert r.headers["x-kvplug-cache"] == "gpu=0; cpu=12; disk=0; recomputed=3; replica=r1"
    first, second = route(plain), route(streamed)
    # the first follow-up finds its context in r1's CPU tier; r1 then holds all of it on its GPU
    assert int(first["matched_blocks"]) == int(first["cpu"]) and first["gpu"] == "0"
    assert int(first["prompt_blocks"]) > int(first["matched_blocks"])
    assert int(second["matched_blocks"]) == int(second["gpu"]) == int(second["prompt_blocks"])
    assert "data: [DONE]" in streamed.text
    assert route(fresh)["reason"] in ("affinity", "load_bound") and route(fresh)["matched_blocks"] == "0"
    feeds = {r["name"]: r["cache_feed"] for r in info["replicas"]}
    assert feeds["r1"]["live"] and feeds["r1"]["blocks"]["cpu"] >= n_prefix and feeds["r1"]["epoch"] == "life-r1"
    assert s[("kvplug_router_routed_total", (("reason", "tier_hit"), ("replica", "r1")))] == 2
    assert s[("kvplug_router_feed_up", (("replica", "r0"),))] == 1
    assert s[("kvplug_router_matched_blocks_total", (("replica", "r1"),))] >= 2 * (n_prefix - 1)
    assert s[("kvplug_router_cached_blocks", (("replica", "r1"), ("tier", "cpu")))] >= n_prefix
    # incremental: after the first full answer, every poll asks only for what is new
    assert fake.polls["r1"][0] == 0 and fake.polls["r1"][-1] == len(fake.events["r1"])


def test_without_feeds_routing_is_affinity_and_says_so():
    fake = FeedReplicas(["r0", "r1"])
    fake.no_feed = {"r0", "r1"}
    hasher = TextHasher()

    async def go(client, router):
        got = [await client.post("/v1/chat/completions", json=conversation(7)) for _ in range(3)]
        return got, dict(router.feed_live), (await client.get("/replicas")).json()

    got, live, info = run(fake, go, prompt_hasher=hasher)
    assert live == {"r0": False, "r1": False} and hasher.calls == 0  # no tokenizing when nothing can match
    assert len({r.headers["x-kvplug-replica"] for r in got}) == 1
    assert all(route(r) == {"reason": "affinity", "mode": "tier-aware", "feeds": "0/2"} for r in got)
    assert "HTTP 404" in info["replicas"][0]["cache_feed"]["problem"]


def test_one_replica_without_feed_still_gets_new_conversations():
    fake = FeedReplicas(["r0", "r1"])
    fake.no_feed = {"r0"}

    async def go(client, router):
        return [(await client.post("/v1/chat/completions", json=conversation(i))).headers["x-kvplug-replica"]
                for i in range(20)]

    assert set(run(fake, go, prompt_hasher=TextHasher())) == {"r0", "r1"}


def test_mode_switch_to_affinity_stops_polling_and_tier_routing():
    fake = FeedReplicas(["r0", "r1"])

    async def go(client, router):
        await client.put("/router/routing", json={"mode": "affinity"})
        await asyncio.sleep(0.05)
        polls = sum(len(p) for p in fake.polls.values())
        r = await client.post("/v1/chat/completions", json=conversation(3))
        await asyncio.sleep(0.05)
        return polls, sum(len(p) for p in fake.polls.values()), r, dict(router.feed_live)

    before, after, r, live = run(fake, go, prompt_hasher=TextHasher())
    assert after == before and route(r)["mode"] == "affinity" and live == {"r0": False, "r1": False}


def test_tier_aware_is_the_default_and_its_flag_is_checked():
    from serving import server

    p = server.plan(["--replicas", "2", "--port", "18990"], environ={}, prepare_model=False)
    assert p.router["routing"] == "tier-aware" and p.router["tier_min_match"] == routing.DEFAULT_MIN_MATCH_FRACTION
    assert not any(a.startswith("--tier-min-match") for a in p.command)
    with pytest.raises(server.ServeError, match=r"--tier-min-match must be within \[0, 1\], got 2.0"):
        server.plan(["--replicas", "2", "--tier-min-match", "2", "--port", "18990"], environ={}, prepare_model=False)


def test_the_router_hashes_with_the_replicas_seed_and_algorithm():
    from serving import replicas

    h = replicas.prompt_hasher("/m", ["--prefix-caching-hash-algo", "sha256_cbor"], {"PYTHONHASHSEED": "42"})
    assert (h.hash_seed, h.hash_algo) == ("42", "sha256_cbor")
    assert replicas.prompt_hasher("/m", [], {}).hash_seed == "vllm-none-hash"
    assert replicas.prompt_hasher("/m", ["--prefix-caching-hash-algo", "xxhash"], {}) is None  # random seed


def test_long_polls_carry_the_epoch_and_fall_back_to_plain_polls_where_refused():
    fake = FeedReplicas(["r0", "r1"])
    fake.refuse_wait = {"r1"}

    async def go(client, router):
        await asyncio.sleep(0.2)
        return dict(router.feed_live), dict(router.feed_long_poll)

    live, long_poll = run(fake, go, prompt_hasher=TextHasher(), feed_wait_s=0.05)
    assert live == {"r0": True, "r1": True} and long_poll == {"r0": True, "r1": False}
    first, later = fake.params["r0"][0], fake.params["r0"][-1]
    assert "epoch" not in first and later["epoch"] == "life-r0" and later["wait_s"] == "0.05"
    assert all("wait_s" not in p for p in fake.params["r1"][1:])  # after the one refusal
