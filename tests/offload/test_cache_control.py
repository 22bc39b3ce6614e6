"""Cache control on the scheduler side, without an engine: the per-request report (sources, misses and why),
its counters, the inventory and events feed, pins and priority classes, restart, the control socket."""
from __future__ import annotations

import collections
import os
from types import SimpleNamespace

import pytest

from cache_policies import registry as policy_registry
from offload import control, inventory, request_keys, scheduler_side
from offload import keys as keys_module
from offload.config import OffloadConfig
from offload.layout import KvLayout
from offload.metadata import KvplugWorkerMetadata
from offload.scheduler_side import SchedulerSide
from offload.tiers.disk import rank_dir
from offload.tiers.eviction import EvictionIndex
from offload.tiers.planner import COPY, DEMOTE, STORE
from tests.offload.test_layerwise import LAYERS, POLICIES, TOKENS

BLOCK_BYTES = LAYERS * 2 * TOKENS * 32 * 4 * 2  # keep: K and V of one block, float32


class Counter:
    def __init__(self) -> None:
        self.values: collections.Counter = collections.Counter()

    def labels(self, **kw):
        key = tuple(sorted(kw.items()))
        parent = self

        class _Child:
            def inc(self, n=1):
                parent.values[key] += n

            def set(self, v):
                parent.values[key] = v
        return _Child()

    def get(self, **kw) -> float:
        return self.values[tuple(sorted(kw.items()))]


def metrics():
    return SimpleNamespace(**{n: Counter() for n in ("hits", "misses", "evictions", "prompt_tokens", "pin_refusals",
                                                     "pinned_bytes", "resident_bytes", "isolated_blocks",
                                                     "skipped_stores", "corrupt_entries")})


def side_with(cpu_blocks: int, disk=None, pinned_fraction=0.5) -> SchedulerSide:
    layout = KvLayout(model="m", dtype="float32", num_layers=LAYERS, kv_heads=2, head_dim=32,
                      block_size=TOKENS, kv_cache_dtype="auto", tp_rank=0, tp_size=1)
    cfg = OffloadConfig(enabled=True, cpu_size=cpu_blocks * BLOCK_BYTES, disk_path=str(disk) if disk else "",
                        disk_size=64 * (BLOCK_BYTES + 1024), reuse_weight=0, max_pinned_fraction=pinned_fraction)
    return SchedulerSide(layout, cfg, POLICIES, metrics())


def req(rid, n_blocks, tag=None, salt=None, **params):
    """A prompt of ``n_blocks`` full blocks + 3 tokens; the same ``tag`` gives the same tokens and hashes."""
    tag = tag or rid
    base = sum(map(ord, tag)) * 1000
    prompt = [base + i for i in range(n_blocks * TOKENS + 3)]
    hashes = [f"{tag}-{salt}-h{i}".encode() for i in range(n_blocks)]
    return SimpleNamespace(request_id=rid, prompt_token_ids=prompt, num_tokens=len(prompt), block_hashes=hashes,
                           kv_transfer_params={request_keys.REPORT_ID_KEY: rid, **params}, cache_salt=salt)


class Blocks:
    def __init__(self, ids):
        self.ids = list(ids)

    def get_block_ids(self):
        return (self.ids,)


def serve(side, r, gpu_blocks=0):
    """One request through the scheduler side: lookup, allocation, the prefill step (saves), finish.
    Returns (report, the step's metadata); disk-tier ops leave files, as the worker would."""
    matched, _ = side.get_num_new_matched_tokens(r, gpu_blocks * TOKENS)
    ids = list(range(100, 100 + len(r.block_hashes) + 1))
    side.update_state_after_alloc(r, Blocks(ids), matched)
    new = SimpleNamespace(req_id=r.request_id, block_ids=(ids,), num_computed_tokens=gpu_blocks * TOKENS)
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    meta = side.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=cached,
                                                     num_scheduled_tokens={r.request_id: len(r.prompt_token_ids)}))
    if side.cfg.disk_path:
        write_disk_files(side, meta.tier_ops)
    params = side.finish_report(r)
    side.request_finished(r, (ids,))
    return params[request_keys.REPORT_FIELD], meta


