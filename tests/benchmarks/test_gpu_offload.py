"""benchmarks/gpu_offload.py's peer modes (LMCache) without a GPU: mode names, each mode's environment, and
what a result records when LMCache cannot import or its compiled ops cannot load. A fake ``lmcache`` package
in a staged-layout folder stands in for the real one (the probe runs in a real subprocess)."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

import pytest

from benchmarks import gpu_offload, harness
from benchmarks.peers import lmcache

UNDEFINED = "undefined symbol: _ZN3c1019NotImplementedErrorC1ENS_14SourceLocationE"


# These tests are about other things than LMCache #4463 (tests/benchmarks/test_peers_lmcache.py tests it).
pytestmark = pytest.mark.usefixtures("vllm_before_packed_kv")


def _args(tmp_path: Path, cpu_gib: float = 48.0) -> argparse.Namespace:
    return argparse.Namespace(cpu_gib=cpu_gib, lmcache_root=str(tmp_path))


def _fake_lmcache(root: Path, version: str, init: str = "", ops: str = "") -> Path:
    """A staged-layout fake: root/lmcache-<version>/lmcache with an ops module, the vLLM adapter module and a
    config class that reads the LMCACHE_* variables as LMCache's does."""
    pkg = root / f"lmcache-{version}" / "lmcache"
    (pkg / "integration" / "vllm").mkdir(parents=True)
    (pkg / "v1").mkdir()
    (root / "lmcache-deps").mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(init or f"__version__ = {version!r}\n")
    for sub in ("integration", "integration/vllm", "v1"):
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "integration" / "vllm" / "vllm_v1_adapter.py").write_text("")
    (pkg / "cuda_ops.py").write_text(ops)
    (pkg / "v1" / "config.py").write_text(textwrap.dedent("""
        import os

        class LMCacheEngineConfig:
            @classmethod
            def from_env(cls):
                c = cls()
                c.chunk_size = int(os.environ.get("LMCACHE_CHUNK_SIZE", "256"))
                c.local_cpu = os.environ.get("LMCACHE_LOCAL_CPU", "True") == "True"
                c.max_local_cpu_size = float(os.environ.get("LMCACHE_MAX_LOCAL_CPU_SIZE", "5.0"))
                c.local_disk = os.environ.get("LMCACHE_LOCAL_DISK")
                return c
    """))
    return pkg


@pytest.fixture
def no_worker(monkeypatch):
    """Fails the test if a mode starts an engine worker."""
    def worker(*a, **k):
        raise AssertionError("an engine worker was started")
    monkeypatch.setattr(harness, "run_worker", worker)


def test_lmcache_mode_names():
    assert lmcache.lmcache_version("lmcache") is None
    assert lmcache.lmcache_version("lmcache-0.5.6") == "0.5.6"
    assert lmcache.lmcache_version("lmcache-0.3.10.post2") == "0.3.10.post2"
    for bad in ("lmcache-", "lmcache-latest", "lmcachex", "native"):
        assert not lmcache.is_lmcache(bad)
    for good in ("none", "native", "int8", "lmcache", "lmcache-0.5.3"):
        gpu_offload.check_mode(good)
    with pytest.raises(ValueError, match="unknown mode 'lmcache-latest'"):
        gpu_offload.check_mode("lmcache-latest")


def test_unknown_mode_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_offload.main(["--modes", "int8,lmcache-new"])
    assert exc.value.code == 2
    assert "unknown mode 'lmcache-new'" in capsys.readouterr().err


