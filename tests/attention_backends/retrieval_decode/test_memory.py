"""The block summaries live in memory reserved before vLLM sizes its KV cache (retrieval_decode/memory.py)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from attention_backends.retrieval_decode import memory, planner, runner
from attention_backends.retrieval_decode.summaries import BlockSummaries


@pytest.fixture(autouse=True)
def fresh_reservation():
    memory.reset_for_tests()
    yield
    memory.reset_for_tests()


@pytest.mark.parametrize("block_size,kv_bytes,summary_bytes", [(16, 2, 2), (32, 2, 4), (16, 1, 4)])
def test_reservation_holds_the_summaries_of_any_cache_vllm_can_size_from_what_is_left(block_size, kv_bytes,
                                                                                     summary_bytes):
    ratio = memory.summary_bytes_per_kv_byte(block_size, kv_bytes, summary_bytes)
    bound = 70 << 30
    r = memory.reservation_bytes(bound, ratio, explicit=False)
    largest_cache = bound - r  # vLLM sizes the cache from what is left after the reservation, or less
    assert largest_cache * ratio <= r
    assert r < bound * ratio  # and no more than the summaries of a cache of the whole bound


def test_explicit_cache_size_reserves_exactly_its_summaries():
    ratio = memory.summary_bytes_per_kv_byte(16, 2, 2)
    r = memory.reservation_bytes(1 << 30, ratio, explicit=True)
    assert (1 << 30) * ratio <= r <= (1 << 30) * ratio + 64 * memory.ALIGN


def test_reserve_once_carve_aligned_and_count_what_did_not_fit():
    first = memory.reserve(1 << 20, True, 1 / 16, "cpu")
    assert memory.reserve(1 << 30, True, 1 / 16, "cpu") is first  # once per process
    a, b = memory.carve(1000), memory.carve(1000)
    assert a.data_ptr() == first.buffer.data_ptr() and b.data_ptr() - a.data_ptr() == 1024  # offsets aligned
    assert memory.carve(first.buffer.numel()) is None
    snap = memory.snapshot()
    assert snap["reserved_layers"] == 2 and snap["unreserved_layers"] == 1 and snap["reserved_used_bytes"] == 2024


def test_summaries_built_in_given_storage_start_empty():
    n = BlockSummaries.nbytes(10, 2, 8, torch.float32)
    storage = torch.zeros(n, dtype=torch.uint8)
    s = BlockSummaries.allocate(10, 2, 8, 16, torch.float32, "cpu", storage=storage)
    assert s.kmin.shape == (11, 2, 8) and s.kmin.data_ptr() == storage.data_ptr()
    assert torch.isinf(s.kmin).all() and (s.kmin > 0).all() and (s.kmax < 0).all()


def _cpu_runner():
    cfg = SimpleNamespace(model_config=SimpleNamespace(dtype=torch.bfloat16),
                          cache_config=SimpleNamespace(block_size=16, cache_dtype="auto", kv_cache_memory_bytes=1 << 20,
                                                       gpu_memory_utilization=0.9))
    r = runner.RetrievalDecodeRunner.__new__(runner.RetrievalDecodeRunner)
    r.impl, r.summaries, r.layer_idx, r._vllm_config = SimpleNamespace(scale=1.0), None, None, cfg
    r.group_summaries = False
    r.cfg = None  # no retrieval_decode section: summaries only
    return r


def test_first_kv_write_carves_the_layers_summaries_from_the_reservation():
    r = _cpu_runner()
    r.reserve_summary_memory("cpu")
    reserved = memory.current().buffer
    assert reserved.numel() >= (1 << 20) * 4 / (16 * 2)  # float32 summaries of a bf16 cache
    kv_cache = torch.zeros(8, 2, 16, 2 * 4)  # CPU_ATTN layout [blocks, kv_heads, block_size, 2 * head_dim]
    r.after_kv_write(torch.randn(3, 2, 4), kv_cache, torch.tensor([0, 1, 17]))
    start, end = reserved.data_ptr(), reserved.data_ptr() + reserved.numel()
    assert start <= r.summaries.kmin.data_ptr() < r.summaries.kmax.data_ptr() < end
    assert memory.snapshot()["reserved_layers"] == 1


@pytest.mark.parametrize("with_fixed", [True, False])
def test_explicit_cache_reservation_holds_every_layers_padding_row(with_fixed):
    """vLLM 0.34 on the H100 (2026-12-07): an explicit 4.4 GiB cache of the Llama-3-8B shape at block size 64 left
    one of 32 layers' summaries outside the reservation: each layer's summaries have one row more than the cache
    has blocks, and the reservation counted only the KV bytes' ratio."""
    layers, kv_heads, head_dim, block, bound = 32, 8, 128, 64, int(4.4 * 2**30)
    block_bytes = layers * 2 * block * kv_heads * head_dim * 2  # K and V, bf16, every layer
    num_blocks = bound // block_bytes  # what vLLM sizes from the explicit bytes
    ratio = memory.summary_bytes_per_kv_byte(block, 2, 2)
    fixed = memory.fixed_summary_bytes(layers, BlockSummaries.nbytes(0, kv_heads, head_dim, torch.bfloat16))
    memory.reserve(bound, True, ratio, "cpu", fixed if with_fixed else 0)
    for _ in range(layers):
        memory.carve(BlockSummaries.nbytes(num_blocks, kv_heads, head_dim, torch.bfloat16))
    assert memory.snapshot()["unreserved_layers"] == (0 if with_fixed else 1)


