"""Dropped tokens are never attended: the backend's masked path over the paged cache
(attention_backends/dropped_attention.py).

The oracle compacts each kv head's kept tokens and runs plain causal attention over only those, so a path
that lets dropped (zeroed) slots take softmax mass fails these tests.
"""
from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest
import torch

from attention_backends import dropped_attention
from kvplug.dropped_tokens import DroppedTokenRegistry

HQ, HKV, D, BS, LAYERS = 6, 2, 16, 8, 3


def compact_reference(q, k_seq, v_seq, kept, scale):
    """q [n, Hq, d]; k/v_seq [S, Hkv, d]; kept [Hkv, S] -> [n, Hq, d], each head over its kept keys only."""
    n, S = q.shape[0], k_seq.shape[0]
    out = torch.empty(n, HQ, D)
    for h in range(HQ):
        g = h // (HQ // HKV)
        for i in range(n):
            pos = S - n + i
            idx = [p for p in range(pos + 1) if kept[g, p]]
            s = (k_seq[idx, g] @ q[i, h]) * scale
            out[i, h] = torch.softmax(s, 0) @ v_seq[idx, g]
    return out


def paged(seq_len, nblocks_total=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    kc = torch.randn(nblocks_total, HKV, BS, D, generator=g)
    vc = torch.randn(nblocks_total, HKV, BS, D, generator=g)
    blocks = torch.randperm(nblocks_total, generator=g)[:-(-seq_len // BS)]
    return kc, vc, blocks


def seq_of(cache, blocks, seq_len):
    return cache[blocks].permute(0, 2, 1, 3).reshape(-1, HKV, D)[:seq_len]


@pytest.mark.parametrize("n_query", [1, 5])
def test_masked_attention_equals_attention_over_kept_tokens_only(n_query):
    seq_len, scale = 29, 1 / math.sqrt(D)
    kc, vc, blocks = paged(seq_len)
    keep = torch.rand(len(blocks), HKV, BS, generator=torch.Generator().manual_seed(1)) > 0.5
    keep.view(-1, BS)[:, 0] = True  # every row keeps something
    # The query's own positions are fresh tokens: never dropped.
    flat = keep.permute(1, 0, 2).reshape(HKV, -1)
    flat[:, seq_len - n_query:seq_len] = True
    keep = flat.reshape(HKV, len(blocks), BS).permute(1, 0, 2).contiguous()
    kc[blocks] *= keep[..., None]  # dropped slots hold zeros, as the connector leaves them
    vc[blocks] *= keep[..., None]
    q = torch.randn(n_query, HQ, D, generator=torch.Generator().manual_seed(2))
    got = dropped_attention.masked_attention(q, kc, vc, blocks, keep, seq_len, scale)
    kept = keep.permute(1, 0, 2).reshape(HKV, -1)[:, :seq_len]
    want = compact_reference(q, seq_of(kc, blocks, seq_len), seq_of(vc, blocks, seq_len), kept, scale)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # Attending the zeroed slots instead (no mask) gives a different answer: the test can fail.
    unmasked = compact_reference(q, seq_of(kc, blocks, seq_len), seq_of(vc, blocks, seq_len),
                                 torch.ones_like(kept), scale)
    assert not torch.allclose(unmasked, want, atol=1e-3)


@dataclasses.dataclass
class FakeCommonMetadata:  # the fields subset_common_metadata and the plan read
    query_start_loc: torch.Tensor
    query_start_loc_cpu: torch.Tensor
    seq_lens: torch.Tensor
    block_table_tensor: torch.Tensor
    slot_mapping: torch.Tensor
    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int


def test_plan_masks_only_requests_reading_dropped_blocks_and_resolves_after_loads(monkeypatch):
    reg = DroppedTokenRegistry()
    monkeypatch.setattr(dropped_attention, "registry", lambda: reg)
    monkeypatch.setattr(dropped_attention.vllm_compat, "paged_kv_views",
                        lambda kv, layer: (kv[0], kv[1]))  # test cache: [2, blocks, Hkv, BS, D]
    seq = [20, 13]
    qlen = [4, 3]
    kc, vc, _ = paged(1, nblocks_total=10)
    table = torch.tensor([[3, 5, 7], [1, 2, 0]])
    qsl = torch.tensor([0, 4, 7])
    cam = FakeCommonMetadata(qsl, qsl, torch.tensor(seq), table, torch.arange(7), 2, 7, 4, 20)
    built = []
    plan = dropped_attention.DroppedTokenPlan(cam, lambda sub: built.append(sub) or "dense-meta")
    # The connector loads after metadata is built: the plan must see masks registered later.
    keep = torch.ones(2, LAYERS, HKV, BS, dtype=torch.bool)
    keep[:, 1, 0, 2:6] = False  # layer 1, kv head 0 dropped some tokens of blocks 3 and 5
    reg.set_loaded([3, 5], keep)
    for b in (3, 5):
        kc[b] *= keep[[3, 5].index(b), 1][..., None]
    batch = plan.resolve()
    assert batch is not None and batch.reqs == [0]
    assert built and built[0].num_reqs == 1 and batch.dense_rows.tolist() == [4, 5, 6]
    assert plan.resolve() is batch and reg.stats()["batches"] == 1  # once per batch

    q = torch.randn(7, HQ, D, generator=torch.Generator().manual_seed(3))
    out = torch.zeros(7, HQ, D)
    dense_calls = []

    def dense_forward(layer, query, key, value, kv_cache, metadata, rows_out):
        dense_calls.append((metadata, query.shape[0]))
        rows_out.fill_(7.0)

    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    dropped_attention.forward(dense_forward, layer, q, None, None, torch.stack([kc, vc]), batch, out, 0.25)
    assert dense_calls == [("dense-meta", 3)] and bool((out[4:] == 7.0).all())
    kept = torch.ones(HKV, 24, dtype=torch.bool)
    kept[0, 2:6] = False
    kept[0, 8 + 2:8 + 6] = False
    want = compact_reference(q[:4], seq_of(kc, table[0], 20), seq_of(vc, table[0], 20), kept[:, :20], 0.25)
    torch.testing.assert_close(out[:4], want, atol=1e-5, rtol=1e-4)


def test_plan_is_a_no_op_without_dropped_blocks(monkeypatch):
    reg = DroppedTokenRegistry()
    monkeypatch.setattr(dropped_attention, "registry", lambda: reg)
    qsl = torch.tensor([0, 1])
    cam = FakeCommonMetadata(qsl, qsl, torch.tensor([9]), torch.tensor([[4, 6]]), torch.arange(1), 1, 1, 1, 9)
    meta = SimpleNamespace()
    dropped_attention.plan(meta, cam, lambda sub: pytest.fail("no dense rebuild when nothing is masked"))
    assert dropped_attention.masked_batch_of(meta) is None
    reg.set_loaded([8], torch.zeros(1, LAYERS, HKV, BS, dtype=torch.bool))  # a block this batch does not read
    meta2 = SimpleNamespace()
    dropped_attention.plan(meta2, cam, lambda sub: pytest.fail("no dense rebuild"))
    assert dropped_attention.masked_batch_of(meta2) is None
    assert dropped_attention.masked_batch_of(None) is None
