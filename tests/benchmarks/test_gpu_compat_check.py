"""benchmarks/gpu_compat_check.py without a GPU: verdicts on the scripts' own summaries, step selection across
calls, the time budget, file tags."""
from __future__ import annotations

import json

import pytest

from benchmarks import gpu_compat_check as cc
from benchmarks import gpu_retrieval_decode, gpu_sparse_prefill

from .test_harness import _gone

KVPLUG_IMPL = "attention_backends.kvplug_backend.KvplugAttentionImpl"
FLASH_IMPL = "vllm.v1.attention.backends.flash_attn.FlashAttentionImpl"


def _passthrough(greedy_identical=True, custom_impls=(KVPLUG_IMPL,), overhead=0.5):
    row = {"flash_attn": 1.0, "kvplug": 1.0 + overhead / 100, "overhead_pct": overhead}
    return {"summary": {"greedy_identical": greedy_identical,
                        "attention_impls": {"FLASH_ATTN": [FLASH_IMPL], "CUSTOM": list(custom_impls)},
                        "ttft_s": {"8192": row, "32768": dict(row, overhead_pct=-0.1)}, "tpot_s": {"8192": row}}}


def test_passthrough_passes_on_identical_greedy_ids_of_kvplugs_backend():
    assert cc.passthrough_verdict(_passthrough()) == "pass"
    assert "greedy ids" in cc.passthrough_verdict(_passthrough(greedy_identical=False))
    assert "did not run kvplug's backend" in cc.passthrough_verdict(_passthrough(custom_impls=(FLASH_IMPL,)))
    over = cc.passthrough_overheads(_passthrough(overhead=3.1))
    assert over["overhead_pct"] == {"ttft_s 8192": 3.1, "ttft_s 32768": -0.1, "tpot_s 8192": 3.1}
    assert over["within_target"] is False and cc.passthrough_overheads(_passthrough())["within_target"] is True


def _sparse_run(chunks, density):
    return {"backend": "CUSTOM", "device": "H100", "vllm": "0.34.0", "attention_impls": [KVPLUG_IMPL],
            "ttft_s": {"32768": [1.1]}, "density": {"32768": density}, "chunks": {"32768": chunks}, "two_turn": {}}


def test_sparse_prefill_summary_of_a_custom_only_run_and_its_verdict():
    summary = gpu_sparse_prefill.summarize([_sparse_run({"sparse/threshold": 3, "dense/below_floor": 1}, 0.08)])
    row = summary["ttft"]["32768"]
    assert row["flash_attn_s"] is None and row["speedup"] is None and row["kvplug_s"] == 1.1
    gpu_sparse_prefill.print_summary(summary)  # prints with a missing baseline
    assert cc.sparse_prefill_verdict({"summary": summary}) == "pass"
    dense = gpu_sparse_prefill.summarize([_sparse_run({"dense/below_floor": 4}, 1.0)])
    assert cc.sparse_prefill_verdict({"summary": dense}).startswith("fail: no prefill chunk of the 32768-token")
    full = gpu_sparse_prefill.summarize([_sparse_run({"sparse/threshold": 4}, 1.0)])
    assert "computed every pair" in cc.sparse_prefill_verdict({"summary": full})


def _retrieval_run(sparse_tokens, t1=0.2):
    stats = {"sparse_tokens": sparse_tokens, "dense_decode_tokens": 64 - sparse_tokens, "blocks_read": 10,
             "blocks_total": 100, "summary_layers": 32}
    return {"backend": "CUSTOM", "device": "H100", "vllm": "0.34.0", "attention_impls": [KVPLUG_IMPL], "engine": {},
            "tpot_s": {"32768": [0.01]}, "throughput_tok_s": {}, "stats": {"tpot": stats},
            "timings": {"32768": [{"prefill_s": 2.0, "t1_s": t1, "tn_s": t1 + 0.7}]}}