def write_disk_files(side, ops):
    root = rank_dir(side.cfg.disk_path, 0)
    os.makedirs(root, exist_ok=True)
    for op in ops:
        if (op.kind == STORE and op.tier == "disk") or (op.kind in (DEMOTE, COPY) and op.to == "disk"):
            with open(os.path.join(root, f"{op.key}.kv"), "wb") as f:
                f.write(b"x" * 2048)
        elif op.tier == "disk" and op.kind == "drop":
            os.unlink(os.path.join(root, f"{op.key}.kv"))


def test_report_counts_each_source_and_equals_the_counters():
    side = side_with(cpu_blocks=16)
    first, _ = serve(side, req("a", 4))
    assert first["gpu_tokens"] == first["cpu_tokens"] == 0 and first["recomputed_tokens"] == 4 * TOKENS + 3
    assert first["missed_blocks"] == 4 and first["first_miss"] == {"block": 0, "token": 0, "reason": "never_seen"}
    again, _ = serve(side, req("a2", 4, tag="a"), gpu_blocks=1)  # vLLM's prefix cache had block 0
    assert (again["gpu_tokens"], again["cpu_tokens"], again["recomputed_tokens"]) == (TOKENS, 3 * TOKENS, 3)
    assert again["missed_blocks"] == 0 and again["first_miss"] is None and again["final"]
    m = side.m
    for source in ("gpu", "cpu", "recomputed"):
        assert m.prompt_tokens.get(source=source) == first[f"{source}_tokens"] + again[f"{source}_tokens"]
    assert m.misses.get(reason="never_seen") == 4 and m.hits.get(tier="cpu") == 3


def test_first_miss_names_eviction_salt_policy_opt_out_and_unreadable_loads():
    side = side_with(cpu_blocks=4)  # no disk: the CPU tier's victims are dropped
    serve(side, req("a", 4))
    serve(side, req("b", 4))  # evicts a's blocks
    assert serve(side, req("a2", 4, tag="a"))[0]["first_miss"]["reason"] == "evicted_from_cpu"
    assert serve(side, req("s", 4, tag="a", salt="tenant2"))[0]["first_miss"]["reason"] == "different_cache_salt"
    other = serve(side, req("p", 4, tag="a", **{policy_registry.REQUEST_POLICY_KEY: "quant:int8"}))[0]
    assert other["first_miss"]["reason"] == "other_policy" and other["policy"] == "quant:int8"
    serve(side, req("o", 2, tag="opt", kvplug_offload=False))
    assert serve(side, req("o2", 2, tag="opt"))[0]["first_miss"]["reason"] == "opted_out"
    # A planned load the worker could not read: vLLM recomputes from it on.
    side = side_with(cpu_blocks=4)
    serve(side, req("a", 4))
    r = req("u", 4, tag="a")
    matched, _ = side.get_num_new_matched_tokens(r, 0)
    assert matched == 4 * TOKENS
    side.update_state_after_alloc(r, Blocks(range(5)), matched)
    bad = side.key("keep", r.block_hashes[1])
    side.update_connector_output(SimpleNamespace(finished_sending=None,
                                                 kv_connector_worker_meta=KvplugWorkerMetadata({bad})))
    report = side.finish_report(r)[request_keys.REPORT_FIELD]
    assert report["cpu_tokens"] == TOKENS and report["missed_blocks"] == 3
    assert report["first_miss"]["reason"] == "unreadable" and side.planner.where(bad) is None
    assert side.m.misses.get(reason="unreadable") == 3


