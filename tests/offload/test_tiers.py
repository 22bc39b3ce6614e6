"""Tier plan (eviction, demotion, full tiers), CPU store, disk store (atomic, checksummed, restart-safe)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from offload.entry_format import EntryCorrupt, decode_entry, encode_entry
from offload.tiers import registry as tier_registry
from offload.tiers.cpu import CpuStore
from offload.tiers.disk import DiskStore
from offload.tiers.eviction import EvictionIndex
from offload.tiers.planner import TierBudget, TierPlanner, demote, drop, store

REPO = Path(__file__).resolve().parents[2]


def payload(seed=0, n=256):
    g = torch.Generator().manual_seed(seed)
    return {"k": torch.randn(2, 3, n, generator=g).to(torch.bfloat16), "s": torch.rand(4, generator=g),
            "q": torch.randint(-128, 127, (5, 7), dtype=torch.int8, generator=g)}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def planner(cpu_bytes, disk_bytes=0, reuse_weight=0.0):
    """The registered tiers (CPU, then disk) with these budgets."""
    budget = {"cpu": cpu_bytes, "disk": disk_bytes}
    return TierPlanner([TierBudget(t.name, budget[t.name], t.entry_overhead) for t in tier_registry.TIERS],
                       reuse_weight)


def test_eviction_lru_order_without_reuse_weight():
    idx = EvictionIndex(300, reuse_weight=0)
    assert idx.add("a", 100) == [] and idx.add("b", 100) == [] and idx.add("c", 100) == []
    idx.touch("a")
    assert [v[0] for v in idx.add("d", 100)] == ["b"]
    assert [v[0] for v in idx.add("e", 150)] == ["c", "a"]
    assert idx.used == 250 and set(idx.keys()) == {"d", "e"}


def test_reuse_count_protects_hot_entries():
    idx = EvictionIndex(300, reuse_weight=8)
    idx.add("hot", 100)
    for _ in range(3):
        idx.touch("hot")
    evicted = []
    for i in range(10):  # a stream of one-off entries
        evicted += [v[0] for v in idx.add(f"x{i}", 100)]
    assert "hot" not in evicted[:6]
    # ...but it is not immortal: it ages out once enough newer traffic passed.
    for i in range(40):
        evicted += [v[0] for v in idx.add(f"y{i}", 100)]
    assert "hot" in evicted


def test_plan_demotes_to_disk_then_deletes_and_skips_what_never_fits():
    plan = planner(cpu_bytes=200, disk_bytes=2 * (100 + 1024), reuse_weight=0)
    assert plan.plan_store("a", 100) == [store("cpu", "a")]
    assert plan.plan_store("a", 100) == []  # already stored
    plan.plan_store("b", 100)
    assert plan.plan_store("c", 100) == [demote("a", "cpu", "disk"), store("cpu", "c")]
    assert plan.where("a") == "disk" and plan.where("c") == "cpu"
    plan.plan_store("d", 100)  # demotes b
    assert plan.plan_store("e", 100) == [drop("disk", "a"), demote("c", "cpu", "disk"), store("cpu", "e")]
    assert plan.where("a") is None
    assert plan.plan_store("huge", 10**9) == [] and plan.stats.skipped_stores == 1  # full tier: skip, not fail
    assert plan.record_hit("b") == "disk" and plan.record_hit("zz") is None
    assert plan.stats.hits["disk"] == 1 and plan.stats.misses == 1
    assert plan.stats.evictions == {"cpu": 3, "disk": 1}


def test_plan_without_cpu_tier_stores_straight_to_disk_and_without_disk_drops():
    assert planner(0, 10_000).plan_store("a", 10) == [store("disk", "a")]
    plan = planner(100, 0)
    plan.plan_store("a", 100)
    assert plan.plan_store("b", 100) == [drop("cpu", "a"), store("cpu", "b")]


def test_cpu_store_copies_and_never_recycles_memory_a_reader_still_holds():
    store = CpuStore()
    p = payload()
    store.put("a", p)
    got = store.get("a")
    assert same(got, p) and got["k"].data_ptr() != p["k"].data_ptr()
    store.release("a")  # e.g. demoted: the disk writer still holds ``got``
    assert store.used_bytes == 0 and "a" not in store
    store.put("b", payload(1))
    assert store.get("b")["k"].data_ptr() != got["k"].data_ptr()
    assert same(got, p) and same(store.get("b"), payload(1))
    assert store.used_bytes == sum(t.numel() * t.element_size() for t in payload().values())


def test_entry_format_round_trip_and_rejects_damage():
    p = payload()
    blob = b"".join(bytes(c) for c in encode_entry("k1", p))
    assert same(decode_entry(blob, "k1"), p)
    with pytest.raises(EntryCorrupt, match="key"):
        decode_entry(blob, "other")
    with pytest.raises(EntryCorrupt, match="digest"):
        decode_entry(blob[:-3], "k1")
    flipped = bytearray(blob)
    flipped[-10] ^= 0x40
    with pytest.raises(EntryCorrupt, match="digest"):
        decode_entry(bytes(flipped), "k1")


def test_disk_store_round_trip_survives_reopen(tmp_path):
    DiskStore(tmp_path).write("a", payload())
    reopened = DiskStore(tmp_path)
    assert set(reopened.scan()) == {"a"}
    assert same(reopened.read("a"), payload())
    assert reopened.read("missing") is None and reopened.corrupt_count == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_corrupt_entry_is_a_counted_miss_never_served(tmp_path, damage):
    seen = []
    disk = DiskStore(tmp_path, on_corrupt=lambda key, why: seen.append(key))
    disk.write("a", payload())
    path = disk.path("a")
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[-5] ^= 0xFF
    elif damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"not an entry at all")
    path.write_bytes(bytes(data))
    assert disk.read("a") is None
    assert disk.corrupt_count == 1 and seen == ["a"] and not path.exists()
    assert disk.read("a") is None and disk.corrupt_count == 1  # gone: a plain miss now


def dead_pid():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_scan_lists_entries_without_reading_them_and_removes_orphaned_temp_files(tmp_path, monkeypatch):
    disk = DiskStore(tmp_path)
    disk.write("a", payload())
    disk.write("b", payload(1))
    path = disk.path("b")
    path.write_bytes(path.read_bytes()[:-100])
    (tmp_path / f".tmp-c.{dead_pid()}.0123abcd.0").write_bytes(b"partial")
    fresh = DiskStore(tmp_path)
    with monkeypatch.context() as m:  # a stat per file: no entry is opened at startup
        m.setattr("builtins.open", lambda *a, **k: pytest.fail(f"scan opened {a[0]}"))
        m.setattr(Path, "read_bytes", lambda self: pytest.fail(f"scan read {self}"))
        assert set(fresh.scan()) == {"a", "b"}
    assert fresh.read("b") is None and fresh.corrupt_count == 1  # verified on read: a counted miss
    assert same(fresh.read("a"), payload())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.kv"]


def test_kill_9_during_disk_write_then_restart(tmp_path):
    """A writer killed mid-entry leaves no entry a restarted tier would serve; earlier entries are reused."""
    child = subprocess.Popen([sys.executable, "-m", "tests.offload.disk_writer_child", str(tmp_path)],
                             cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "GOOD-WRITTEN"
        assert child.stdout.readline().strip() == "BIG-STARTED"
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".tmp-big") and p.stat().st_size > 0 for p in tmp_path.iterdir()):
            assert time.monotonic() < deadline, "child never started the big write"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(30)
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "big.kv").exists()
    restarted = DiskStore(tmp_path)
    assert set(restarted.scan()) == {"good"}
    assert torch.equal(restarted.read("good")["k"], torch.arange(1000, dtype=torch.float32))
    assert restarted.read("big") is None
    assert not any(p.name.startswith(".tmp-") for p in tmp_path.iterdir())