def test_retrieval_decode_verdict_on_a_custom_only_summary():
    assert cc.retrieval_decode_verdict({"summary": gpu_retrieval_decode.summarize([_retrieval_run(64)])}) == "pass"
    dense = cc.retrieval_decode_verdict({"summary": gpu_retrieval_decode.summarize([_retrieval_run(0)])})
    assert dense.startswith("fail: FELL BACK TO DENSE (tpot)")
    reprefilled = cc.retrieval_decode_verdict({"summary": gpu_retrieval_decode.summarize([_retrieval_run(64, 1.9)])})
    assert "prefix cache did not hold" in reprefilled


def test_offload_passes_only_when_the_connector_served_the_follow_ups():
    good = {"mode": "keep", "no_op": False, "connector_loaded_blocks": {"cpu": 1024, "disk": 0},
            "follow_up_cached_fraction": 0.99}
    assert cc.offload_verdict({"runs": [good]}) == "pass"
    assert "recomputed" in cc.offload_verdict({"runs": [dict(good, no_op=True, connector_loaded_blocks={"cpu": 0})]})
    assert cc.offload_verdict({"runs": [{"mode": "keep", "error": "keep run failed (exit 1)"}]}) == \
        "fail: keep run failed (exit 1)"
    assert cc.offload_verdict({"runs": [dict(good, mode="none")]}) == "fail: no keep-mode run in the results"


def test_cli_and_serve_verdicts():
    assert cc.cli_verdict(0, "usage: ... --attention-backend ... --kv-transfer-config ...") == "pass"
    assert cc.cli_verdict(1, "Traceback") == "fail: kvplug serve --help exited 1"
    assert "did not print vLLM's server flags" in cc.cli_verdict(0, "usage: kvplug serve")
    ok = {"completion": {"status": 200, "x-kvplug-cache": "gpu=0; cpu=0; policy=keep"},
          "bad_policy": {"status": 400, "body": '{"error": {"param": "kvplug_policy"}}'}, "kvplug_metric_lines": 12}
    assert cc.serve_verdict(ok) == "pass"
    assert "no x-kvplug-cache header" in cc.serve_verdict(dict(ok, completion={"status": 200}))
    assert "not 400" in cc.serve_verdict(dict(ok, bad_policy={"status": 200, "body": "{}"}))
    assert cc.serve_verdict(dict(ok, kvplug_metric_lines=0)) == "fail: /metrics has no kvplug samples"


