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


def _flash_views(kc, vc):
    """FlashAttention's [2, blocks, block_size, heads, D] cache, viewed as [blocks, heads, block_size, D]."""
    both = torch.stack([kc.permute(0, 2, 1, 3), vc.permute(0, 2, 1, 3)]).contiguous().to(DEV)
    return both[0].permute(0, 2, 1, 3), both[1].permute(0, 2, 1, 3)


@in_process
def test_everything_dense_when_min_context_covers_all():
    """Sequences below min_context read all their blocks through the same kernels: exactly dense attention
    (bf16, GQA group of 4, a padded row with seq_len 0 comes out as zeros)."""
    from attention_backends.retrieval_decode import planner
    from attention_backends.retrieval_decode.reference import dense_decode_attention

    dtype = torch.bfloat16
    case = make_case(seq_lens=(130, 64, 1), hkv=1, group=4, d=32, bs=16, num_blocks=32)
    params = planner.RetrievalParams(block_size=16, budget_tokens=16, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=1, min_context_tokens=10_000)
    q, kc, vc = case.q.to(dtype), case.key_cache.to(dtype), case.value_cache.to(dtype)
    want = dense_decode_attention(q, kc, vc, case.block_table, case.seq_lens, 0.2).float()
    kview, vview = _flash_views(kc, vc)
    seq = case.seq_lens.clone()
    seq[2] = 0  # a CUDA-graph padding row
    got = triton_kernels.retrieval_decode(q.to(DEV), kview, vview, case.summaries.kmin.to(DEV),
                                          case.summaries.kmax.to(DEV), case.block_table.to(DEV), seq.to(DEV),
                                          params, k=case.block_table.shape[1], scale=0.2, num_splits=2,
                                          tile_blocks=1).float().cpu()
    torch.testing.assert_close(got[:2], want[:2], rtol=2e-2, atol=2e-2)
    assert torch.equal(got[2], torch.zeros_like(got[2]))


@in_process
@pytest.mark.parametrize("dtype, budget_fraction", [(torch.float32, 0.0), (torch.bfloat16, 0.3)])
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
    kview, vview = _flash_views(kc, vc)
    out = torch.full((4, 8, 32), 7.0, dtype=dtype, device=DEV)
    got = triton_kernels.retrieval_decode(q.to(DEV), kview, vview,
                                          case.summaries.kmin.to(DEV), case.summaries.kmax.to(DEV),
                                          case.block_table.to(DEV), case.seq_lens.to(DEV), params, k, 0.2,
                                          out=out, num_splits=3, tile_blocks=2)
    assert got.data_ptr() == out.data_ptr()
    tol = 2e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float().cpu(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got.float().cpu()[2], dense[2], rtol=tol, atol=tol)  # 90 tokens < min_context
    assert (got.float().cpu()[0] - dense[0]).abs().max() > 0.1  # the long one really is sparse


@in_process
@pytest.mark.parametrize("physical", ["NHD", "HND"])
def test_fused_step_on_vllm_flash_packed_kv_layout(physical):
    """vLLM 0.26+ FlashAttention cache: logical [blocks, kv_heads, block_size, 2*D] with K|V packed in the last
    dim, stored token-major (NHD) or head-major (HND); read through vllm_compat's views (strided, no copy)."""
    from attention_backends.retrieval_decode import planner
    from kvplug import vllm_compat

    bs, hkv, d = 16, 2, 32
    case = make_case(seq_lens=(400, 250), hkv=hkv, group=2, d=d, bs=bs, num_blocks=64)
    packed = torch.cat([case.key_cache, case.value_cache], dim=-1)  # [blocks, H, bs, 2D]
    if physical == "NHD":
        kv_cache = packed.permute(0, 2, 1, 3).contiguous().to(DEV).permute(0, 2, 1, 3)
    else:
        kv_cache = packed.contiguous().to(DEV)
    assert vllm_compat.paged_kv_geometry(kv_cache) == (64, hkv, bs, d)
    kview, vview = vllm_compat._flash_kv_views(kv_cache)
    params = planner.RetrievalParams(block_size=bs, budget_tokens=64, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=16, min_context_tokens=64)
    k = planner.graph_k(params, 512)
    nb, budget = planner.device_budgets(params, case.seq_lens)
    sel = select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table, nb, budget, k,
                             params.sink_blocks, params.recent_blocks)
    want = selected_block_attention(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, sel,
                                    0.2)
    got = triton_kernels.retrieval_decode(case.q.to(DEV), kview, vview, case.summaries.kmin.to(DEV),
                                          case.summaries.kmax.to(DEV), case.block_table.to(DEV),
                                          case.seq_lens.to(DEV), params, k, 0.2, num_splits=2, tile_blocks=2)
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-4, atol=2e-4)


def _reference_selection(scores: torch.Tensor, budgets: torch.Tensor, nb: torch.Tensor) -> list[list[set]]:
    """Per (sequence, kv-head): the budget best columns < nb (ties: the lower column first)."""
    out = []
    for n in range(scores.shape[0]):
        rows = []
        for h in range(scores.shape[1]):
            s = scores[n, h, :int(nb[n])].tolist()
            order = sorted(range(len(s)), key=lambda i: (-s[i], i))
            rows.append(set(order[:int(budgets[n])]))
        out.append(rows)
    return out