def test_lmcache_env_is_exactly_the_budget(tmp_path):
    base = {"PYTHONPATH": "/repo", "LMCACHE_CONFIG_FILE": "/etc/lmc.yaml", "LMCACHE_LOCAL_DISK": "file:///d",
            "KEEP": "1"}
    env = gpu_offload.mode_env("lmcache-0.5.3", _args(tmp_path, 48.0), base)
    assert env["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "48.0" and env["LMCACHE_LOCAL_CPU"] == "True"
    assert env["LMCACHE_CHUNK_SIZE"] == "256" and env["LMCACHE_MAX_LOCAL_DISK_SIZE"] == "0"
    assert env["LMCACHE_TRACK_USAGE"] == "false"  # no network on the GPU host
    assert "LMCACHE_CONFIG_FILE" not in env and "LMCACHE_LOCAL_DISK" not in env  # nothing inherited decides
    assert env["KEEP"] == "1"
    assert env["PYTHONPATH"].split(":") == [str(tmp_path / "lmcache-0.5.3"), str(tmp_path / "lmcache-deps"), "/repo"]
    assert base["LMCACHE_CONFIG_FILE"] == "/etc/lmc.yaml"  # the caller's dict is untouched
    assert gpu_offload.mode_env("lmcache", _args(tmp_path), base)["PYTHONPATH"] == "/repo"
    assert lmcache.lmcache_transfer_config() == {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    assert env["LMCACHE_LOG_LEVEL"] == "INFO"  # its per-request lines are the evidence the result records


def test_model_runner_flag_puts_every_mode_on_that_runner(tmp_path):
    args = _args(tmp_path)
    for mode in ("lmcache-0.5.3", "int8", "native", "none"):
        assert "VLLM_USE_V2_MODEL_RUNNER" not in gpu_offload.mode_env(mode, args, {})  # default: vLLM decides
        args.model_runner = "v1"
        assert gpu_offload.mode_env(mode, args, {})["VLLM_USE_V2_MODEL_RUNNER"] == "0"
        args.model_runner = "v2"
        assert gpu_offload.mode_env(mode, args, {"VLLM_USE_V2_MODEL_RUNNER": "0"})["VLLM_USE_V2_MODEL_RUNNER"] == "1"
        del args.model_runner


def test_kvplug_and_native_modes_get_no_lmcache_config(tmp_path):
    env = gpu_offload.mode_env("int8", _args(tmp_path, 48.0), {"PYTHONPATH": "/repo"})
    assert env["KVPLUG_OFFLOAD__CPU_SIZE"] == "48.0GiB" and env["KVPLUG_CACHE_POLICY__DEFAULT"] == "quant:int8"
    assert not [k for k in env if k.startswith("LMCACHE_")]
    assert gpu_offload.mode_env("native", _args(tmp_path), {"A": "b"}) == {"A": "b"}


def test_unstaged_lmcache_is_recorded_not_run(tmp_path, no_worker):
    r = gpu_offload.run_mode("lmcache-0.5.6", _args(tmp_path), [], {})
    assert r["mode"] == "lmcache-0.5.6"
    assert str(tmp_path / "lmcache-0.5.6") in r["error"] and "stage-lmcache.sh" in r["error"]


def test_lmcache_import_error_is_recorded_exactly(tmp_path, no_worker):
    _fake_lmcache(tmp_path, "9.9.1", init=f"raise ImportError({UNDEFINED!r})\n")
    args = _args(tmp_path)
    env = gpu_offload.mode_env("lmcache-9.9.1", args, harness.engine_env(clear_config=True))
    r = gpu_offload.run_mode("lmcache-9.9.1", args, [], env)
    assert r["error"] == f"ImportError: {UNDEFINED}"
    import torch

    assert r["lmcache"] == {"torch": torch.__version__, "import_error": f"ImportError: {UNDEFINED}"}


def test_ops_that_do_not_load_are_recorded_and_the_mode_still_runs(tmp_path, monkeypatch):
    _fake_lmcache(tmp_path, "9.9.2", ops=f"raise ImportError({UNDEFINED!r})\n")
    args = _args(tmp_path, 12.5)
    env = gpu_offload.mode_env("lmcache-9.9.2", args, harness.engine_env(clear_config=True))
    started = []

    def worker(module, mode, argv, wenv, stderr_tail=0, timeout=None, on_line=None):
        started.append((mode, wenv["LMCACHE_MAX_LOCAL_CPU_SIZE"], stderr_tail))
        raise SystemExit(f"{mode} run failed (exit 1)\nRuntimeError: Engine core initialization failed.")

    monkeypatch.setattr(harness, "run_worker", worker)
    r = gpu_offload.run_mode("lmcache-9.9.2", args, [], env)
    assert started == [("lmcache-9.9.2", "12.5", gpu_offload.STDERR_TAIL)]  # LMCache falls back to torch ops
    probe = r["lmcache"]
    assert probe["version"] == "9.9.2" and probe["path"] == str(tmp_path / "lmcache-9.9.2" / "lmcache")
    assert probe["ops_module"] == "lmcache.cuda_ops" and probe["ops_loaded"] is False
    assert probe["ops_error"] == f"ImportError: {UNDEFINED}"
    # the probe read the configuration the mode's environment gives it
    assert probe["config"]["max_local_cpu_size"] == 12.5 and probe["config"]["chunk_size"] == 256
    assert probe["config"]["local_disk"] is None
    assert "Engine core initialization failed" in r["error"]


def test_main_records_every_lmcache_failure_and_goes_on(tmp_path, no_worker, capsys):
    _fake_lmcache(tmp_path, "9.9.3", init=f"raise ImportError({UNDEFINED!r})\n")
    out = tmp_path / "res.json"
    out.write_text(json.dumps({"runs": [{"mode": "int8", "follow_up_p50_s": 0.2, "follow_up_p99_s": 0.3,
                                         "follow_up_cached_fraction": 1.0, "first_turn_p50_s": 1.3}]}))
    rc = gpu_offload.main(["--modes", "lmcache-9.9.3,lmcache-0.0.1", "--lmcache-root", str(tmp_path),
                           "--contexts", "4", "--context-tokens", "4096", "--fit-contexts", "2", "--out", str(out)])
    assert rc == 0
    runs = {r["mode"]: r for r in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"int8", "lmcache-9.9.3", "lmcache-0.0.1"}  # the earlier int8 run is kept
    assert runs["lmcache-9.9.3"]["error"] == f"ImportError: {UNDEFINED}"
    assert "not found" in runs["lmcache-0.0.1"]["error"]
    table = capsys.readouterr().out
    assert f"| lmcache-9.9.3 | failed: ImportError: {UNDEFINED}" in table


def test_table_compares_with_the_fastest_lmcache_and_flags_fallback_ops():
    def run(mode, p50, **kw):
        return {"mode": mode, "follow_up_p50_s": p50, "follow_up_p99_s": p50, "follow_up_cached_fraction": 1.0,
                "first_turn_p50_s": 1.0, "startup_s": 70.0, **kw}

    table = gpu_offload._table([run("int8", 0.2), run("lmcache-0.5.6", 0.8, lmcache={"ops_loaded": False}),
                                run("lmcache-0.5.3", 0.4, lmcache={"ops_loaded": True}),
                                {"mode": "native", "error": "native run failed (exit 1)\nOSError: no memory"}])
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in table.splitlines()[2:]}
    assert rows["int8"].endswith("| 2.00x |")  # against lmcache-0.5.3, the faster peer run
    assert "(torch fallback ops)" not in rows["lmcache-0.5.3"]
    assert rows["native"].startswith("| native | failed: OSError: no memory |")
    assert list(rows) == ["native", "int8", "lmcache-0.5.3", "lmcache-0.5.6 (torch fallback ops)"]


# --- --together (issue 17: sparse prefill + retrieval decode + the CPU tier in one engine) -------------------

def test_together_runs_keep_with_both_attention_features_in_the_workers_config(monkeypatch, tmp_path):
    seen = {}

    def worker(module, mode, argv, env, **kw):
        seen.update(mode=mode, argv=list(argv), env=env)
        return {"mode": mode, "error": "not run"}

    monkeypatch.setattr(harness, "run_worker", worker)
    out = tmp_path / "t.json"
    assert gpu_offload.main(["--together", "--set", "retrieval_decode.budget_tokens=1024", "--out", str(out)]) == 0
    assert seen["mode"] == "keep" and json.loads(out.read_text())["runs"][0]["mode"] == "keep"
    argv = seen["argv"]
    assert argv[argv.index("--context-tokens") + 1] == "16384" and argv[argv.index("--max-tokens") + 1] == "16"
    assert "--agreement" in argv and "--eager" not in argv  # CUDA graphs on
    from kvplug import settings

    cfg = settings.from_process_env(seen["env"])  # what every engine process will read
    assert cfg.offload.enabled and cfg.sparse_prefill.enabled and cfg.retrieval_decode.enabled
    assert cfg.sparse_prefill.min_prompt_tokens == 4096 and cfg.retrieval_decode.budget_tokens == 1024


def test_together_set_with_a_bad_key_is_a_usage_error_naming_it(capsys, no_worker):
    with pytest.raises(SystemExit) as exc:
        gpu_offload.main(["--together", "--set", "retrieval_decode.budget=3"])
    assert exc.value.code == 2 and "unknown key 'retrieval_decode.budget'" in capsys.readouterr().err


def _summary(refreshed=30 * 64, loaded=64, agreement=None, **turn1):
    turn1 = {"prefill_chunks": {"sparse/threshold": 3, "dense/below_floor": 4}, **turn1}
    follow = {"retrieval_decode_tokens": 60, "refreshed_summaries": refreshed}
    return gpu_offload.together_summary(turn1, follow, loaded, 30, agreement)


def test_together_verdict_needs_every_piece_of_evidence():
    ok = {"compared": 4, "same_hit": 4, "greedy_ids_equal": 4}
    assert _summary(agreement=ok)["verdict"] == "ok"
    assert _summary()["refreshed_per_loaded_block"] == 30
    assert "no prefill chunk went sparse" in _summary(prefill_chunks={"dense/threshold": 5})["verdict"]
    assert "no follow-up loaded blocks" in _summary(loaded=0, refreshed=0)["verdict"]
    assert "0 block summaries refreshed" in _summary(refreshed=0)["verdict"]
    assert "greedy ids of 1/4" in _summary(agreement=dict(ok, greedy_ids_equal=3))["verdict"]
    assert "hit lengths differ" in _summary(agreement=dict(ok, same_hit=2))["verdict"]


def test_counts_delta_subtracts_nested_counters():
    before = {"prefill_chunks": {"sparse/threshold": 2}, "refreshed_summaries": 10, "name": "x"}
    after = {"prefill_chunks": {"sparse/threshold": 5, "dense/threshold": 1}, "refreshed_summaries": 40, "name": "x"}
    assert gpu_offload.counts_delta(after, before) == {
        "prefill_chunks": {"sparse/threshold": 3, "dense/threshold": 1}, "refreshed_summaries": 30}


def test_agreement_compares_ids_and_the_logprobs_of_equal_ids():
    from types import SimpleNamespace as NS

    def out(ids, lps):
        return NS(token_ids=ids, logprobs=[{t: NS(logprob=lp)} for t, lp in zip(ids, lps)])

    refs = [(0.1, 4096, out([5, 6], [-0.5, -1.0])), (0.1, 4096, out([7, 8], [-0.1, -0.2]))]
    again = [(0.2, 4096, out([5, 6], [-0.5, -1.25])), (0.2, 4080, out([7, 9], [-0.1, -3.0]))]
    a = gpu_offload.agreement(refs, again)
    assert (a["compared"], a["same_hit"], a["greedy_ids_equal"]) == (2, 1, 1)
    assert a["max_abs_logprob_diff"] == 0.25  # over the pair whose ids agree only


# --- LMCache's own evidence (its log lines) and why a mode was a no-op -----------------------------------------

# LMCache 0.5.3's INFO lines as the engine core prints them (vLLM's process prefix, LMCache's colour codes)
LOOKUP = ("(EngineCore_DP0 pid=7) \x1b[32;20m[2026-12-07 10:31:02,001] LMCache INFO:\x1b[0m Reqid: {r}, Total tokens "
          "32802, Inference Engine computed tokens: 0, LMCache hit tokens: {hit}, need to load: {load} "
          "\x1b[3m(vllm_v1_adapter.py:1475:lmcache.integration.vllm.vllm_v1_adapter)\x1b[0m")
STORED = ("(EngineCore_DP0 pid=7) [2026-12-07 10:31:02,101] LMCache INFO: [req_id={r}] Stored {n} out of total {n} "
          "tokens. size: 2.0000 GB, cost 80.1 ms, throughput: 24.9 GB/s; offload_time: 79.0 ms, put_time: 1.1 ms")
RETRIEVED = ("(EngineCore_DP0 pid=7) [2026-12-07 10:31:05,001] LMCache INFO: [req_id={r}] Retrieved {n} out of {n} "
             "required tokens (from 32802 total tokens). size: 4.0000 gb, cost 150.0 ms, throughput: 26.6 GB/s;")
PRESSURE = ("[2026-12-07 10:31:02,101] LMCache WARNING: Local cpu memory under pressure so choosing to store only  "
            "3 total chunks of KV cache.")
ERROR = "\x1b[31;20m[2026-12-07 10:31:02,101] LMCache ERROR:\x1b[0m Num retrieved tokens: 0, num expected tokens: 256"


def _log(*phases: list[str]) -> dict:
    log = lmcache.LMCacheLog()
    for name, lines in zip(lmcache.PHASES, phases):
        log.feed(lmcache.PHASE_MARK + name)
        for line in lines:
            log.feed(line)
    return log.counts


def test_lmcache_log_counts_lookups_stores_and_retrieves_per_phase():
    counts = _log([STORED.format(r=0, n=512)],
                  [LOOKUP.format(r=1, hit=0, load=0), STORED.format(r=1, n=16384), STORED.format(r=1, n=16384),
                   PRESSURE, "INFO 12-07 vLLM: unrelated"],
                  [LOOKUP.format(r=2, hit=32768, load=32768), RETRIEVED.format(r=2, n=32768),
                   LOOKUP.format(r=3, hit=0, load=0), ERROR])
    assert counts["startup"]["stored_tokens"] == 512
    t1, fu = counts["turn1"], counts["follow_ups"]
    assert (t1["lookups"], t1["lookup_hit_tokens"], t1["stores"], t1["stored_tokens"], t1["memory_pressure"]) == (
        1, 0, 2, 32768, 1)
    assert (fu["lookups"], fu["lookups_with_hit"], fu["lookup_hit_tokens"]) == (2, 1, 32768)
    assert (fu["retrieves"], fu["retrieved_tokens"], fu["errors"], fu["stores"]) == (1, 32768, 1, 0)
    # the layerwise engine's wording counts too
    layerwise = "LMCache INFO: [req_id=x] Retrieved 256 out of 256 out of total 32802 tokens"
    assert _log([], [], [layerwise])["follow_ups"]["retrieved_tokens"] == 256


def _no_op(log: dict | None = None, held: int = 12, contexts: int = 16, **kw) -> str | None:
    r = {"mode": "lmcache-0.5.3", "no_op": True, "contexts_held": held, **kw}
    if log is not None:
        r["lmcache_log"] = log
    return lmcache.no_op_reason(r, contexts)


def test_no_op_reason_from_lmcaches_log():
    turn1 = [LOOKUP.format(r=i, hit=0, load=0) for i in range(16)] + [STORED.format(r=i, n=32768) for i in range(16)]
    misses = [LOOKUP.format(r=i, hit=0, load=0) for i in range(16)]
    # today's H100 run: stored every context, every follow-up missed, 12 of 16 held -> eviction by design
    why = _no_op(_log([], turn1, misses))
    assert why.startswith("LMCache stored 524288 tokens in turn 1, but its 16 follow-up lookups hit 0 tokens: "
                          "its CPU budget holds 12 of the 16 contexts")
    assert "keys differ" in _no_op(_log([], turn1, misses), held=16)  # all held and still no hit: a real fault
    assert "not consulted" in _no_op(_log([], [], []))
    assert _no_op(_log([], [LOOKUP.format(r=1, hit=0, load=0), PRESSURE], misses)).startswith(
        "LMCache stored nothing in turn 1 (1 lookups, 0 errors; 1 memory-pressure warnings)")
    hits = [LOOKUP.format(r=1, hit=32768, load=32768)]
    assert "hit 32768 tokens but it retrieved none" in _no_op(_log([], turn1, hits))


def test_no_op_reason_without_a_log_and_for_modes_that_hit():
    assert "holds 12 of the 16 contexts" in lmcache.no_op_reason(
        {"mode": "native", "no_op": True, "contexts_held": 12}, 16)
    assert lmcache.no_op_reason({"mode": "native", "no_op": True, "contexts_held": 12}, 10) == (
        "no follow-up got cached tokens and the connector loaded no block")
    assert lmcache.no_op_reason({"mode": "int8", "no_op": False, "contexts_held": 21}, 16) is None


def _fake_worker(monkeypatch, lines: list[str], result: dict) -> None:
    """The engine worker replaced by a process that prints ``lines`` on stderr, then ``result``."""
    code = (f"import sys, json\nfor ln in {lines!r}: print(ln, file=sys.stderr, flush=True)\n"
            f"print('RESULT ' + json.dumps({result!r}))")

    def worker(module, mode, argv, wenv, stderr_tail=0, timeout=None, on_line=None):
        return harness.run_result_process([sys.executable, "-c", code], wenv, "w failed", stderr_tail=stderr_tail,
                                          on_line=on_line)

    monkeypatch.setattr(harness, "run_worker", worker)


def test_run_mode_records_lmcaches_log_from_the_workers_stderr(tmp_path, monkeypatch):
    """The worker's stderr (engine log lines included) reaches LMCacheLog through harness.run_result_process."""
    _fake_lmcache(tmp_path, "9.9.4")
    args = argparse.Namespace(cpu_gib=48.0, lmcache_root=str(tmp_path), contexts=16)
    env = gpu_offload.mode_env("lmcache-9.9.4", args, harness.engine_env(clear_config=True))
    result = {"mode": "lmcache-9.9.4", "follow_up_p50_s": 1.3, "follow_up_cached_fraction": 0.0, "no_op": True,
              "contexts_held": 12}
    lines = [lmcache.PHASE_MARK + "turn1", STORED.format(r=1, n=32768), lmcache.PHASE_MARK + "follow_ups",
             LOOKUP.format(r=2, hit=0, load=0)]
    _fake_worker(monkeypatch, lines, result)
    r = gpu_offload.run_mode("lmcache-9.9.4", args, [], env)
    assert r["lmcache_log"]["turn1"]["stored_tokens"] == 32768 and r["lmcache_log"]["follow_ups"]["lookups"] == 1
    assert "holds 12 of the 16 contexts" in r["no_op_reason"]
    table = gpu_offload._table([{**r, "follow_up_p99_s": 1.4, "first_turn_p50_s": 1.3,
                                 "engine": {"block_size": 16, "v2_model_runner": False}}])
    row = table.splitlines()[2]
    assert row.startswith("| lmcache-9.9.4 (NO-OP) [V1 runner] | 12 |") and "| 0/0 (its log) |" in row
    assert table.splitlines()[-1] == f"NO-OP lmcache-9.9.4: {r['no_op_reason']}"
    assert gpu_offload.no_ops([r]) == {"lmcache-9.9.4": r["no_op_reason"]}


def test_modes_whose_budget_is_short_are_named_before_they_run(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(harness, "run_worker", lambda module, mode, *a, **k: {"mode": mode, "error": "not run"})
    gpu_offload.main(["--modes", "native,int8", "--contexts", "16", "--cpu-gib", "48", "--out", str(tmp_path / "o.json")])
    err = capsys.readouterr().err
    assert "native: the budget holds fewer than 16 contexts" in err  # 12 at full precision; int8 holds 21
    gpu_offload.main(["--modes", "native,int8", "--contexts", "10", "--cpu-gib", "48", "--out", str(tmp_path / "o.json")])
    assert "holds fewer than" not in capsys.readouterr().err


# --- what served each follow-up: the connector's load vs vLLM's GPU prefix cache ---------------------------

CTX = 32768


def _served(mode: str, ttft: list[float], loaded: list[int], cached: list[int] | None = None) -> dict:
    cached = cached or [CTX] * len(loaded)
    r = {"mode": mode, "follow_up_ttft_s": ttft, "follow_up_p50_s": sorted(ttft)[len(ttft) // 2],
         "follow_up_p99_s": max(ttft), "follow_up_cached_fraction": 1.0, "first_turn_p50_s": 1.0, "startup_s": 70.0,
         "context_tokens": CTX, "follow_up_cached_tokens": cached, "follow_up_loaded_tokens": loaded,
         "follow_up_gpu_hit_tokens": [c - n for c, n in zip(cached, loaded)]}
    return {**r, **gpu_offload.follow_up_sources(r)}


def test_follow_up_sources_separate_loads_from_gpu_hits_and_flag_the_mixed_run():
    # today's H100 int8 row: 4 contexts loaded (the last partly a GPU hit), 6 served by vLLM's prefix cache
    int8 = _served("int8", [0.508, 0.174, 0.202, 0.174] + [0.072] * 6,
                   [CTX, CTX, CTX, 2035 * 16] + [0] * 6)
    keep = _served("keep", [0.161] * 10, [CTX] * 10)
    assert int8["follow_up_sources"] == ["load"] * 4 + ["gpu"] * 6
    assert int8["follow_up_load_p50_s"] == pytest.approx((0.174 + 0.202) / 2)
    assert keep["follow_up_sources"] == ["load"] * 10 and keep["follow_up_load_p50_s"] == pytest.approx(0.161)
    warnings = gpu_offload.like_for_like_warnings([keep, int8])
    assert warnings[0].startswith("NOT LIKE-FOR-LIKE int8: its follow-ups were served by different sources "
                                  "(4 load, 6 gpu)") and "connector loaded: 0.188 s" in warnings[0]
    assert warnings[1].startswith("NOT LIKE-FOR-LIKE across modes: most follow-ups were served by load (keep), "
                                  "gpu (int8)")
    assert gpu_offload.like_for_like_warnings([keep, _served("lmcache-0.5.3", [0.106] * 10, [CTX] * 10)]) == []
    rows = {ln.split(" | ")[0].lstrip("| "): ln for ln in gpu_offload._table([keep, int8]).splitlines()[2:4]}
    assert "| 4 (" in rows["int8"] and f"| 4 ({(3 * CTX + 2035 * 16) // 1024}K) / 6 ({6 * CTX // 1024 + 0}K) | 0.188 |" in rows["int8"]
    assert "| 10 (320K) / 0 (0K) | 0.161 |" in rows["keep"]
    assert gpu_offload._table([keep, int8]).splitlines()[-1].startswith("NOT LIKE-FOR-LIKE across modes")


def test_recomputed_and_mixed_follow_ups_are_neither_loads_nor_hits():
    r = _served("keep", [1.2, 0.5], [0, CTX // 4], cached=[0, CTX // 2])
    assert r["follow_up_sources"] == ["recompute", "mixed"] and r["follow_up_load_p50_s"] is None


def test_lmcache_log_counts_what_it_retrieved_per_follow_up(tmp_path, monkeypatch):
    """LMCache has no load counter we can read: its 'Retrieved' lines between the worker's follow-up marks are
    what its connector loaded for that follow-up; the rest of vLLM's cached tokens were GPU hits."""
    _fake_lmcache(tmp_path, "9.9.5")
    args = argparse.Namespace(cpu_gib=48.0, lmcache_root=str(tmp_path), contexts=3)
    env = gpu_offload.mode_env("lmcache-9.9.5", args, harness.engine_env(clear_config=True))
    result = {"mode": "lmcache-9.9.5", "follow_up_p50_s": 0.1, "follow_up_ttft_s": [0.1, 0.1, 0.05],
              "follow_up_cached_tokens": [CTX, CTX, CTX], "follow_up_cached_fraction": 1.0, "no_op": False,
              "context_tokens": CTX}
    mark = lmcache.FOLLOW_UP_MARK
    lines = [lmcache.PHASE_MARK + "turn1", RETRIEVED.format(r=0, n=512), lmcache.PHASE_MARK + "follow_ups",
             mark + "0", RETRIEVED.format(r=1, n=CTX // 2), RETRIEVED.format(r=1, n=CTX // 2), mark + "1",
             RETRIEVED.format(r=2, n=CTX), mark + "2"]
    _fake_worker(monkeypatch, lines, result)
    r = gpu_offload.run_mode("lmcache-9.9.5", args, [], env)
    assert r["follow_up_loaded_tokens"] == [CTX, CTX, 0] and r["follow_up_gpu_hit_tokens"] == [0, 0, CTX]
    assert r["follow_up_sources"] == ["load", "load", "gpu"] and r["follow_up_load_p50_s"] == 0.1


def test_reset_gpu_cache_reaches_the_worker(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(harness, "run_worker", lambda module, mode, argv, *a, **k: seen.append(argv) or
                        {"mode": mode, "error": "not run"})
    gpu_offload.main(["--modes", "keep", "--contexts", "4", "--context-tokens", "4096", "--fit-contexts", "2",
                      "--reset-gpu-cache", "--out", str(tmp_path / "r.json")])
    assert "--reset-gpu-cache" in seen[0]