def test_events_feed_counts_stored_and_removed_per_hash_and_tier_and_resets():
    side = side_with(cpu_blocks=4)
    inv = side.inventory
    serve(side, req("a", 4))
    feed = inv.events_since(0)
    hashes = [bytes(f"a-None-h{i}", "ascii").hex() for i in range(4)]
    assert not feed["reset"] and feed["stored"] == [[h, "cpu"] for h in hashes] and feed["removed"] == []
    seq = feed["seq"]
    serve(side, req("b", 4))
    delta = inv.events_since(seq, inv.epoch)
    assert sorted(delta["removed"]) == sorted([h, "cpu"] for h in hashes) and len(delta["stored"]) == 4
    assert inv.events_since(seq, "another-epoch")["reset"]
    full = inv.events_since(None)
    assert full["reset"] and sorted(full["resident"]) == sorted(delta["stored"]) and full["block_size"] == TOKENS
    listing = inv.listing()
    assert listing["total_prefixes"] == 1 and listing["prefixes"][0]["tiers"]["cpu"]["tokens"] == 4 * TOKENS
    assert "head_token_ids" not in listing["prefixes"][0]  # no prompt content unless enabled
    assert inv.listing(limit=1, offset=1)["prefixes"] == []


def test_priority_classes_evict_low_first_and_pins_never():
    idx = EvictionIndex(400, reuse_weight=0)
    idx.add("high", 100, priority="high")
    idx.add("pinned", 100)
    idx.pin("pinned")
    idx.add("normal", 100)
    idx.add("low", 100, priority="low")
    order = [idx.pop_victim()[0] for _ in range(3)]
    assert order == ["low", "normal", "high"]
    with pytest.raises(KeyError):
        idx.pop_victim()
    assert not idx.fits(400) and idx.fits(300)


def test_pins_survive_pressure_and_restart_and_a_full_pin_budget_refuses(tmp_path):
    side = side_with(cpu_blocks=16, disk=tmp_path / "disk")  # pin budget: 8 CPU blocks
    report, meta = serve(side, req("sys", 4, **{request_keys.PIN_KEY: True, request_keys.PRIORITY_KEY: "high"}))
    assert report["pin"]["pinned"] and report["pin"]["blocks"] == 4
    assert sum(op.kind == COPY for op in meta.tier_ops) == 4  # copied to disk: survives a restart
    assert side.m.pinned_bytes.get(tier="cpu") == 4 * BLOCK_BYTES
    assert side.m.pinned_bytes.get(tier="disk") == 4 * (BLOCK_BYTES + 1024)
    assert side.m.resident_bytes.get(tier="cpu", **{"class": "high"}) == 4 * BLOCK_BYTES
    pinned = [side.key("keep", h) for h in req("sys", 4).block_hashes]
    for i in range(12):  # pressure: 48 blocks through a 16-block CPU tier
        serve(side, req(f"x{i}", 4))
    assert all(side.planner.where(k) == "cpu" for k in pinned)
    refused, _ = serve(side, req("big", 5, **{request_keys.PIN_KEY: True}))
    assert not refused["pin"]["pinned"] and "cpu tier full of pins" in refused["pin"]["error"]
    assert side.m.pin_refusals.get(tier="cpu") == 1 and refused["recomputed_tokens"] > 0  # served anyway
    # Restart: the disk tier's entries come back, with their pin and block hashes.
    again = side_with(cpu_blocks=16, disk=tmp_path / "disk")
    assert all(again.planner.where(k) == "disk" for k in pinned)
    assert all(again.planner.index("disk").pinned_until(k) is not None for k in pinned)
    listing = again.inventory.listing(pinned=True)
    assert [p["prefix"] for p in listing["prefixes"]] == [report["pin"]["prefix"]]
    assert again.inventory.events_since(None)["resident"]
    for i in range(20):  # pressure on the disk tier after the restart
        serve(again, req(f"y{i}", 4))
    assert all(again.planner.where(k) is not None for k in pinned)