@in_process
@pytest.mark.parametrize("early_exit,select", [(True, "bisect"), (False, "bisect"), (False, "radix")])
def test_select_kernel_takes_each_sequences_budget_of_best_blocks(early_exit, select, monkeypatch):
    """The top-k: exactly budget blocks per (sequence, kv-head), the best ones (forced +inf first,
    ties broken towards the lower block, never a column past the sequence), ascending in the slots; a padding
    row (seq_len 0) selects nothing; columns past a sequence may hold garbage (they are never read). Bisection
    with and without its early exit, and the radix (histogram) select."""
    from attention_backends.retrieval_decode import planner

    monkeypatch.setattr(triton_kernels, "SELECT_EARLY_EXIT", early_exit)

    bs, width = 16, 70
    seq_lens = torch.tensor([1000, 300, 0, 64, 1100])
    params = planner.RetrievalParams(block_size=bs, budget_tokens=160, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=20, min_context_tokens=128, select=select)
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 2, width, generator=g)
    scores[0, 0, :] = -5.0
    scores[0, 0, 30:33] = 1.0
    scores[0, 0, 10:20] = 0.5  # ties straddling the threshold: 4 forced + 3 + 3 of these 10
    scores[0, 1, :] = -1e30  # every block empty (unknown): still the budget, lowest blocks first
    scores[1, :, 5] = float("inf")
    scores[4, 0, 3] = -0.0
    scores[4, 0, 4] = 0.0
    nb = (seq_lens + bs - 1) // bs
    for n in range(5):  # what the score kernel writes: forced blocks +inf, short sequences all forced
        scores[n, :, :1] = float("inf")
        scores[n, :, max(int(nb[n]) - params.recent_blocks, 0):int(nb[n])] = float("inf")
        if seq_lens[n] < params.min_context_tokens:
            scores[n, :, :int(nb[n])] = float("inf")
        scores[n, :, int(nb[n]):] = float("nan")  # unwritten columns: whatever was in memory
    k = planner.graph_k(params, 1100)
    _, budgets = planner.device_budgets(params, seq_lens)
    got = triton_kernels.select_top_blocks(scores.to(DEV), seq_lens.to(DEV), params, k).cpu()
    want = _reference_selection(torch.nan_to_num(scores, nan=-float("inf")), budgets, nb)
    for n in range(5):
        for h in range(2):
            b = int(budgets[n])
            picked = got[n, h, :b].tolist()
            assert picked == sorted(picked), (n, h, picked)
            assert set(picked) == want[n][h], (n, h, sorted(picked), sorted(want[n][h]))
    assert int(budgets[2]) == 0 and int(budgets[3]) == int(nb[3])  # padding row; short row reads everything


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_summary_update_kernel_matches_torch_update(dtype):
    """One-launch summary update == summaries.update_summaries_: prefill chunks spanning blocks, a chunk that
    continues a partly filled block, decode tokens, a freed-and-reused block (offset 0 resets it), padded
    tokens (slot -1 and key rows past slot_mapping), keys as a strided view of a fused qkv tensor."""
    from attention_backends.retrieval_decode.summaries import BlockSummaries, update_summaries_

    bs, hkv, d = 4, 2, 16
    g = torch.Generator().manual_seed(1)
    steps = [
        torch.tensor([8, 9, 10, 11, 12, 13, 20, 21, 22]),  # two prefill chunks: blocks 2-3 and 5
        torch.tensor([14, 23, 4, -1, -1]),  # chunk continues block 3, block 5, a new block 1; padding
        torch.tensor([15, 24, 5]),  # decode: block 3 fills up, block 6 starts, block 1 continues
        torch.tensor([8, 9, 28, -1]),  # block 2 freed and reused by a new request; block 7
    ]
    ours = BlockSummaries.allocate(8, hkv, d, bs, dtype=dtype, device=DEV, groups=True)
    ref = BlockSummaries.allocate(8, hkv, d, bs, dtype=dtype, groups=True)
    for s in (ours, ref):  # group rows (two-level) keyed by every block: emptied only where a block starts fresh
        s.gmax.fill_(1.0)
    for slots in steps:
        t = slots.numel() + 2  # vLLM pads the token dim beyond slot_mapping
        qkv = torch.randn(t, 3 * hkv * d, generator=g).to(dtype)
        key = qkv[:, hkv * d:2 * hkv * d].view(t, hkv, d)  # a strided view, like vLLM's key
        triton_kernels.update_summaries(ours.kmin, ours.kmax, key.to(DEV), slots.to(DEV), bs, ours.gmax)
        update_summaries_(ref.kmin, ref.kmax, key, slots, bs, ref.gmax)
        # the trash row of the torch path absorbs padding; the kernel skips padded tokens
        torch.testing.assert_close(ours.kmin[:-1].cpu(), ref.kmin[:-1], rtol=0, atol=0)
        torch.testing.assert_close(ours.kmax[:-1].cpu(), ref.kmax[:-1], rtol=0, atol=0)
        torch.testing.assert_close(ours.gmax[:-1].cpu(), ref.gmax[:-1], rtol=0, atol=0)
    emptied = (ref.gmax[:-1, 0, 0] == float("-inf")).nonzero().flatten().tolist()
    assert emptied == [1, 2, 3, 5, 6, 7]  # every block some write started at offset 0; 0 and 4 never written


def _flash_cache(blocks, bs, hkv, d, dtype, memory, guard):
    """vLLM 0.26's FlashAttention cache of one layer: logical [blocks, kv_heads, block_size, 2*head_dim]
    (get_kv_cache_shape), NHD memory [blocks, block_size, kv_heads, 2*head_dim] or HND (get_kv_cache_stride_order),
    inside a buffer with ``guard`` blocks either side (a write to slot -1 would land in the first)."""
    g = torch.Generator().manual_seed(5)
    if memory == "NHD":
        buf = torch.randn(blocks + 2 * guard, bs, hkv, 2 * d, generator=g).to(dtype).to(DEV)
        return buf, buf[guard:guard + blocks].permute(0, 2, 1, 3)
    buf = torch.randn(blocks + 2 * guard, hkv, bs, 2 * d, generator=g).to(dtype).to(DEV)
    return buf, buf[guard:guard + blocks]