def test_serve_check_records_why_the_server_did_not_come_up(fake_kvplug_serve, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_SERVE_MODE", "exit")
    out = cc.serve_check(tmp_path / "model", tmp_path / "serve.log", timeout_s=30)
    assert out["verdict"] == "fail: kvplug serve exited 3 before /health answered" and "ready_s" not in out
    assert out["command"].startswith(f"kvplug serve {tmp_path / 'model'} --offload cpu:4GiB --load-format dummy")


def test_serve_check_asks_a_server_that_came_up_and_stops_it(fake_kvplug_serve, tmp_path):
    out = cc.serve_check(tmp_path / "model", tmp_path / "serve.log", timeout_s=30)
    assert out["ready_s"] >= 0
    assert out["completion"]["status"] == 501  # the fake answers /health only
    assert out["verdict"].startswith("fail: completion answered 501")
    assert out["kvplug_metric_lines"] == 0
    pids = fake_kvplug_serve()
    assert [role for role, pid in pids.items() if not _gone(pid)] == []


def test_tags_name_the_release_line_and_the_gpu():
    assert cc.release_tag("0.34.0+cu130") == "0_34" and cc.release_tag("0.26.0") == "0_26"
    assert cc.gpu_tag("NVIDIA H100 80GB HBM3") == "h100" and cc.gpu_tag("NVIDIA H200") == "h200"
    assert cc.gpu_tag("cpu") == "cpu"


def test_pending_steps_skip_passed_ones_unless_asked():
    recorded = {"cli": {"verdict": "pass"}, "passthrough": {"verdict": "fail: x"}}
    assert cc.pending_steps(recorded, None) == [s for s in cc.STEP_NAMES if s != "cli"]
    assert cc.pending_steps(recorded, ["offload", "cli"]) == ["cli", "offload"]  # always in step order


@pytest.fixture
def fake_steps(monkeypatch, tmp_path):
    """main() with every step faked (each 'takes' its estimate on a fake clock)."""
    clock = [0.0]
    ran, failing = [], set()
    monkeypatch.setattr(cc.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(cc, "installed_vllm", lambda: "0.34.0")
    monkeypatch.setattr(cc, "gpu_name", lambda: "NVIDIA H100 80GB HBM3")

    def run_step(step, files, log_dir, timeout_s, model_dir):
        ran.append(step.name)
        clock[0] += step.estimate_s
        return {"verdict": "fail: broke" if step.name in failing else "pass", "seconds": step.estimate_s}

    monkeypatch.setattr(cc, "run_step", run_step)
    base = ["--results", str(tmp_path), "--log-dir", str(tmp_path / "logs")]
    return ran, base, tmp_path, failing


def test_a_budget_too_small_for_every_step_leaves_the_rest_to_the_next_call(fake_steps):
    ran, base, tmp_path, _ = fake_steps
    first_budget = sum(s.estimate_s for s in cc.STEPS[:3]) + 1
    assert cc.main([*base, "--budget-s", str(first_budget)]) == 2
    assert ran == list(cc.STEP_NAMES[:3])
    summary = json.loads((tmp_path / "compat_cuda_0_34_h100.json").read_text())
    assert summary["vllm"] == "0.34.0" and set(summary["steps"]) == set(cc.STEP_NAMES[:3])
    ran.clear()
    assert cc.main([*base, "--budget-s", "10000"]) == 0  # the same command again: only what is left
    assert ran == list(cc.STEP_NAMES[3:])


def test_a_failed_step_fails_the_call_and_is_retried_next_time(fake_steps):
    ran, base, _, failing = fake_steps
    failing.add("sparse_prefill")
    assert cc.main([*base, "--budget-s", "10000"]) == 1
    assert ran == list(cc.STEP_NAMES)
    ran.clear()
    failing.clear()
    assert cc.main([*base, "--budget-s", "10000"]) == 0 and ran == ["sparse_prefill"]


def test_unknown_steps_are_refused(capsys):
    with pytest.raises(SystemExit):
        cc.main(["--steps", "passthrough,nope"])
    assert "unknown step(s) ['nope']" in capsys.readouterr().err


class _Launched(Exception):
    pass


@pytest.mark.parametrize("step", [s for s in cc.STEPS if s.verdict is not None], ids=lambda s: s.name)
def test_every_engine_step_parses_and_launches_its_first_engine_with_its_feature_on(monkeypatch, tmp_path, step):
    """The flags of each step are ones its script takes; its first engine gets the environment the check needs
    (stopped at the launch: no engine here)."""
    import importlib

    from benchmarks import harness

    launched = []

    def run_worker(module, backend, argv, env, **_kw):
        launched.append((module, backend, env))
        raise _Launched

    monkeypatch.setattr(harness, "run_worker", run_worker)
    monkeypatch.setattr(harness, "device_name", lambda cpu="cpu": "cpu")
    with pytest.raises(_Launched):
        importlib.import_module(step.module).main([*step.args, "--out", str(tmp_path / "out.json")])
    module, backend, env = launched[0]
    assert module == step.module
    expected = {"passthrough": ("FLASH_ATTN", {"VLLM_PLUGINS": "none"}),
                "sparse_prefill": ("CUSTOM", {"KVPLUG_SPARSE_PREFILL__ENABLED": "true",
                                              "KVPLUG_SPARSE_PREFILL__COST_TABLE": "none",
                                              "KVPLUG_SPARSE_PREFILL__MIN_PROMPT_TOKENS": "8192"}),
                "retrieval_decode": ("CUSTOM", {"KVPLUG_RETRIEVAL_DECODE__ENABLED": "true"}),
                "offload": ("keep", {"KVPLUG_OFFLOAD__ENABLED": "true", "KVPLUG_CACHE_POLICY__DEFAULT": "keep"})}
    want_backend, want_env = expected[step.name]
    assert backend == want_backend and {k: env.get(k) for k in want_env} == want_env
