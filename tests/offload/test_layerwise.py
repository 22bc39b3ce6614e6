"""The connector's layer-by-layer save and load (offload/layerwise.py through the worker side of
offload/connector.py), driven like vLLM drives it: start_load_kv, then per layer wait_for_layer_load,
attention, save_kv_layer, and wait_for_save at the end of the step. CPU tensors: the same code path the
CPU engine runs (on CUDA the same calls queue on side streams)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from cache_policies import registry as policy_registry
from cache_policies.config import CachePolicyConfig
from cache_policies.provider import RegistryPolicyProvider
from kvplug.kv_payload import BlockContext
from offload import layerwise, metadata
from offload.config import OffloadConfig
from offload.tiers.planner import demote, store
from offload.worker_side import WorkerSide

LAYERS, HEADS, TOKENS, DIM, NUM_BLOCKS = 4, 2, 16, 32, 48
LAYERWISE = [n for n in policy_registry.POLICY_NAMES if policy_registry.create(n).layerwise]
POLICIES = RegistryPolicyProvider(CachePolicyConfig())


def make_worker(tmp_path=None, cpu_size="1GiB", load_overlap=False):
    cfg = OffloadConfig(enabled=True, cpu_size=cpu_size, disk_path=str(tmp_path / "disk") if tmp_path is not None else "",
                        load_overlap=load_overlap)
    side = WorkerSide(SimpleNamespace(tp_rank=0), cfg, POLICIES)  # no metrics
    g = torch.Generator().manual_seed(0)
    views = [(f"model.layers.{i}.self_attn.attn", torch.randn(NUM_BLOCKS, HEADS, TOKENS, DIM, generator=g),
              torch.randn(NUM_BLOCKS, HEADS, TOKENS, DIM, generator=g)) for i in range(LAYERS)]
    side.register_views(views)
    return side


def save_meta(policy, block_ids, tier="cpu", prefix_len=None):
    keys = [f"{policy}-{b}" for b in block_ids]
    starts = [i * TOKENS for i in range(len(block_ids))]
    spec = metadata.SaveSpec(policy, keys, list(block_ids), starts, prefix_len or len(block_ids) * TOKENS)
    return metadata.KvplugConnectorMetadata(saves=[spec], tier_ops=[store(tier, k) for k in keys]), keys


def run_step(side, meta, hooks=True, on_layer=None):
    """One forward pass as vLLM runs it (maybe_transfer_kv_layer around each attention layer)."""
    side.start_load(meta)
    if hooks:
        for i, (name, _, _) in enumerate(side.layers):
            side.wait_for_layer_load(name)
            if on_layer is not None:
                on_layer(i)
            side.save_layer(name, meta)
    side.save(meta)


def reference_entries(side, policy_name, block_ids, prefix_len=None):
    """The synchronous whole-block path: every layer encoded at once."""
    k = torch.stack([kc[block_ids] for _, kc, _ in side.layers], dim=1)
    v = torch.stack([vc[block_ids] for _, _, vc in side.layers], dim=1)
    ctx = BlockContext.contiguous(len(block_ids), TOKENS, prefix_len=prefix_len)
    return policy_registry.create(policy_name).encode(k, v, ctx)


def assert_same_payload(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].contiguous().view(torch.uint8), b[name].contiguous().view(torch.uint8)), name


@pytest.mark.parametrize("name", policy_registry.POLICY_NAMES)
def test_layerwise_flag_means_per_layer_encoding_equals_whole_block_encoding(name):
    policy = policy_registry.create(name, residual_tokens=TOKENS) if name == "quant:int4" else policy_registry.create(name)
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(5, LAYERS, HEADS, TOKENS, DIM, generator=g) for _ in range(2))
    ctx = BlockContext.contiguous(5, TOKENS)
    if not policy.layerwise:
        pytest.skip(f"{name} moves whole blocks (its payloads are not layer-major)")
    whole = policy.encode(k, v, ctx)
    per_layer = [policy.encode_groups(k[:, l:l + 1], v[:, l:l + 1], ctx) for l in range(LAYERS)]
    for l in range(LAYERS):
        assert [idx for idx, _ in per_layer[l]] == [idx for idx, _ in per_layer[0]]
    for group_no, (idx, _) in enumerate(per_layer[0]):
        for j, i in enumerate(idx):
            joined = {f: torch.cat([per_layer[l][group_no][1][f][j] for l in range(LAYERS)]) for f in whole[i]}
            assert_same_payload(joined, whole[i])
        # decode_stacked of a group equals decode of its blocks
        batch = {f: torch.stack([whole[i][f] for i in idx]) for f in whole[idx[0]]}
        like = torch.empty(len(idx), LAYERS, HEADS, TOKENS, DIM)
        ks, vs, _ = policy.decode_stacked(batch, like)
        kd, vd, _ = policy.decode([whole[i] for i in idx], like)
        assert torch.equal(ks, kd) and torch.equal(vs, vd)


@pytest.mark.parametrize("policy", ["keep", "quant:int8", "quant:int4", "drop:streaming"])
@pytest.mark.parametrize("hooks", [True, False], ids=["per-layer-hooks", "no-hooks"])
def test_saved_entries_have_the_bytes_of_the_synchronous_path(policy, hooks):
    side = make_worker()
    ids = list(range(3, 3 + 2 * layerwise.SEGMENT_BLOCKS // 64 + 5))  # several blocks, int4 exact tail
    meta, keys = save_meta(policy, ids)
    run_step(side, meta, hooks=hooks)
    ref = reference_entries(side, policy, ids)
    for key, want in zip(keys, ref):
        assert_same_payload(side.tiers["cpu"].get(key), want)
    if policy != "drop:streaming":
        assert side.stats.layerwise_saves == (LAYERS if hooks else 0)
        assert all(side.tiers["cpu"].locate(k) is not None for k in keys)  # views of one segment, no per-block copy


def test_segments_split_at_segment_blocks(monkeypatch):
    monkeypatch.setattr(layerwise, "SEGMENT_BLOCKS", 4)
    side = make_worker()
    ids = list(range(10))
    meta, keys = save_meta("keep", ids)
    run_step(side, meta)
    segs = {id(side.tiers["cpu"].locate(k)[0]) for k in keys}
    assert len(segs) == 3  # 4 + 4 + 2
    for key, want in zip(keys, reference_entries(side, "keep", ids)):
        assert_same_payload(side.tiers["cpu"].get(key), want)


@pytest.mark.parametrize("policy", ["keep", "quant:int8", "quant:int4", "drop:streaming"])
def test_load_of_layer_i_is_complete_when_layer_i_waits_and_not_issued_all_at_once(policy):
    side = make_worker()
    src = [5, 6, 7, 8, 9, 10]
    meta, keys = save_meta(policy, src)
    run_step(side, meta)
    dst = [20, 22, 21, 30, 31, 40]  # arbitrary physical blocks
    want = [(kc[src].clone(), vc[src].clone()) for _, kc, vc in side.layers]
    for _, kc, vc in side.layers:
        kc[dst] = 0
        vc[dst] = 0
    # Decoding the stored entries is what every layer must hold after its wait (exact for keep).
    decoded = policy_registry.create(policy).decode(
        [side.tiers["cpu"].get(k) for k in keys], torch.empty(len(src), LAYERS, HEADS, TOKENS, DIM))
    load = metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec(policy, keys, dst)])
    side.start_load(load)
    _, last_k, _ = side.layers[-1]
    layer_wise = policy_registry.create(policy).layerwise
    if layer_wise:  # the last layer is not copied before the forward pass reaches it
        assert not last_k[dst].any()
    seen = []

    def attention(i):
        _, kc, vc = side.layers[i]
        seen.append(i)
        assert torch.equal(kc[dst], decoded[0][:, i]) and torch.equal(vc[dst], decoded[1][:, i]), i
        if policy == "keep":
            assert torch.equal(kc[dst], want[i][0]) and torch.equal(vc[dst], want[i][1])

    for i, (name, _, _) in enumerate(side.layers):
        side.wait_for_layer_load(name)
        attention(i)
    side.save(load)
    assert seen == list(range(LAYERS))
    assert side.stats.loaded_blocks["cpu"] == len(src)
    assert not side.take_load_errors()


def test_a_load_counts_its_blocks_and_bytes_once_per_tier(monkeypatch):
    """bytes_loaded is the sum of the loaded entries' sizes (segment views and loose disk entries alike),
    incremented once per tier and load, not once per block."""
    from kvplug.kv_payload import payload_nbytes
    from tests.offload.test_cache_control import Counter

    side = make_worker()
    meta, keys = save_meta("quant:int8", list(range(6)))
    run_step(side, meta)
    loose = {"k": keys[4], "p": side.tiers["cpu"].get(keys[4])}
    side.tiers["cpu"]._slots.pop(loose["k"])  # one entry not in a segment (as a disk entry is)
    side.tiers["cpu"]._entries[loose["k"]] = {n: t.clone() for n, t in loose["p"].items()}
    side.m = SimpleNamespace(bytes_loaded=Counter(), load_seconds=SimpleNamespace(observe=lambda s: None))
    calls = []
    real = side.m.bytes_loaded.labels
    side.m.bytes_loaded.labels = lambda **kw: calls.append(kw) or real(**kw)
    want = sum(payload_nbytes(side.tiers["cpu"].get(k)) for k in keys[:5])
    missing = keys[:5] + ["absent"]
    run_step(side, metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("quant:int8", missing, list(range(20, 26)))]))
    assert side.m.bytes_loaded.get(tier="cpu", policy="quant:int8") == want
    assert calls == [{"tier": "cpu", "policy": "quant:int8"}]
    assert side.stats.loaded_blocks["cpu"] == 5 and side.take_load_errors() == {25}


def test_loads_the_forward_never_waited_for_are_issued_at_wait_for_save():
    side = make_worker()
    meta, keys = save_meta("keep", [1, 2, 3])
    run_step(side, meta)
    want = [kc[[1, 2, 3]].clone() for _, kc, _ in side.layers]
    for _, kc, _ in side.layers:
        kc[[10, 11, 12]] = 0
    load = metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("keep", keys, [10, 11, 12])])
    run_step(side, load, hooks=False)
    assert all(torch.equal(kc[[10, 11, 12]], w) for (_, kc, _), w in zip(side.layers, want))


def test_load_listeners_run_per_layer_after_that_layer_is_written():
    side = make_worker()
    meta, keys = save_meta("quant:int8", [1, 2, 3, 4])
    run_step(side, meta)
    calls = []

    def listener(layer, block_ids, index):
        _, kc, _ = side.layers[layer]
        calls.append((layer, list(block_ids), bool(kc[index].abs().sum() > 0)))

    side.load_listeners.append(listener)
    for _, kc, _ in side.layers:
        kc[[30, 31, 32, 33]] = 0
    run_step(side, metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("quant:int8", keys, [30, 31, 32, 33])]))
    assert [c[0] for c in calls] == list(range(LAYERS))
    assert all(c[1] == [30, 31, 32, 33] and c[2] for c in calls)


def test_disk_tier_writes_in_the_background_and_serves_pending_entries(tmp_path):
    side = make_worker(tmp_path)
    gate = __import__("threading").Event()
    real_write = side.tiers["disk"].disk.write
    side.tiers["disk"].disk.write = lambda key, payload: (gate.wait(10), real_write(key, payload))[1]
    ids = [2, 3, 4]
    meta, keys = save_meta("quant:int8", ids, tier="disk")
    run_step(side, meta)  # returns although the writer is blocked
    assert side.tiers["disk"].writer.pending(keys[0]) is not None and not side.tiers["disk"].disk.path(keys[0]).exists()
    for _, kc, _ in side.layers:
        kc[[40, 41, 42]] = 0
    run_step(side, metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("quant:int8", keys, [40, 41, 42])]))
    assert side.stats.loaded_blocks["disk"] == 3 and not side.take_load_errors()
    gate.set()
    side.close()
    assert all(side.tiers["disk"].disk.path(k).exists() for k in keys)
    for key, want in zip(keys, reference_entries(side, "quant:int8", ids)):
        assert_same_payload(side.tiers["disk"].disk.read(key), want)
    # demote: CPU entry -> disk, released from the CPU tier
    meta2, keys2 = save_meta("keep", [7, 8])
    run_step(side, meta2)
    run_step(side, metadata.KvplugConnectorMetadata(tier_ops=[demote(k, "cpu", "disk") for k in keys2]))
    side.close()
    assert all(side.tiers["cpu"].get(k) is None and side.tiers["disk"].disk.read(k) is not None for k in keys2)


def test_a_failed_disk_write_is_a_recomputed_miss_not_a_failed_request(tmp_path):
    side = make_worker(tmp_path)

    def broken(key, payload):
        raise OSError(28, "No space left on device")

    side.tiers["disk"].disk.write = broken
    meta, keys = save_meta("keep", [1, 2], tier="disk")
    run_step(side, meta)
    side.close()
    assert side.tiers["disk"].writer.failed_writes == 2
    # Reported from the writer thread: the scheduler side forgets them (it planned them on disk).
    assert side.worker_meta().unreadable_keys == set(keys)
    assert side.worker_meta() is None  # each report once
    run_step(side, metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("keep", keys, [20, 21])]))
    assert side.take_load_errors() == {20, 21}
    assert side.worker_meta().unreadable_keys == {keys[0]}


def test_a_failed_host_allocation_skips_the_save_and_the_later_load_recomputes(monkeypatch):
    side = make_worker()

    def no_memory(*a, **k):
        raise RuntimeError("CUDA error: out of memory (pinned)")

    monkeypatch.setattr(layerwise.Segment, "allocate", no_memory)
    meta, keys = save_meta("keep", [1, 2, 3])
    run_step(side, meta)  # must not raise
    assert all(side.tiers["cpu"].get(k) is None for k in keys)
    run_step(side, metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("keep", keys, [20, 21, 22])]))
    assert side.take_load_errors() == {20, 21, 22}


def test_released_segment_slots_are_not_recycled_as_buffers():
    side = make_worker()
    meta, keys = save_meta("keep", [1, 2])
    run_step(side, meta)
    kept = side.tiers["cpu"].get(keys[1])["k"].clone()
    side.tiers["cpu"].release(keys[0])
    side.tiers["cpu"].put("other", {"k": torch.ones_like(kept), "v": torch.ones_like(kept)})
    assert torch.equal(side.tiers["cpu"].get(keys[1])["k"], kept)


def test_reloaded_blocks_get_fresh_retrieval_decode_summaries():
    """With retrieval decode on, a block the connector reloads must not keep the summary (per-channel key
    min/max) of whatever the physical block held before: decode would pick blocks by stale bounds."""
    from attention_backends.kvplug_backend import KvplugAttentionImpl
    from attention_backends.retrieval_decode import runner as rd_runner
    from attention_backends.retrieval_decode.summaries import BlockSummaries

    side = make_worker()
    impls = {}
    for name, kc, _ in side.layers:
        runner = SimpleNamespace(summaries=BlockSummaries.allocate(NUM_BLOCKS, HEADS, DIM, TOKENS))
        impl = SimpleNamespace(_retrieval_decode=runner)
        impl.after_external_kv_load = KvplugAttentionImpl.after_external_kv_load.__get__(impl)
        # The backend summarised what the blocks held before (another request's keys).
        runner.summaries.kmin[:NUM_BLOCKS] = kc.amin(dim=2)
        runner.summaries.kmax[:NUM_BLOCKS] = kc.amax(dim=2)
        impls[name] = SimpleNamespace(impl=impl)
    side.vllm_config = SimpleNamespace(compilation_config=SimpleNamespace(static_forward_context=impls))
    side.register_views(side.layers)
    meta, keys = save_meta("keep", [1, 2, 3])
    run_step(side, meta)
    dst = [30, 31, 32]
    stale = [impls[name].impl._retrieval_decode.summaries.kmax[dst].clone() for name, _, _ in side.layers]
    refreshed = rd_runner.stats_snapshot()["refreshed_summaries"]
    run_step(side, metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("keep", keys, dst)]))
    # counted (STATS and kvplug_retrieval_decode_refreshed_summaries): one per block and layer
    assert rd_runner.stats_snapshot()["refreshed_summaries"] - refreshed == len(dst) * len(side.layers)
    for (name, kc, _), old in zip(side.layers, stale):
        s = impls[name].impl._retrieval_decode.summaries
        assert torch.equal(s.kmin[dst], kc[dst].amin(dim=2)) and torch.equal(s.kmax[dst], kc[dst].amax(dim=2))
        assert not torch.equal(s.kmax[dst], old)  # the blocks' content changed: a stale summary would differ
