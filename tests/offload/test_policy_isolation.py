"""Lossy reloads never reach a request of another policy through vLLM's GPU prefix cache (scheduler side).

vLLM caches the blocks a connector loads into under the prefix's block hash, which has no policy in it. A
request that reloaded int8/int4/fp8/drop entries, and every block it computes attending to them, is taken
out of the prefix cache (``BlockPool.evict_blocks``: the request keeps its blocks, nobody else can hit
them); ``keep`` reloads are byte-identical and stay shareable. The engine test (test_engine_offload.py)
checks the tokens of a ``keep`` request that follows a ``drop`` reload of the same prefix."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from offload import connector as conn
from tests.offload.test_deferred_save import request, scheduler
from tests.offload.test_layerwise import TOKENS


class FakeBlockPool:
    def __init__(self) -> None:
        self.evicted: list[int] = []

    def evict_blocks(self, block_ids: set[int]) -> None:
        self.evicted += sorted(block_ids)


class FakeBlocks:
    def __init__(self, ids) -> None:
        self.ids = list(ids)

    def get_block_ids(self):
        return (self.ids,)


def _store_entries(side, req, n_blocks):
    for i in range(n_blocks):
        side.planner.plan_store(side.key(side.reqs[req.request_id].policy, req.block_hashes[i]), 100)


def _step(side, req, new_ids=None, computed=0, scheduled=0, cached_ids=None):
    new = [SimpleNamespace(req_id=req.request_id, block_ids=(list(new_ids),), num_computed_tokens=computed)] \
        if new_ids is not None else []
    cached = SimpleNamespace(req_ids=[req.request_id] if cached_ids is not None else [],
                             new_block_ids=[(list(cached_ids),)] if cached_ids is not None else [],
                             num_computed_tokens=[computed] if cached_ids is not None else [],
                             resumed_req_ids=set())
    so = SimpleNamespace(scheduled_new_reqs=new, scheduled_cached_reqs=cached,
                         num_scheduled_tokens={req.request_id: scheduled})
    return side.build_connector_meta(so)


@pytest.mark.parametrize("policy", ["quant:int8", "quant:int4", "quant:fp8", "drop:streaming", "drop:snapkv"])
def test_a_lossy_reload_and_what_is_computed_from_it_leave_the_prefix_cache(monkeypatch, policy):
    side = scheduler(monkeypatch)
    side.block_pool = pool = FakeBlockPool()
    req = request("lossy", 6, policy=policy, extra_tokens=TOKENS + 3)  # 6 stored blocks + 1 full + 3 tokens
    side.get_num_new_matched_tokens(req, 0)
    _store_entries(side, req, 4)
    matched, _ = side.get_num_new_matched_tokens(req, 2 * TOKENS)  # vLLM's own cache had blocks 0-1
    assert matched == 2 * TOKENS
    table = [10, 11, 12, 13, 14, 15, 16, 17]
    side.update_state_after_alloc(req, FakeBlocks(table), matched)
    assert pool.evicted == [12, 13]  # the loaded blocks, before any other request can look the prefix up
    _step(side, req, new_ids=table, computed=4 * TOKENS, scheduled=2 * TOKENS)  # a chunk: blocks 4-5
    assert pool.evicted == [12, 13, 14, 15]
    _step(side, req, cached_ids=[], computed=6 * TOKENS, scheduled=TOKENS + 3)  # block 6 + 3 tokens
    assert pool.evicted == [12, 13, 14, 15, 16]
    assert side.request_finished(req, table) in (True, False)
    assert pool.evicted == [12, 13, 14, 15, 16, 17]  # decode filled block 7 after the last step
    assert side.isolated_blocks == 6


def test_keep_reloads_and_lossy_requests_without_a_reload_stay_shareable(monkeypatch):
    side = scheduler(monkeypatch)
    side.block_pool = pool = FakeBlockPool()
    keep = request("keep", 4)
    side.get_num_new_matched_tokens(keep, 0)
    _store_entries(side, keep, 4)
    matched, _ = side.get_num_new_matched_tokens(keep, 0)
    side.update_state_after_alloc(keep, FakeBlocks(range(5)), matched)
    _step(side, keep, new_ids=range(5), scheduled=len(keep.prompt_token_ids))
    computed = request("int8-computed", 4, policy="quant:int8")  # nothing stored: computes, exact
    side.get_num_new_matched_tokens(computed, 0)
    side.update_state_after_alloc(computed, FakeBlocks(range(5, 10)), 0)
    _step(side, computed, new_ids=range(5, 10), scheduled=len(computed.prompt_token_ids))
    side.request_finished(keep, list(range(5)))
    side.request_finished(computed, list(range(5, 10)))
    assert pool.evicted == []


def test_without_the_block_pool_lossy_entries_are_recomputed_not_loaded(monkeypatch):
    side = scheduler(monkeypatch)
    assert side.block_pool is None  # a vLLM that never called bind_gpu_block_pool
    lossy, keep = request("lossy", 4, policy="quant:int4"), request("keep", 4)
    for req in (lossy, keep):
        side.get_num_new_matched_tokens(req, 0)
        _store_entries(side, req, 4)
    assert side.get_num_new_matched_tokens(lossy, 0)[0] == 0
    assert side.get_num_new_matched_tokens(keep, 0)[0] == 4 * TOKENS


def test_the_connector_hands_vllms_block_pool_to_its_scheduler_side(monkeypatch):
    side = scheduler(monkeypatch)
    pool = FakeBlockPool()
    conn.KvplugConnector.bind_gpu_block_pool(SimpleNamespace(scheduler_side=side), pool)
    assert side.block_pool is pool