@in_process
@pytest.mark.parametrize("memory", ["NHD", "HND"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_kv_write_equals_the_dense_write_then_the_summary_update(memory, dtype):
    """triton_kernels.write_kv (one launch) leaves the paged cache, byte for byte, and the summaries exactly as
    the two-step path: the torch reference (reshape_and_cache_flash's copy, then update_summaries_) and the two
    Triton launches (the write alone, then update_summaries). Slots -1 write nothing (the guard blocks stay);
    key/value rows past slot_mapping are ignored; keys and values are strided views of a fused qkv tensor."""
    from attention_backends.retrieval_decode.summaries import BlockSummaries, write_kv_and_update_summaries_
    from kvplug.compat.common import flash_plain_kv_write_views

    bs, hkv, d, blocks = 4, 2, 16, 8
    g = torch.Generator().manual_seed(2)
    steps = [
        torch.tensor([8, 9, 10, 11, 12, 13, 20, 21, 22]),  # two prefill chunks: blocks 2-3 and 5
        torch.tensor([14, 23, 4, -1, -1]),  # chunk continues block 3, block 5, a new block 1; padding
        torch.tensor([15, 24, 5]),  # decode: block 3 fills up, block 6 starts, block 1 continues
        torch.tensor([-1, 8, 9, 28, -1]),  # padding first; block 2 freed and reused by a new request; block 7
    ]
    paths = {}
    for name in ("fused", "two_launches", "torch"):
        buf, kv_cache = _flash_cache(blocks, bs, hkv, d, dtype, memory, guard=1)
        views = flash_plain_kv_write_views(kv_cache, kv_cache, kv_cache, "auto", "decoder", d)
        summ = BlockSummaries.allocate(blocks, hkv, d, bs, dtype=dtype, device=DEV if name != "torch" else "cpu",
                                       groups=True)
        summ.gmax.fill_(1.0)  # group rows: emptied only where a block starts fresh
        paths[name] = (buf, views, summ)
    for slots in steps:
        t = slots.numel() + 2  # vLLM pads the token dim beyond slot_mapping
        qkv = torch.randn(t, 3 * hkv * d, generator=g).to(dtype)
        key = qkv[:, hkv * d:2 * hkv * d].view(t, hkv, d)
        value = qkv[:, 2 * hkv * d:].view(t, hkv, d)
        buf, (kc, vc), summ = paths["fused"]
        triton_kernels.write_kv(key.to(DEV), value.to(DEV), kc, vc, slots.to(DEV), summ.kmin, summ.kmax, summ.gmax)
        buf, (kc, vc), summ = paths["two_launches"]
        triton_kernels.write_kv(key.to(DEV), value.to(DEV), kc, vc, slots.to(DEV))
        triton_kernels.update_summaries(summ.kmin, summ.kmax, key.to(DEV), slots.to(DEV), bs, summ.gmax)
        buf, (kc, vc), summ = paths["torch"]
        kc_cpu, vc_cpu = kc.cpu(), vc.cpu()  # (DEV is the CPU under the interpreter: the same tensors)
        write_kv_and_update_summaries_(key, value, kc_cpu, vc_cpu, slots, summ.kmin, summ.kmax, bs, summ.gmax)
        kc.copy_(kc_cpu)
        vc.copy_(vc_cpu)
        want_buf, _, want = paths["torch"]
        for name in ("fused", "two_launches"):
            buf, _, summ = paths[name]
            assert torch.equal(buf.cpu().view(torch.int16), want_buf.cpu().view(torch.int16)), (name, slots)
            for field in ("kmin", "kmax", "gmax"):
                assert torch.equal(getattr(summ, field)[:-1].cpu(), getattr(want, field)[:-1]), (name, field, slots)
    fresh_buf, _ = _flash_cache(blocks, bs, hkv, d, dtype, memory, guard=1)
    assert torch.equal(paths["fused"][0][0].cpu(), fresh_buf[0].cpu())  # the guard before the cache: untouched
    assert not torch.equal(paths["fused"][0][3].cpu(), fresh_buf[3].cpu())  # block 2 (buffer row 3) was written


@in_process
def test_fused_kv_write_refuses_a_cache_of_another_dtype():
    """The fused write copies bytes: an fp8-style cache (another dtype than the keys) is refused, never cast."""
    key = torch.randn(2, 2, 16, dtype=torch.bfloat16, device=DEV)
    cache = torch.zeros(4, 2, 4, 16, dtype=torch.float16, device=DEV)
    with pytest.raises(ValueError, match="copies bytes"):
        triton_kernels.write_kv(key, key, cache, cache, torch.tensor([0, 1], device=DEV))


@in_process
def test_fused_step_ignores_table_columns_past_each_sequence():
    """Under CUDA graphs the block table is as wide as max_model_len: the step on a table padded with junk
    columns (and junk scores memory) equals the step on the tight table."""
    from attention_backends.retrieval_decode import planner

    bs = 16
    case = make_case(seq_lens=(700, 200), hkv=2, group=4, d=32, bs=bs, num_blocks=128)
    params = planner.RetrievalParams(block_size=bs, budget_tokens=128, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=20, min_context_tokens=64)
    k = planner.graph_k(params, 4096)
    wide = torch.cat([case.block_table, torch.randint(0, 128, (2, 200), dtype=torch.int32)], dim=1)
    kview, vview = _flash_views(case.key_cache, case.value_cache)
    outs = [triton_kernels.retrieval_decode(case.q.to(DEV), kview, vview, case.summaries.kmin.to(DEV),
                                            case.summaries.kmax.to(DEV), table.to(DEV), case.seq_lens.to(DEV),
                                            params, k, 0.2).cpu() for table in (case.block_table, wide)]
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)


@in_process
def test_kernel_bench_runs_and_checks_itself(tmp_path, monkeypatch):
    """benchmarks.kernels.retrieval_decode_bench end to end at tiny shapes (on CPU: interpreter, no graphs):
    every stage runs, the step equals the torch reference on a table wider than the sequences, JSON written."""
    import json

    from benchmarks.kernels import retrieval_decode_bench as bench
    from attention_backends.retrieval_decode.config import RetrievalDecodeConfig

    defaults = RetrievalDecodeConfig()
    assert bench.CONFIG_DEFAULTS == {key: getattr(defaults, key) for key in bench.CONFIG_DEFAULTS}
    monkeypatch.setattr(bench, "HQ", 4)
    monkeypatch.setattr(bench, "HKV", 2)
    monkeypatch.setattr(bench, "D", 32)
    monkeypatch.setattr(bench, "WRITE_GRAPH_LAYERS", 3)
    monkeypatch.setattr(bench, "PREFILL_CHUNK_TOKENS", 40)
    out = tmp_path / "rd.json"
    table = tmp_path / "break_even.json"
    monkeypatch.setattr(bench.break_even, "TABLE_PATH", table)
    write = bench.break_even.write
    monkeypatch.setattr(bench.break_even, "write", lambda *a, **kw: write(*a, **kw, path=table))
    assert bench.main(["--configs", "2x4200", "--budget", "512", "--table-width", "300", "--layers", "1",
                       "--break-even-contexts", "1024,4200", "--write-break-even", "--out", str(out),
                       "--allow-cpu"]) == 0
    result = json.loads(out.read_text())
    row = result["rows"][0]
    all_variants = bench.VARIANTS + bench.REUSE_VARIANTS + bench.WRITE_VARIANTS
    for name in all_variants:  # every variant ran, checked against its torch reference
        v = row["variants"][name]
        assert "error" not in v, (name, v)
        assert v["per_layer_ms"] > 0 and v["max_err_vs_torch_reference"] < 3e-2, (name, v)
    for name, n in (("reuse4", 4), ("reuse8", 8)):  # both steps timed, averaged over the interval
        v = row["variants"][name]
        assert v["reselect_interval"] == n and v["reuse_max_err_vs_torch_reference"] < 3e-2
        assert v["per_layer_ms"] == pytest.approx((v["reselect_step_per_layer_ms"]
                                                   + (n - 1) * v["reuse_step_per_layer_ms"]) / n)
    assert 0.3 < row["variants"]["two_level"]["blocks_shared_with_single"] <= 1.0
    assert row["variants"]["two_level_fused"]["fused_update"] is True
    sweep = result["break_even"]
    assert [r["context"] for r in sweep["rows"]] == [1024, 4200]
    assert set(sweep["crossover_tokens"]) == set(all_variants)
    # the fused KV write: the same bytes as the two launches, timed with and without the step, decode and prefill
    fused = row["variants"]["fused_kv_write"]
    assert fused["cache_bytes_equal"] is True and fused["summaries_equal"] is True, fused
    assert fused["dense_write"].endswith("(stand-in)") and fused["write_graph_layers"] == 3
    for key in ("write_two_launch_ms", "write_fused_ms", "write_alone_ms", "two_launch_per_layer_ms",
                "prefill_write_two_launch_ms", "prefill_write_fused_ms"):
        assert fused[key] > 0, key
    assert fused["speedup_vs_single"] == pytest.approx(fused["two_launch_per_layer_ms"] / fused["per_layer_ms"])
    assert all(r["fused_kv_write_dense_with_write"] > 0 for r in sweep["rows"])
    # the read-all cost a pure-decode graph pays under min_context, timed beside dense at every context
    assert all(r["single_read_all"] > 0 for r in sweep["rows"]), sweep["rows"]
    # ... and through the graph's dense path: the dense kernel's rows survive the empty retrieval launches
    assert all(r["dense_path_ms"] > 0 and r["dense_path_empty_retrieval_ms"] > 0 and r["dense_path_rows_kept"]
               for r in sweep["rows"]), sweep["rows"]
    assert sweep["rows"][0]["dense_path_k_slots"] == 512 // 16  # the budget's slots, not min_context's 256
    # On the interpreter sparse never beats SDPA: each variant is recorded as dense past the longest context.
    stored = json.loads(table.read_text())["devices"]["cpu"]
    assert stored["group_blocks=1"]["context_tokens"] == 4201 and stored["group_blocks=4"]["variant"] == "two_level"
    assert stored["group_blocks=1,select=radix"]["variant"] == "single_radix" and len(stored) == 3  # no fused
    assert row["table_width"] == 300 and row["k_slots"] == 256  # min_context 4096 -> 256 slots
    assert row["max_err_vs_torch_reference"] < 3e-2
    assert row["select_early_exit"] is True and row["select_early_exit_same_blocks"] is True
    for key in ("score_ms", "select_ms", "select_32_halvings_ms", "torch_topk_ms", "attend_merge_ms",
                "summary_update_ms", "per_layer_ms"):
        assert row[key] > 0, key


@in_process
def test_select_falls_back_when_the_early_exit_kernel_does_not_compile(monkeypatch):
    """A compiler that rejects the early-exit variant costs speed, not the engine: the first call warns, and
    this and every later call run the fixed bisection (same blocks)."""
    from attention_backends.retrieval_decode import planner

    real = triton_kernels._select_kernel

    class Rejecting:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                if kwargs["EARLY_EXIT"]:
                    raise RuntimeError("PassManager::run failed")
                return real[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(triton_kernels, "_select_kernel", Rejecting())
    monkeypatch.setattr(triton_kernels, "SELECT_EARLY_EXIT", True)
    params = planner.RetrievalParams(block_size=16, budget_tokens=64, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=16, min_context_tokens=0)
    scores = torch.arange(40, dtype=torch.float32).view(1, 1, 40)
    with pytest.warns(RuntimeWarning, match="early exit failed to compile"):
        got = triton_kernels.select_top_blocks(scores.to(DEV), torch.tensor([640]).to(DEV), params, k=4)
    assert got[0, 0].tolist() == [36, 37, 38, 39] and triton_kernels.SELECT_EARLY_EXIT is False


@in_process
def test_select_kernel_on_a_table_wider_than_16k_columns_of_ties():
    """Tables past 16384 columns (max_model_len > 256K tokens) scan ties in int64: 20000 equal scores still
    give exactly the budget, the forced blocks plus the lowest tied ones."""
    from attention_backends.retrieval_decode import planner

    bs, width = 16, 20000
    params = planner.RetrievalParams(block_size=bs, budget_tokens=160, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=20, min_context_tokens=128)
    seq_lens = torch.tensor([width * bs])
    scores = torch.zeros(1, 1, width)
    scores[0, 0, 0] = float("inf")
    scores[0, 0, -params.recent_blocks:] = float("inf")
    got = triton_kernels.select_top_blocks(scores.to(DEV), seq_lens.to(DEV), params, k=10).cpu()
    assert got[0, 0].tolist() == [0, 1, 2, 3, 4, 5, 6, width - 3, width - 2, width - 1]


def _grouped(case, dtype=torch.float32):
    """The case's block summaries in a BlockSummaries with (empty) group rows, on DEV."""
    from attention_backends.retrieval_decode.summaries import BlockSummaries

    nb, hkv, d = case.summaries.num_blocks, case.summaries.kmin.shape[1], case.summaries.kmin.shape[2]
    summ = BlockSummaries.allocate(nb, hkv, d, case.summaries.block_size, dtype, DEV, groups=True)
    summ.kmin.copy_(case.summaries.kmin.to(dtype))
    summ.kmax.copy_(case.summaries.kmax.to(dtype))
    return summ


@in_process
@pytest.mark.parametrize("budget_tokens,budget_fraction,refine,select", [
    (320, 0.0, 2.0, "bisect"), (0, 0.15, 1.0, "bisect"), (200, 0.0, 3.0, "bisect"), (320, 0.0, 2.0, "radix")])
def test_two_level_kernels_pick_what_the_torch_two_level_selection_picks(budget_tokens, budget_fraction, refine,
                                                                          select):
    """Group scores + refine-select == selection.select_for_queries(group_blocks=4): exactly each sequence's
    budget of blocks, ascending, on a table wider than the sequences, with a padding row (seq_len 0) and a row
    below min_context (reads every block); the second call (group rows filled by the first) picks the same, and
    the filled rows are the min / max of their blocks' summaries (keyed by the group's last block)."""
    from attention_backends.retrieval_decode import planner
    from attention_backends.retrieval_decode.selection import gather_summaries, group_summaries

    bs = 16
    case = make_case(seq_lens=(1600, 900, 100, 0, 1333), hkv=2, group=3, d=16, bs=bs, num_blocks=320)
    wide = torch.cat([case.block_table, torch.randint(0, 320, (5, 40), dtype=torch.int32)], dim=1)
    params = planner.RetrievalParams(block_size=bs, budget_tokens=max(budget_tokens, 1), budget_fraction=budget_fraction,
                                     sink_blocks=1, recent_tokens=64, min_context_tokens=128, group_blocks=4,
                                     group_refine=refine, select=select)
    nb, budget = planner.device_budgets(params, case.seq_lens)
    k = planner.graph_k(params, wide.shape[1] * bs)
    want = select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, wide, nb, budget, k,
                              params.sink_blocks, params.recent_blocks, "max", 4, params.candidate_groups(budget))
    summ = _grouped(case)
    for _ in range(2):
        gs = triton_kernels.score_groups(case.q.to(DEV), summ, wide.to(DEV), case.seq_lens.to(DEV), params)
        got = triton_kernels.refine_select(case.q.to(DEV), summ, wide.to(DEV), case.seq_lens.to(DEV), gs, params,
                                           k).cpu()
        for n in range(5):
            for h in range(2):
                b = int(budget[n])
                assert got[n, h, :b].tolist() == want.blocks[n, h][want.valid[n, h]].tolist(), (n, h)
    assert int(budget[2]) == int(nb[2]) and int(budget[3]) == 0
    smin, smax = gather_summaries(case.summaries.kmin, case.summaries.kmax, case.block_table[:1, :100])
    gmin, gmax = group_summaries(smin, smax, 4)
    last = case.block_table[0, 3:100:4].long()  # sequence 0's groups, keyed by their last block
    filled = summ.gmax[last].cpu()[:, 0, 0] > float("-inf")
    assert filled.sum() > 10  # the groups that were scored (not forced) got their rows
    torch.testing.assert_close(summ.gmin[last].cpu()[filled], gmin[0][filled], rtol=0, atol=0)
    torch.testing.assert_close(summ.gmax[last].cpu()[filled], gmax[0][filled], rtol=0, atol=0)


@in_process
def test_two_level_step_matches_reference_attention_and_uses_the_stored_group_rows():
    """retrieval_decode with group_blocks=4 == torch two-level selection + reference attention (bf16, GQA 4); a
    wrong group row planted for a group makes the kernel skip it (the rows are read, not recomputed), and
    BlockSummaries.refresh empties them so the next step is right again."""
    from attention_backends.retrieval_decode import planner

    bs = 16
    case = make_case(seq_lens=(2000, 1200), hkv=2, group=4, d=32, bs=bs, num_blocks=256, dtype=torch.bfloat16)
    params = planner.RetrievalParams(block_size=bs, budget_tokens=256, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=64, min_context_tokens=128, group_blocks=4)
    nb, budget = planner.device_budgets(params, case.seq_lens)
    k = planner.graph_k(params, case.block_table.shape[1] * bs)
    summ = _grouped(case, torch.bfloat16)
    kv, vv = _flash_views(case.key_cache, case.value_cache)
    sel = select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table, nb, budget, k,
                             params.sink_blocks, params.recent_blocks, "max", 4, params.candidate_groups(budget))
    want = selected_block_attention(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, sel,
                                    0.2)

    def step():
        return triton_kernels.retrieval_decode(case.q.to(DEV), kv, vv, summ.kmin, summ.kmax, case.block_table.to(DEV),
                                               case.seq_lens.to(DEV), params, k, 0.2, summ=summ).cpu()
    torch.testing.assert_close(step().float(), want.float(), rtol=2e-2, atol=2e-2)
    # Plant a row that bounds nothing useful for the group of sequence 0 holding its best picked block.
    picked = sel.blocks[0, 0][sel.valid[0, 0]]
    free = picked[(picked >= 4) & (picked < int(nb[0]) - params.recent_blocks - 4)]
    grp = int(free[0]) // 4
    row = int(case.block_table[0, grp * 4 + 3])
    summ.gmin[row] = 0.0
    summ.gmax[row] = 0.0
    params_r = params
    gs = triton_kernels.score_groups(case.q.to(DEV), summ, case.block_table.to(DEV), case.seq_lens.to(DEV), params_r)
    top = triton_kernels.refine_select(case.q.to(DEV), summ, case.block_table.to(DEV), case.seq_lens.to(DEV), gs,
                                       params_r, k).cpu()
    assert gs[0, 0, grp].item() == 0.0
    summ.refresh(case.key_cache.to(torch.bfloat16).to(DEV), torch.arange(256, device=DEV))
    assert bool((summ.gmax == float("-inf")).all())
    torch.testing.assert_close(step().float(), want.float(), rtol=2e-2, atol=2e-2)
    assert top.shape == (2, 2, k)


