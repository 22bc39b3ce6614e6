"""--tensor-parallel-size / --distributed-executor-backend of the GPU speed scripts (gpu_sparse_prefill: TTFT,
gpu_retrieval_decode: TPOT): parsed, validated before any engine starts, and passed to every engine of the run
(FLASH_ATTN and kvplug alike), down to the LLM(...) arguments each worker builds."""
from __future__ import annotations

import argparse
import sys

import pytest

from benchmarks import gpu_retrieval_decode, gpu_sparse_prefill, harness
from benchmarks.harness import write_shape

TP2_RAY = ["--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"]


def _parent(monkeypatch, script, argv: list[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    """The script's parser and the parent's arguments (main stops after parsing, as in a worker)."""
    captured = {}
    monkeypatch.setattr(harness, "parse_shape_args",
                        lambda p, a, worker: captured.update(parser=p, args=p.parse_args(a)))
    assert script.main(argv) == 0
    return captured["parser"], captured["args"]


def _engine_kwargs(monkeypatch, script, argv: list[str], backends: tuple[str, ...]) -> dict[str, dict]:
    """Per backend: the LLM(...) arguments its worker builds from the command line the parent gives it."""
    parser, args = _parent(monkeypatch, script, [*argv, "--model-dir", "/tmp/x"])
    sent = {}
    monkeypatch.setattr(harness, "run_worker", lambda module, backend, wargv, env: sent.setdefault(backend, wargv))
    # the worker's fixed KV size goes through vLLM's EngineArgs (not here): a stand-in of the same form
    monkeypatch.setattr(harness, "engine_memory_kwargs", lambda gib, util: {"kv_cache_memory_bytes": int(gib * 2**30)})
    out = {}
    for backend in backends:
        if script is gpu_retrieval_decode:
            script.run_backend(args, backend, argv)
        else:
            script.run_backend(args, backend)
        out[backend] = script.engine_kwargs(parser.parse_args(["--worker", "--backend", backend, *sent[backend]]))
    return out


SCRIPTS = [pytest.param(gpu_sparse_prefill, ["--lengths", "131072", "--turn-length", "0"], id="gpu_sparse_prefill"),
           pytest.param(gpu_retrieval_decode, ["--phases", "tpot", "--lengths", "131072", "--kv-cache-gib", "12"],
                        id="gpu_retrieval_decode")]


@pytest.mark.parametrize("script,argv", SCRIPTS)
def test_tp2_ray_reaches_every_engine_of_the_run(monkeypatch, script, argv):
    kwargs = _engine_kwargs(monkeypatch, script, [*argv, *TP2_RAY], ("FLASH_ATTN", "CUSTOM"))
    for backend, kw in kwargs.items():
        assert kw["tensor_parallel_size"] == 2, backend
        assert kw["distributed_executor_backend"] == "ray", backend
        assert kw["attention_backend"] == backend and kw["max_model_len"] >= 131072
    assert {k: v for k, v in kwargs["FLASH_ATTN"].items() if k != "attention_backend"} == \
        {k: v for k, v in kwargs["CUSTOM"].items() if k != "attention_backend"}  # only the backend differs


@pytest.mark.parametrize("script,argv", SCRIPTS)
def test_by_default_one_gpu_and_vllms_own_executor_choice(monkeypatch, script, argv):
    _, args = _parent(monkeypatch, script, argv)
    assert args.tensor_parallel_size == 1 and args.distributed_executor_backend is None
    for backend, kw in _engine_kwargs(monkeypatch, script, argv, ("FLASH_ATTN", "CUSTOM")).items():
        assert kw["tensor_parallel_size"] == 1, backend
        assert "distributed_executor_backend" not in kw, backend


@pytest.mark.parametrize("script,argv", SCRIPTS)
def test_mp_alone_and_tp_alone(monkeypatch, script, argv):
    kw = _engine_kwargs(monkeypatch, script, [*argv, "--distributed-executor-backend=mp"], ("CUSTOM",))["CUSTOM"]
    assert (kw["tensor_parallel_size"], kw["distributed_executor_backend"]) == (1, "mp")
    kw = _engine_kwargs(monkeypatch, script, [*argv, "--tensor-parallel-size=2"], ("FLASH_ATTN",))["FLASH_ATTN"]
    assert kw["tensor_parallel_size"] == 2 and "distributed_executor_backend" not in kw


@pytest.mark.parametrize("script,argv", SCRIPTS)
@pytest.mark.parametrize("bad,why", [(["--tensor-parallel-size", "0"], "expected a positive integer, got '0'"),
                                     (["--tensor-parallel-size", "-2"], "expected a positive integer, got '-2'"),
                                     (["--tensor-parallel-size", "two"], "expected a positive integer, got 'two'"),
                                     (["--distributed-executor-backend", "uni"], "invalid choice: 'uni'")])
def test_bad_parallel_flags_are_refused(monkeypatch, capsys, script, argv, bad, why):
    with pytest.raises(SystemExit):
        _parent(monkeypatch, script, [*argv, *bad])
    assert f"argument {bad[0]}: {why}" in capsys.readouterr().err


@pytest.mark.parametrize("script,argv", SCRIPTS)
def test_ray_not_importable_stops_before_any_engine_with_one_line(monkeypatch, capsys, script, argv):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    started = []
    monkeypatch.setattr(harness, "run_worker", lambda *a, **k: started.append(a))
    with pytest.raises(SystemExit) as e:
        script.main([*argv, *TP2_RAY, "--model-dir", "/tmp/x"])
    message = str(e.value)
    assert "--distributed-executor-backend ray: Ray is not importable" in message and "\n" not in message
    assert started == []
    harness.check_parallel_args(argparse.Namespace(distributed_executor_backend="mp"))  # mp needs no Ray


@pytest.mark.parametrize("script,argv", SCRIPTS)
def test_summary_records_and_header_prints_the_parallelism(monkeypatch, capsys, tmp_path, script, argv):
    def worker(module, backend, wargv, env):
        run = {"backend": backend, "attention_impls": [], "device": "H100", "vllm": "0.26.0", "engine": {}}
        if script is gpu_sparse_prefill:
            return {**run, "ttft_s": {"131072": [1.0]}, "density": {}, "chunks": {}, "two_turn": {}}
        stats = {"sparse_tokens": 1, "summary_layers": 32, "blocks_read": 1, "blocks_total": 10}
        return {**run, "attention_impls": ["KvplugAttentionImpl"] if backend == "CUSTOM" else [],
                "tpot_s": {"131072": [0.02]}, "throughput_tok_s": {}, "stats": {"tpot": stats},
                "timings": {"131072": [{"prefill_s": 10.0, "t1_s": 0.1, "tn_s": 2.6}]}}

    monkeypatch.setattr(harness, "run_worker", worker)
    import json

    out = tmp_path / "r.json"
    assert script.main([*argv, *TP2_RAY, "--model-dir", "/tmp/x", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert (summary["tensor_parallel_size"], summary["distributed_executor_backend"]) == (2, "ray")
    assert "TP 2 (ray)" in capsys.readouterr().out
    assert script.main([*argv, "--model-dir", "/tmp/x", "--out", str(out)]) == 0
    summary = json.loads(out.read_text())["summary"]
    assert (summary["tensor_parallel_size"], summary["distributed_executor_backend"]) == (1, None)
    assert "TP 1 " in capsys.readouterr().out


def test_auto_kv_cache_is_per_gpu_with_tensor_parallelism(tmp_path):
    """vLLM's kv_cache_memory_bytes is per GPU: at TP=2 each GPU holds half of Llama-3-8B's 8 KV heads."""
    cfg = write_shape("llama-3-8b", tmp_path) / "config.json"
    a = argparse.Namespace(phases="tpot", lengths="131072", batch=16, batch_len=32768, decode_tokens=128)
    one, two = (gpu_retrieval_decode.auto_kv_cache_gib(a, cfg, None, tp) for tp in (1, 2))
    assert two == pytest.approx(one / 2, abs=0.1)
    assert gpu_retrieval_decode.auto_kv_cache_gib(a, cfg, None, 16) == pytest.approx(one / 8, abs=0.1)  # 1 head each
    # 16 x 32K (64 GiB of KV) is capped on one 80 GB card; at TP=2 each card's half (and half the weights) fits
    b = argparse.Namespace(phases="throughput", lengths="131072", batch=16, batch_len=32768, decode_tokens=128)
    need = {tp: gpu_retrieval_decode.auto_kv_cache_gib(b, cfg, None, tp) for tp in (1, 2)}
    assert gpu_retrieval_decode.auto_kv_cache_gib(b, cfg, 80.0, 1) < need[1]
    assert gpu_retrieval_decode.auto_kv_cache_gib(b, cfg, 80.0, 2) == need[2]


def test_engine_facts_record_the_parallelism_vllm_ran():
    """What vLLM really took (its own executor choice when none was passed; a class is recorded by its name)."""
    from types import SimpleNamespace as NS

    class RayDistributedExecutor:
        pass

    def facts(backend):
        cfg = NS(compilation_config=NS(cudagraph_mode="FULL"), cache_config=NS(block_size=16, num_gpu_blocks=8),
                 model_config=NS(), scheduler_config=NS(),
                 parallel_config=NS(tensor_parallel_size=2, distributed_executor_backend=backend))
        f = harness.engine_facts(NS(llm_engine=NS(vllm_config=cfg)))
        return f["tensor_parallel_size"], f["distributed_executor_backend"]

    assert facts("mp") == (2, "mp")
    assert facts(RayDistributedExecutor) == (2, "RayDistributedExecutor")
    assert facts(None) == (2, None)
