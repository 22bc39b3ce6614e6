"""The Triton kernels vs the torch reference, under TRITON_INTERPRET=1 on CPU (CI) or on a GPU when there is one.

The interpreter only works if triton is first imported with TRITON_INTERPRET=1 (a triton imported earlier in
the session, e.g. by vLLM, cannot be switched or reloaded). So on CPU, when triton is already loaded, the
tests of this file run in a fresh interpreter subprocess instead (``test_in_fresh_interpreter``).
"""
import os
import subprocess
import sys

import pytest
import torch

_FRESH_TRITON = "triton" not in sys.modules
_INTERPRETED = not torch.cuda.is_available()
if _INTERPRETED and _FRESH_TRITON:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton", reason="triton is not installed in this environment")

from attention_backends.retrieval_decode.reference import selected_block_attention  # noqa: E402
from attention_backends.retrieval_decode.selection import select_for_queries  # noqa: E402
from tests.attention_backends.retrieval_decode.helpers import make_case  # noqa: E402

IN_PROCESS = not _INTERPRETED or _FRESH_TRITON
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was loaded before TRITON_INTERPRET=1; "
                                                       "test_in_fresh_interpreter runs these in a subprocess")


@pytest.mark.skipif(IN_PROCESS, reason="the kernels run in this process")
def test_in_fresh_interpreter():
    from tests.conftest import REPO

    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    # Everything but this test itself ran (and passed) in the child.
    assert "failed" not in summary and "1 skipped" in summary and " passed" in summary, summary


if IN_PROCESS:
    from attention_backends.retrieval_decode import triton_kernels  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(seq_lens, hkv, group, d, bs, budgets, k, dtype, layout):
    case = make_case(seq_lens=seq_lens, hkv=hkv, group=group, d=d, bs=bs, num_blocks=64)
    nb = (case.seq_lens + bs - 1) // bs
    sel = select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table, nb,
                             torch.tensor(budgets), k, 1, 1)
    phys = torch.gather(case.block_table.long().unsqueeze(1).expand(-1, hkv, -1), 2, sel.blocks)
    kc, vc = case.key_cache.to(dtype), case.value_cache.to(dtype)
    if layout == "flash":  # FlashAttention: [2, blocks, block_size, heads, D] viewed as [blocks, heads, bs, D]
        both = torch.stack([kc.permute(0, 2, 1, 3), vc.permute(0, 2, 1, 3)]).contiguous()
        kview, vview = both[0].permute(0, 2, 1, 3), both[1].permute(0, 2, 1, 3)
    else:
        kview, vview = kc, vc
    return case, sel, phys, kc, vc, kview, vview


@in_process
@pytest.mark.parametrize("layout", ["flash", "head_major"])
@pytest.mark.parametrize("splits", [1, 3])
def test_kernel_matches_reference(layout, splits):
    dtype = torch.float32
    case, sel, phys, kc, vc, kview, vview = _inputs((200, 97, 150), 2, 3, 16, 16, [5, 7, 4], 7, dtype, layout)
    want = selected_block_attention(case.q, kc, vc, case.block_table, case.seq_lens, sel, 0.3)
    got = triton_kernels.selected_block_decode_views(
        case.q.to(DEV), kview.to(DEV), vview.to(DEV), phys.to(DEV), sel.valid.to(DEV), case.seq_lens.to(DEV),
        sel.blocks.to(DEV), 0.3, num_splits=splits, tile_blocks=2)
    torch.testing.assert_close(got.cpu(), want, rtol=2e-4, atol=2e-4)


@in_process
def test_kernel_bf16_and_all_blocks_is_dense():
    dtype = torch.bfloat16
    case, sel, phys, kc, vc, kview, vview = _inputs((130, 64), 1, 4, 32, 16, [9, 9], 9, dtype, "flash")
    assert sel.valid.sum().item() == 9 + 4  # every block of both sequences
    want = selected_block_attention(case.q.to(dtype), kc, vc, case.block_table, case.seq_lens, sel, 0.2)
    got = triton_kernels.selected_block_decode_views(
        case.q.to(dtype).to(DEV), kview.to(DEV), vview.to(DEV), phys.to(DEV), sel.valid.to(DEV),
        case.seq_lens.to(DEV), sel.blocks.to(DEV), 0.2, num_splits=2, tile_blocks=1)
    torch.testing.assert_close(got.float().cpu(), want.float(), rtol=2e-2, atol=2e-2)


@in_process
@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_score_kernel_matches_torch_scores(reduce):
    from attention_backends.retrieval_decode.selection import gather_summaries, quest_scores

    case = make_case(seq_lens=(300, 517), hkv=2, group=3, d=16, bs=16, num_blocks=64)
    s = case.summaries
    smin, smax = gather_summaries(s.kmin, s.kmax, case.block_table)
    want = quest_scores(case.q.view(2, 2, 3, 16), smin, smax, reduce)
    got = triton_kernels.quest_scores_paged(case.q.to(DEV), s.kmin.to(DEV), s.kmax.to(DEV),
                                            case.block_table.to(DEV), reduce, tile=16).cpu()
    nb = (case.seq_lens + 15) // 16
    for i in range(2):  # compare the sequence's own blocks (entries beyond are masked by the selection)
        torch.testing.assert_close(got[i, :, :nb[i]], want[i, :, :nb[i]], rtol=1e-4, atol=1e-4)


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("budget_fraction", [0.0, 0.3])
def test_fused_decode_step_matches_torch_path(dtype, budget_fraction):
    """The CUDA-graph decode step (masked scores -> top-k -> attention -> merge, budgets from seq_lens inside
    the kernels) equals the torch selection + reference attention; a short sequence reads everything."""
    from attention_backends.retrieval_decode import planner
    from attention_backends.retrieval_decode.reference import dense_decode_attention

    bs = 16
    case = make_case(seq_lens=(700, 333, 90, 512), hkv=2, group=4, d=32, bs=bs, num_blocks=128)
    params = planner.RetrievalParams(block_size=bs, budget_tokens=96, budget_fraction=budget_fraction,
                                     sink_blocks=1, recent_tokens=20, min_context_tokens=128)
    k = planner.graph_k(params, 720)
    nb, budget = planner.device_budgets(params, case.seq_lens)
    sel = select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table, nb, budget, k,
                             params.sink_blocks, params.recent_blocks)
    q, kc, vc = case.q.to(dtype), case.key_cache.to(dtype), case.value_cache.to(dtype)
    want = selected_block_attention(q, kc, vc, case.block_table, case.seq_lens, sel, 0.2).float()
    dense = dense_decode_attention(q, kc, vc, case.block_table, case.seq_lens, 0.2).float()
    both = torch.stack([kc.permute(0, 2, 1, 3), vc.permute(0, 2, 1, 3)]).contiguous().to(DEV)  # flash layout
    out = torch.full((4, 8, 32), 7.0, dtype=dtype, device=DEV)
    got = triton_kernels.retrieval_decode(q.to(DEV), both[0].permute(0, 2, 1, 3), both[1].permute(0, 2, 1, 3),
                                          case.summaries.kmin.to(DEV), case.summaries.kmax.to(DEV),
                                          case.block_table.to(DEV), case.seq_lens.to(DEV), params, k, 0.2,
                                          out=out, num_splits=3, tile_blocks=2)
    assert got.data_ptr() == out.data_ptr()
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got.float().cpu()[2], dense[2], rtol=tol, atol=tol)  # 90 tokens < min_context
    assert (got.float().cpu()[0] - dense[0]).abs().max() > 0.1  # the long one really is sparse