@in_process
def test_fused_summary_update_equals_the_separate_update():
    """score_groups with fuse_key/fuse_slots leaves the block summaries exactly as update_summaries would (a token
    continuing a block, a token starting a new block, a padding row with slot -1), and empties the group row of
    the block that starts fresh."""
    from attention_backends.retrieval_decode import planner

    bs = 16
    case = make_case(seq_lens=(1601, 900, 0), hkv=2, group=3, d=16, bs=bs, num_blocks=256)
    params = planner.RetrievalParams(block_size=bs, budget_tokens=320, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=64, min_context_tokens=128, group_blocks=4)
    g = torch.Generator().manual_seed(5)
    key = torch.randn(3, 2, 16, generator=g)
    fresh_block = int(case.block_table[0, 100])
    slots = torch.tensor([fresh_block * bs, int(case.block_table[1, 56]) * bs + 3, -1])  # 1601 -> offset 0
    fused, separate = _grouped(case), _grouped(case)
    fused.gmax[fresh_block] = 1.0  # a stale row keyed by the reused block
    separate.gmax[fresh_block] = 1.0
    triton_kernels.score_groups(case.q.to(DEV), fused, case.block_table.to(DEV), case.seq_lens.to(DEV), params,
                                fuse_key=key.to(DEV), fuse_slots=slots.to(DEV))
    separate.update(key.to(DEV), slots.to(DEV))
    # (the torch update on CPU parks the padding token in the trash row; the kernels skip it)
    torch.testing.assert_close(fused.kmin[:-1].cpu(), separate.kmin[:-1].cpu(), rtol=0, atol=0)
    torch.testing.assert_close(fused.kmax[:-1].cpu(), separate.kmax[:-1].cpu(), rtol=0, atol=0)
    assert not torch.equal(fused.kmax[:-1].cpu(), _grouped(case).kmax[:-1].cpu())  # the update did happen
    assert bool((fused.gmax[fresh_block] == float("-inf")).all())
    assert bool((separate.gmax[fresh_block] == float("-inf")).all())


