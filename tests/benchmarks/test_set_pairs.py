"""--set KEY=VALUE of the GPU scripts (gpu_sparse_prefill, gpu_retrieval_decode): extra config keys."""
from __future__ import annotations

import pytest

from benchmarks import harness


def test_set_pairs_become_section_keys():
    assert harness.set_pairs(["group_shared_selection=true", " fused_estimate = true "], "sparse_prefill") == {
        "group_shared_selection": "true", "fused_estimate": "true"}
    assert harness.set_pairs([], "retrieval_decode") == {}


@pytest.mark.parametrize("bad", ["group_blocks", "=4"])
def test_set_without_key_or_value_is_refused_naming_it(bad):
    with pytest.raises(SystemExit, match="expected KEY=VALUE \\(a retrieval_decode key\\)"):
        harness.set_pairs([bad], "retrieval_decode")


def test_gpu_sparse_prefill_set_executor_reaches_the_kvplug_engine(monkeypatch):
    """`python -m benchmarks.gpu_sparse_prefill ... --set executor=fa2_sparse`: the CUSTOM engine's environment
    carries sparse_prefill.executor (validated there like every key); FLASH_ATTN's does not."""
    from benchmarks import gpu_sparse_prefill
    from kvplug import settings

    captured = {}
    monkeypatch.setattr(harness, "parse_shape_args", lambda p, a, worker: captured.update(args=p.parse_args(a)))
    assert gpu_sparse_prefill.main(["--lengths", "32768,131072", "--repeats", "2", "--turn-length", "0",
                                    "--set", "executor=fa2_sparse", "--model-dir", "/tmp/x"]) == 0
    envs = {}
    monkeypatch.setattr(harness, "run_worker", lambda module, backend, argv, env: envs.setdefault(backend, env))
    for backend in ("CUSTOM", "FLASH_ATTN"):
        gpu_sparse_prefill.run_backend(captured["args"], backend)
    assert envs["CUSTOM"]["KVPLUG_SPARSE_PREFILL__EXECUTOR"] == "fa2_sparse"
    assert "KVPLUG_SPARSE_PREFILL__EXECUTOR" not in envs["FLASH_ATTN"]
    assert settings.resolve(environ=envs["CUSTOM"]).sparse_prefill.executor == "fa2_sparse"


def test_gpu_sparse_prefill_summary_shows_which_executor_served(capsys):
    from benchmarks import gpu_sparse_prefill

    def run(backend, execs):
        return {"backend": backend, "attention_impls": [backend], "ttft_s": {"32768": [1.0]}, "density": {"32768": 0.1},
                "chunks": {}, "executor_calls": execs, "two_turn": {}, "device": "H100", "vllm": "0.26.0"}

    summary = gpu_sparse_prefill.summarize([
        run("FLASH_ATTN", {}), run("CUSTOM", {"32768": {"fa2_sparse_layer_calls": 64, "executor_fallback_layer_calls": 0}})])
    assert summary["ttft"]["32768"]["executor_calls"]["fa2_sparse_layer_calls"] == 64
    gpu_sparse_prefill.print_summary(summary)
    assert "'fa2_sparse_layer_calls': 64" in capsys.readouterr().out


def test_gpu_sparse_prefill_with_defaults_runs_kvplug_as_shipped_beside(monkeypatch, capsys):
    """--with-defaults: a third engine, kvplug with only sparse prefill on (no --set, cost table, floor), labelled
    apart; the summary sets its TTFT beside FLASH_ATTN and the --set configuration."""
    from benchmarks import gpu_sparse_prefill

    captured = {}
    monkeypatch.setattr(harness, "parse_shape_args", lambda p, a, worker: captured.update(args=p.parse_args(a)))
    assert gpu_sparse_prefill.main(["--lengths", "32768", "--turn-length", "0", "--set", "executor=auto", "--set",
                                    "compiled_index=true", "--cost-table", "none", "--with-defaults",
                                    "--model-dir", "/tmp/x"]) == 0
    args = captured["args"]
    assert args.with_defaults
    envs, ttft = [], {"FLASH_ATTN": 1.2, "CUSTOM": 1.0, gpu_sparse_prefill.DEFAULTS: 1.1}

    def worker(module, backend, argv, env):
        envs.append((backend, env))
        label = gpu_sparse_prefill.DEFAULTS if "KVPLUG_SPARSE_PREFILL__EXECUTOR" not in env and backend == "CUSTOM" \
            else backend
        return {"backend": backend, "attention_impls": [backend], "ttft_s": {"32768": [ttft[label]]},
                "density": {"32768": 0.1}, "chunks": {}, "two_turn": {}, "device": "H100", "vllm": "0.26.0"}

    monkeypatch.setattr(harness, "run_worker", worker)
    runs = [gpu_sparse_prefill.run_backend(args, b) for b in ("FLASH_ATTN", "CUSTOM", gpu_sparse_prefill.DEFAULTS)]
    (_, shipped_env), backend = envs[-1], envs[-1][0]
    assert backend == "CUSTOM" and runs[-1]["backend"] == gpu_sparse_prefill.DEFAULTS  # kvplug's backend, its own label
    assert shipped_env["KVPLUG_SPARSE_PREFILL__ENABLED"] == "true"
    assert not {"KVPLUG_SPARSE_PREFILL__EXECUTOR", "KVPLUG_SPARSE_PREFILL__COMPILED_INDEX",
                "KVPLUG_SPARSE_PREFILL__COST_TABLE"} & set(shipped_env)
    row = gpu_sparse_prefill.summarize(runs)["ttft"]["32768"]
    assert row["speedup"] == pytest.approx(1.2) and row["defaults_speedup"] == pytest.approx(1.2 / 1.1)
    assert row["speedup_vs_defaults"] == pytest.approx(1.1)
    gpu_sparse_prefill.print_summary(gpu_sparse_prefill.summarize(runs))
    assert "shipped defaults" in capsys.readouterr().out