def test_operator_pin_unpin_delete_and_the_control_socket(tmp_path):
    side = side_with(cpu_blocks=16)
    report, _ = serve(side, req("a", 4))
    prefix = side.inventory.listing()["prefixes"][0]["prefix"]
    server = control.ControlServer(side.answer, tmp_path / "c.sock")
    try:
        ask = lambda **m: control.call_sync(m, tmp_path / "c.sock")  # noqa: E731
        assert ask(op="pin", prefix=prefix[:12], ttl_s=60)["pinned"]
        page = ask(op="inventory", pinned=True)
        assert page["prefixes"][0]["pinned"] and 0 < page["prefixes"][0]["pin_ttl_s"] <= 60
        assert ask(op="report", id="a")["report"]["first_miss"]["reason"] == "never_seen"
        assert not ask(op="pin", prefix=prefix, pinned=False)["pinned"]
        assert ask(op="delete", prefix=prefix)["blocks"] == 4
        assert ask(op="pin", prefix=prefix)["status"] == 404
        assert ask(op="events", since=0)["removed"]
        assert serve(side, req("a2", 4, tag="a"))[0]["first_miss"]["reason"] == inventory.DELETED
    finally:
        server.close()


def test_prompt_tokens_only_when_the_operator_enables_them():
    side = side_with(cpu_blocks=16)
    side.inventory.prompt_tokens = 5
    serve(side, req("a", 2))
    view = side.inventory.listing()["prefixes"][0]
    assert view["head_token_ids"] == req("a", 2).prompt_token_ids[:5]


def test_a_requests_keys_are_computed_once_and_equal_the_per_block_keys(monkeypatch):
    side = side_with(cpu_blocks=16)
    serve(side, req("a", 4))
    r = req("a2", 4, tag="a")
    made = []
    real = keys_module.KeyMaker.__call__
    monkeypatch.setattr(keys_module.KeyMaker, "__call__", lambda self, h: made.append(h) or real(self, h))
    report, meta = serve(side, r)  # lookup, load, saves planned, prefix recorded: each block keyed once
    assert report["cpu_tokens"] == 4 * TOKENS
    assert made == list(r.block_hashes)
    assert meta.loads[0].keys == [side.key("keep", h) for h in r.block_hashes]


def test_hits_are_counted_once_per_tier_and_load():
    side = side_with(cpu_blocks=16)
    serve(side, req("a", 4))
    side.m.hits = Counter()
    calls = []
    real_labels = side.m.hits.labels
    side.m.hits.labels = lambda **kw: calls.append(kw) or real_labels(**kw)
    serve(side, req("a2", 4, tag="a"))
    assert side.m.hits.get(tier="cpu") == 4 and calls == [{"tier": "cpu"}]


def test_a_follow_up_hashes_the_content_of_its_new_blocks_only(monkeypatch):
    side = side_with(cpu_blocks=16)
    serve(side, req("a", 4))
    r = req("a2", 6, tag="a")  # the same 4 blocks, then 2 new ones
    hashed = []
    real = scheduler_side.hashlib.blake2b
    monkeypatch.setattr(scheduler_side.hashlib, "blake2b", lambda data, **kw: hashed.append(data) or real(data, **kw))
    report, _ = serve(side, r)
    # the 4 stored blocks' digests were known: block 4 for the first miss's reason, blocks 4-5 when recorded
    assert report["cpu_tokens"] == 4 * TOKENS and report["first_miss"]["block"] == 4 and len(hashed) == 3
    assert report["first_miss"]["reason"] == inventory.NEVER_SEEN
    monkeypatch.undo()
    # the same digests a cold computation gives (what a later miss compares)
    assert [side.inventory.blocks[side.key("keep", h)].content for h in r.block_hashes] == side._content_chain(r, 6)


def test_a_load_locates_each_key_once_for_its_hits_and_report(monkeypatch):
    side = side_with(cpu_blocks=16)
    serve(side, req("a", 4))
    r = req("a2", 4, tag="a")
    matched, _ = side.get_num_new_matched_tokens(r, 0)
    located = []
    real = side.planner._locate
    monkeypatch.setattr(side.planner, "_locate", lambda key: located.append(key) or real(key))
    side.update_state_after_alloc(r, Blocks(range(100, 105)), matched)
    keys = [side.key("keep", h) for h in r.block_hashes]
    assert located == keys and side.reqs["a2"].load_tiers == ["cpu"] * 4
    assert side.reqs["a2"].report["cpu_tokens"] == 4 * TOKENS