@in_process
@pytest.mark.parametrize("group_blocks", [1, 4])
def test_graph_step_with_the_dense_path_on_a_mixed_batch(group_blocks):
    """A pure-decode graph step with graph_dense_path on a batch mixing long sequences (retrieval), short ones
    (dense: under min_context, or within their budget) and a padding row: the dense backend's kernel (here the
    torch dense oracle, reading the dense metadata's lengths: a zero-length row comes out NaN) runs first on every
    row; then the retrieval kernels, given length 0 for the dense rows, overwrite exactly the retrieval rows. Dense
    rows stay bit for bit what the dense kernel wrote, retrieval rows equal the torch selection + attention, no
    NaN of the dense kernel's empty rows reaches them; k holds only sparse budgets (no read-all slots)."""
    from types import SimpleNamespace

    from attention_backends.retrieval_decode import planner, runner
    from attention_backends.retrieval_decode.reference import dense_decode_attention, split_decode_attention

    bs = 16
    case = make_case(seq_lens=(700, 90, 0, 512, 300, 100), hkv=2, group=4, d=32, bs=bs, num_blocks=160)
    params = planner.RetrievalParams(block_size=bs, budget_tokens=96, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=20, min_context_tokens=400, graph_dense_path=True,
                                     group_blocks=group_blocks)
    seq = case.seq_lens.int()
    dense_lens, retrieval_lens = torch.zeros_like(seq), torch.zeros_like(seq)
    planner.split_lengths(params, seq, dense_lens, retrieval_lens)
    assert retrieval_lens.tolist() == [700, 0, 0, 512, 0, 0] and dense_lens.tolist() == [0, 90, 0, 0, 300, 100]
    k = planner.graph_k(params, 720)
    assert k == 6  # the sparse budget only: the 300-token row would need 19 slots to read everything
    plan = planner.DecodeGraphPlan(seq.to(DEV), case.block_table.to(DEV), k, params,
                                   dense_metadata=SimpleNamespace(seq_lens=dense_lens.to(DEV)),
                                   retrieval_seq_lens=retrieval_lens.to(DEV))
    out = torch.full((6, 8, 32), 7.0, device=DEV)
    written = {}

    def dense_forward(metadata):  # FlashAttention's part: every row at the metadata's lengths
        lens = metadata.seq_lens.cpu()
        got = dense_decode_attention(case.q, case.key_cache, case.value_cache, case.block_table, lens, 0.2)
        assert bool(torch.isnan(got[[0, 2, 3]]).all())  # zero-length rows: the worst an empty row could hold
        out.copy_(got.to(DEV))
        written["dense"] = out.cpu().clone()

    r = runner.RetrievalDecodeRunner(SimpleNamespace(scale=0.2))
    r.summaries = _grouped(case)
    kview, vview = _flash_views(case.key_cache, case.value_cache)
    got = r._graph_step(case.q.to(DEV), kview, vview, plan, out, dense_forward).cpu()
    dense_rows, sparse_rows = [1, 4, 5], [0, 3]
    assert torch.equal(got[dense_rows], written["dense"][dense_rows])
    assert not bool(torch.isnan(got[sparse_rows]).any())
    nb, budget = planner.device_budgets(params, case.seq_lens)
    groups = params.candidate_groups(budget) if group_blocks > 1 else None
    sel = select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table, nb, budget,
                             case.block_table.shape[1], params.sink_blocks, params.recent_blocks, "max", group_blocks,
                             groups)
    want = split_decode_attention(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, sel,
                                  planner.retrieval_rows(params, case.seq_lens), 0.2)
    torch.testing.assert_close(got[dense_rows + sparse_rows], want[dense_rows + sparse_rows], rtol=2e-4, atol=2e-4)
    dense_all = dense_decode_attention(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, 0.2)
    assert (got[0] - dense_all[0]).abs().max() > 0.1  # the long rows really are sparse


