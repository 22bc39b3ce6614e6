"""A step whose prefill chunk the cost model decides dense costs what the dense backend costs: the builder reads
nothing off the device (vLLM 0.26's Model Runner V2 batch: seq_lens on the device, host copies beside it),
attaches no plan and builds no second metadata; every layer's forward is the parent's, with the parent's
metadata, and no index or estimate work. (Issue 16: a 1K suffix on a 127K cached prefix, decided dense, took
247 ms vs FLASH_ATTN's 181 ms.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from attention_backends.sparse_prefill import backend_hooks, cost_model, planner, runner
from kvplug import settings, vllm_compat
from kvplug.compat import v0_26
from tests.attention_backends.sparse_prefill.test_cost_model import llama_decider
from tests.kvplug.test_vllm_compat import _Cam026


def _v2_batch(qlens: list[int], seq_lens: list[int]) -> _Cam026:
    """A Model Runner V2 batch of 0.26: every device field on the meta device, so any host read of one raises."""
    qsl = torch.tensor([0] + qlens).cumsum(0).to(torch.int32)
    n, tokens = len(qlens), int(qsl[-1])
    meta = lambda *shape: torch.empty(*shape, dtype=torch.int32, device="meta")  # noqa: E731
    return _Cam026(meta(n + 1), qsl, meta(n), n, tokens, max(qlens), max(seq_lens), meta(n, 8192), meta(tokens),
                   seq_lens_cpu_upper_bound=torch.tensor(seq_lens, dtype=torch.int32))


@pytest.fixture
def hook(monkeypatch):
    monkeypatch.setattr(vllm_compat, "selected", lambda: v0_26)
    monkeypatch.setattr(runner, "_PENDING_PAIRS", [])
    monkeypatch.setattr(runner, "_IN_FLIGHT", [])
    cfg = settings.resolve(sets=["sparse_prefill.enabled=true"], environ={}).sparse_prefill
    h = backend_hooks.BuilderHook(cfg)
    h._decider = llama_decider()  # Llama-3-8B on the shipped H100 table
    return h


def _no_dense_subset(_cam):
    raise AssertionError("a dense-decided batch needs no second dense metadata")


def test_suffix_on_a_long_cached_prefix_plans_nothing_and_reads_no_device_tensor(hook):
    before = cost_model.decisions_snapshot()
    attn_metadata = SimpleNamespace()
    # a 1K second-turn suffix on a 127K cached prefix, beside a decode
    hook.after_build(attn_metadata, _v2_batch([1024, 1], [131072, 9000]), _no_dense_subset)
    assert planner.plan_of(attn_metadata) is None
    after = cost_model.decisions_snapshot()
    assert after.get("dense/cost_model", 0) - before.get("dense/cost_model", 0) == 1
    assert after.get("sparse/cost_model", 0) == before.get("sparse/cost_model", 0)


def test_decode_only_batches_are_not_planned(hook, monkeypatch):
    monkeypatch.setattr(vllm_compat, "host_seq_lens", lambda cam: pytest.fail("a decode batch reads no lengths"))
    attn_metadata = SimpleNamespace()
    hook.after_build(attn_metadata, _v2_batch([1, 1, 1], [131072, 9000, 20]), _no_dense_subset)
    assert planner.plan_of(attn_metadata) is None


def test_sparse_chunks_are_still_planned_from_host_lengths(hook):
    """The same builder path does plan a chunk the table makes sparse (the test above is not vacuous)."""
    attn_metadata = SimpleNamespace()
    hook.after_build(attn_metadata, _v2_batch([16384], [131072]), _no_dense_subset)
    plan = planner.plan_of(attn_metadata)
    assert [(s.row_start, s.row_end, s.seq_len) for s in plan.segments] == [(0, 16384, 131072)]
    assert plan.dense_rows is None


def test_dense_decided_forward_is_the_parents_with_the_parents_metadata(monkeypatch):
    from attention_backends import kvplug_backend

    calls = []
    monkeypatch.setattr(kvplug_backend._DenseImpl, "forward", lambda self, *a, **kw: calls.append((a, kw)) or a[6])
    impl = object.__new__(kvplug_backend.KvplugAttentionImpl)
    impl._dropped_tokens, impl._retrieval_decode = False, None
    impl._sparse_prefill = SimpleNamespace(forward=lambda *a, **kw: pytest.fail("no sparse work on a dense step"))
    attn_metadata, output = SimpleNamespace(), torch.zeros(4, 2, 8)
    args = (SimpleNamespace(layer_name="model.layers.3.self_attn.attn"), torch.ones(4, 2, 8), torch.ones(4, 1, 8),
            torch.ones(4, 1, 8), torch.zeros(2, 1, 16, 16), attn_metadata, output)
    assert impl.forward(*args) is output
    assert len(calls) == 1 and calls[0][0] == args and calls[0][0][5] is attn_metadata
