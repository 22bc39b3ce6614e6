"""The sparse prefill kernel benchmark's index converters (FA2 sparse kernel, FlexAttention block mask) and a
CPU smoke run: what they feed the baselines covers exactly what our index attends."""
from __future__ import annotations

import json

import pytest
import torch

from attention_backends.sparse_prefill.head_config import HeadPattern, LayerPlan, PatternConfig, build_index
from attention_backends.sparse_prefill.index import BLOCK, ChunkGeometry
from benchmarks.kernels import sparse_prefill_bench as bench


@pytest.fixture(scope="module")
def case():
    n = L = 1500
    q, k, _ = bench.synthetic_qkv(L, 4, 2, 16, "cpu", torch.float32)
    geom = ChunkGeometry(n, L)
    cfg = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 20, "slash": 130}),
                        layers={0: {3: HeadPattern(pattern="block_sparse", budgets={"top_k": 3})}})
    return geom, build_index(q, k, geom, LayerPlan.from_config(cfg.validate(), 0, 4), 0.25, trim_columns=False)


def test_fa2_offsets_and_columns_cover_the_index(case):
    geom, idx = case
    bc, bo, cc, ci = bench.fa2_sparse_index(idx, geom)
    H = idx.num_heads
    keys = torch.arange(geom.L)
    want = idx.dense_mask(geom)  # [H, n, L]
    for h in range(H):
        for qb in range(geom.nqb):
            rows = slice(qb * BLOCK, min(geom.n, qb * BLOCK + BLOCK))
            offs = bo[0, h, qb, :bc[0, h, qb]].long()
            assert torch.equal(offs, torch.sort(offs).values)
            got = ((keys[None, :] >= offs[:, None]) & (keys[None, :] < offs[:, None] + BLOCK)).any(0)
            got[ci[0, h, qb, :cc[0, h, qb]].long()] = True
            need = want[h, rows].any(0)
            assert not (need & ~got).any(), f"head {h} block {qb}: FA2 would miss keys"
            assert int(bc[0, h, qb]) <= (idx.block_mask[h, qb].sum() + idx.range_count[h])


def test_flex_block_mask_covers_the_index(case):
    geom, idx = case
    blocks = bench.covering_blocks(idx, geom)
    want = idx.dense_mask(geom)
    for qb in range(geom.nqb):
        need = want[:, qb * BLOCK:(qb + 1) * BLOCK].any(1)  # [H, L]
        nkb = blocks.shape[-1]
        need_blocks = torch.nn.functional.pad(need, (0, nkb * BLOCK - geom.L)).view(-1, nkb, BLOCK).any(-1)
        assert not (need_blocks & ~blocks[:, qb]).any()


def test_cli_runs_on_cpu_without_fa(tmp_path):
    """The benchmark end to end on tiny CPU shapes (the Triton kernel under TRITON_INTERPRET=1, in a fresh
    interpreter): a two-point budget sweep; FA3 / FA2 / xformers say why they are missing."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "benchmarks.kernels.sparse_prefill_bench", "--lengths", "256", "--heads", "2",
           "--kv-heads", "1", "--head-dim", "16", "--device", "cpu", "--iters", "1", "--warmup", "0", "--skip-flex",
           "--budget-sweep", '{"vertical": 10, "slash": 20};{"vertical": 40, "slash": 128}', "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert len(report["results"]) == 2 and "CUDA" in report["fa_missing"]
    # xformers (not installed here, or installed: its ops need CUDA): the column says why, nothing is timed
    assert all(r["xformers_missing"] == report["xformers"]["missing"] and "xformers_dense_ms" not in r
               for r in report["results"])
    assert "not importable" in report["xformers"]["missing"] or "CUDA" in report["xformers"]["missing"]
    assert report["results"][0]["density"] < report["results"][1]["density"] <= 1.0
    assert report["results"][1]["rel_err_vs_dense"] < report["results"][0]["rel_err_vs_dense"]


def test_cli_group_shared_and_fused_estimate_on_cpu(tmp_path):
    """--group-shared / --fused-estimate end to end on tiny CPU shapes (interpreted kernels): the shared kernel
    matches the reference on its group-shared index, the fused estimate matches the torch one."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "benchmarks.kernels.sparse_prefill_bench", "--lengths", "300", "--heads", "4",
           "--kv-heads", "2", "--head-dim", "16", "--device", "cpu", "--iters", "1", "--warmup", "0", "--skip-flex",
           "--budgets", '{"vertical": 10, "slash": 20}', "--group-configs", "32x64x4x2", "--group-shared",
           "--shared-configs", "32x4x2", "--fused-estimate", "--check", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())["results"][0]
    assert row["shared_index_is_group_shared"] and row["max_abs_err_vs_reference_shared"] < 1e-3
    assert 0 < row["shared_density"] <= 1 and row["shared_ms_per_gpair"] > 0
    assert row["fused_vertical_max_abs_err"] < 1e-4 and row["fused_slash_max_abs_err"] < 1e-4
    assert row["fused_index_density"] == pytest.approx(row["density"], rel=1e-6)