def test_bench_error_text_keeps_the_root_cause():
    """A variant that fails to compile on the GPU is recorded with the reason (Triton's CompilationError keeps
    it in __cause__; its own message is the kernel source, which a length cut keeps instead)."""
    from benchmarks.kernels.retrieval_decode_bench import error_text

    try:
        try:
            raise ValueError("unsupported histogram mask")
        except ValueError as inner:
            raise RuntimeError("at 17:17:\n" + "source line\n" * 500) from inner
    except RuntimeError as exc:
        text = error_text(exc, limit=300)
    assert text.startswith("ValueError: unsupported histogram mask")
    assert len(text) <= 300


@in_process
@pytest.mark.parametrize("group_blocks, dtype", [(1, torch.float32), (1, torch.bfloat16), (4, torch.float32)])
def test_selection_reuse_matches_the_torch_reference(group_blocks, dtype):
    """reselect_interval > 1 (reuse.py): a step with every reselect flag set writes the selection into the store
    and equals today's step; 17 tokens later, rows with flag 0 skip score and select (their stored slots stay as
    they were) and attend their stored selection plus the 2 blocks started since, rows with flag 1 select afresh
    into the store: == reuse.reused_selection + the reference attention. A padding row (length 0) comes out 0."""
    from attention_backends.retrieval_decode import planner, reuse

    bs = 16
    case = make_case(seq_lens=(940, 720, 90, 300), hkv=2, group=4, d=32, bs=bs, num_blocks=160)
    params = planner.RetrievalParams(block_size=bs, budget_tokens=128, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=20, min_context_tokens=128, group_blocks=group_blocks,
                                     reselect_interval=18)
    assert params.reuse_extra_blocks == 2
    k = planner.graph_k(params, case.block_table.shape[1] * bs)
    q, kc, vc = case.q.to(dtype), case.key_cache.to(dtype), case.value_cache.to(dtype)
    kview, vview = _flash_views(kc, vc)
    summ = _grouped(case) if group_blocks > 1 else None
    table = case.block_table.to(DEV)

    def torch_select(seq):
        nb, budget = planner.device_budgets(params, seq)
        groups = params.candidate_groups(budget) if group_blocks > 1 else None
        return select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table, nb, budget,
                                  k, params.sink_blocks, params.recent_blocks, "max", group_blocks, groups)

    def kernel_step(seq, flags, sel_lens, store):
        r = triton_kernels.Reuse(store, flags.to(torch.int32).to(DEV), sel_lens.to(torch.int32).to(DEV),
                                 params.reuse_extra_blocks)
        return triton_kernels.retrieval_decode(q.to(DEV), kview, vview, case.summaries.kmin.to(DEV),
                                               case.summaries.kmax.to(DEV), table, seq.to(DEV), params, k, 0.2,
                                               num_splits=3, tile_blocks=2, summ=summ, reuse=r).float().cpu()

    tol = 2e-4 if dtype == torch.float32 else 3e-2
    first = torch.tensor([896, 680, 80, 0])  # 896 = 56 full blocks: the next token starts block 56
    store = torch.full((4, 2, k), -7, dtype=torch.int32, device=DEV)
    got = kernel_step(first, torch.ones(4), first, store)
    sel0 = torch_select(first)
    _, budget0 = planner.device_budgets(params, first)
    for n in range(3):
        for h in range(2):
            b = int(budget0[n])
            assert store[n, h, :b].cpu().tolist() == sel0.blocks[n, h, :b].tolist(), (n, h)
    want = selected_block_attention(q, kc, vc, case.block_table, first, sel0, 0.2).float()
    torch.testing.assert_close(got[:3], want[:3], rtol=tol, atol=tol)

    later = first + torch.tensor([17, 17, 5, 0])
    flags = torch.tensor([0, 1, 1, 1])
    kept = store.cpu().clone()
    got = kernel_step(later, flags, first, store)
    assert torch.equal(store[0].cpu(), kept[0])  # a reusing row's selection is read, never rewritten
    stored_ref = torch.zeros(4, 2, k, dtype=torch.long)
    stored_ref[0] = sel0.blocks[0]
    fresh = torch_select(later)
    stored_ref[1:] = fresh.blocks[1:]
    for h in range(2):
        b = int(planner.device_budgets(params, later)[1][1])
        assert store[1, h, :b].cpu().tolist() == fresh.blocks[1, h, :b].tolist()
    sel = reuse.reused_selection(stored_ref, flags, first, later, params, params.reuse_extra_blocks)
    assert set(sel.blocks[0, 0][sel.valid[0, 0]].tolist()) >= {56, 57}  # the blocks started since
    want = selected_block_attention(q, kc, vc, case.block_table, later, sel, 0.2).float()
    torch.testing.assert_close(got[:3], want[:3], rtol=tol, atol=tol)
    assert torch.equal(got[3], torch.zeros_like(got[3]))
    # and not the fresh selection's answer: row 0 really reused
    fresh_out = selected_block_attention(q, kc, vc, case.block_table, later, fresh, 0.2).float()
    assert not torch.allclose(got[0], fresh_out[0], rtol=tol, atol=tol)