def test_runner_reserves_the_padding_rows_from_the_models_geometry():
    r = _cpu_runner()
    r._vllm_config.model_config.get_num_layers = lambda pc: 4
    r._vllm_config.model_config.get_num_kv_heads = lambda pc: 2
    r._vllm_config.model_config.get_head_size = lambda: 8
    r._vllm_config.parallel_config = SimpleNamespace()
    r.reserve_summary_memory("cpu")
    with_rows = memory.current().buffer.numel()
    memory.reset_for_tests()
    _cpu_runner().reserve_summary_memory("cpu")  # no geometry: no padding rows
    assert with_rows - memory.current().buffer.numel() == memory.fixed_summary_bytes(
        4, BlockSummaries.nbytes(0, 2, 8, torch.float32))


def test_selection_reuse_stores_are_reserved_with_the_summaries_and_carved_from_them():
    """reselect_interval > 1 (the default): every layer's selection store ([decode capacity, kv heads, graph k]) is
    part of what is reserved before vLLM sizes its cache, and the store takes its bytes from there."""
    from attention_backends.retrieval_decode import reuse
    from attention_backends.retrieval_decode.config import RetrievalDecodeConfig

    def runner_with(interval):
        r = _cpu_runner()
        mc = r._vllm_config.model_config
        mc.get_num_layers, mc.get_num_kv_heads, mc.get_head_size = (lambda pc: 4), (lambda pc: 2), (lambda: 8)
        mc.max_model_len = 4096
        r._vllm_config.parallel_config = SimpleNamespace()
        r._vllm_config.scheduler_config = SimpleNamespace(max_num_seqs=8)
        r._vllm_config.compilation_config = SimpleNamespace(max_cudagraph_capture_size=16)
        r.cfg = RetrievalDecodeConfig(enabled=True, budget_fraction=0.1, reselect_interval=interval)
        return r

    runner_with(1).reserve_summary_memory("cpu")
    without = memory.current().buffer.numel()
    memory.reset_for_tests()
    runner_with(4).reserve_summary_memory("cpu")
    with_stores = memory.current().buffer.numel()
    params = planner.RetrievalParams.from_config(runner_with(4).cfg, 16)
    slots = min(planner.graph_k(params, 4096), 4096 // 16)
    planned = memory.selection_store_bytes(4, 16, 2, slots, 8)  # capacity 16: the graphs' largest batch
    assert with_stores - without == planned > 0 and memory.snapshot()["reserved_for_stores_bytes"] == planned
    store = reuse.SelectionStore().get(16, 2, slots, torch.device("cpu"), torch.int64)
    reserved = memory.current().buffer
    assert reserved.data_ptr() <= store.data_ptr() < reserved.data_ptr() + reserved.numel()
    assert (store == 0).all() and memory.snapshot()["reserved_store_bytes"] == store.numel() * 8
