"""The demote race: a full CPU tier plans ``[demote victim, store_cpu new]`` in one step. The victim's host
memory goes to the background disk writer; it must not be handed to the new entry before the writer (and
any load reading it) is done, or the disk file of the victim holds the new entry's bytes under a valid
checksum and loads of the victim are served from the new entry's buffer."""
from __future__ import annotations

import time

import pytest
import torch

from offload import host_memory, metadata
from offload.tiers.disk import DiskStore
from offload.tiers.planner import demote, store
from tests.offload.test_layerwise import LAYERS, NUM_BLOCKS, TOKENS, assert_same_payload, make_worker, \
    reference_entries

STEPS = 24


def _slow_writes(monkeypatch, seconds: float) -> None:
    write = DiskStore.write

    def slow(self, key, payload):
        time.sleep(seconds)  # slower than a step: the victim's memory is still being read
        return write(self, key, payload)

    monkeypatch.setattr(DiskStore, "write", slow)


def _host(kind: str):
    if kind == "plain":
        return host_memory.HostMemory()
    # A pool small enough that ranges must be recycled during the run (events complete at once on the CPU).
    return host_memory.PinnedPool(64 * 1024, streams=[object()], pin=False,
                                  record_event=lambda stream: type("Done", (), {"query": lambda self: True})())


@pytest.mark.parametrize("policy", ["drop:streaming", "quant:int8", "keep"])
@pytest.mark.parametrize("host", ["plain", "pool"])
def test_demoted_entries_keep_their_bytes_under_a_slow_writer(tmp_path, monkeypatch, policy, host):
    _slow_writes(monkeypatch, 0.02)
    side = make_worker(tmp_path)
    side._host = side.tiers["cpu"].host = _host(host)
    g = torch.Generator().manual_seed(1)
    expected: dict[str, dict[str, torch.Tensor]] = {}
    prev = None
    for step in range(STEPS):
        block = step % NUM_BLOCKS
        for _, kc, vc in side.layers:  # new bytes in the block every step: a recycled buffer shows
            kc[block] = torch.randn(kc[block].shape, generator=g)
            vc[block] = torch.randn(vc[block].shape, generator=g)
        key = f"entry-{step}"
        expected[key] = reference_entries(side, policy, [block], prefix_len=TOKENS)[0]
        ops = ([demote(prev, "cpu", "disk")] if prev is not None else []) + [store("cpu", key)]
        spec = metadata.SaveSpec(policy, [key], [block], [0], TOKENS)
        meta = metadata.KvplugConnectorMetadata(saves=[spec], tier_ops=ops)
        side.start_load(meta)
        for name, _, _ in side.layers:
            side.wait_for_layer_load(name)
            side.save_layer(name, meta)
        side.save(meta)
        # Every entry so far is served with its own bytes: from the CPU tier, the writer's pending set, disk.
        for k, want in expected.items():
            got, _ = side._fetch(k)
            assert got is not None, k
            assert_same_payload(got, want)
        prev = key
    side.tiers["disk"].writer.flush()
    assert side.tiers["disk"].writer.failed_writes == 0
    for k, want in expected.items():
        if k == prev:
            continue  # still in the CPU tier
        on_disk = side.tiers["disk"].disk.read(k)
        assert on_disk is not None, k
        assert_same_payload(on_disk, want)
    assert LAYERS == len(side.layers)