@in_process
def test_graph_step_reuses_each_rows_stored_selection_across_steps():
    """The runner's pure-decode graph step with the builder's tracker (reselect_interval=4), 3 steps: step 0
    selects (today's step), steps 1-2 read the selection stored in the layer's persistent store (same buffer every
    step) plus the blocks started since == reuse.reused_selection + the reference attention."""
    from types import SimpleNamespace

    from attention_backends.retrieval_decode import planner, reuse
    from attention_backends.retrieval_decode.runner import RetrievalDecodeRunner

    bs = 16
    case = make_case(seq_lens=(940, 720), hkv=2, group=4, d=32, bs=bs, num_blocks=160)
    params = planner.RetrievalParams(block_size=bs, budget_tokens=128, budget_fraction=0.0, sink_blocks=1,
                                     recent_tokens=20, min_context_tokens=128, reselect_interval=4)
    width = case.block_table.shape[1]
    k = planner.graph_k(params, width * bs)
    run = RetrievalDecodeRunner(SimpleNamespace(scale=0.2))
    run.summaries = case.summaries
    kview, vview = _flash_views(case.key_cache, case.value_cache)
    table = case.block_table.to(DEV)
    tracker = reuse.ReuseTracker(4, DEV)
    stored, ptrs = None, set()
    for t in range(3):
        seq = torch.tensor([895 + t, 700 + t], dtype=torch.int32)
        flags, sel_lens = tracker.step(table, seq.to(DEV), planner.retrieval_rows(params, seq.to(DEV)), 4, bs)
        plan = planner.DecodeGraphPlan(seq.to(DEV), table, k, params, reuse=reuse.ReuseRows(
            None, flags, sel_lens, 4, min(k, width), params.reuse_extra_blocks))
        out = torch.zeros(2, 8, 32, device=DEV)
        run._graph_step(case.q.to(DEV), kview, vview, plan, out, None)
        ptrs.add(run.selections.blocks.data_ptr())
        assert flags.cpu().tolist() == ([1, 1] if t == 0 else [0, 0])
        if t == 0:
            nb, budget = planner.device_budgets(params, seq)
            stored = select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table, nb,
                                        budget, min(k, width), params.sink_blocks, params.recent_blocks).blocks
        sel = reuse.reused_selection(stored, flags.cpu(), sel_lens.cpu(), seq, params, params.reuse_extra_blocks)
        want = selected_block_attention(case.q, case.key_cache, case.value_cache, case.block_table, seq, sel, 0.2)
        torch.testing.assert_close(out.float().cpu(), want, rtol=2e-4, atol=2e-4)
    assert len(ptrs) == 1 and run.selections.blocks.shape == (4, 2, min(k, width))
