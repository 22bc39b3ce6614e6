"""benchmarks/offload_accuracy.py without an engine: a fake LLM stands in for vLLM's."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

from benchmarks import offload_accuracy as oa
from benchmarks.peers import lmcache
from cache_policies.registry import REQUEST_POLICY_KEY


# These tests are about other things than LMCache #4463 (tests/benchmarks/test_peers_lmcache.py tests it).
pytestmark = pytest.mark.usefixtures("vllm_before_packed_kv")


class EngineDeadError(Exception):  # what vLLM raises in the front end when the EngineCore died
    pass


class DyingLLM:
    """Answers every chat until a request asks for ``dies_on``; from then on the engine is dead."""

    def __init__(self, dies_on: str, **_kw) -> None:
        self.dies_on = dies_on
        self.dead = False

    def reset_prefix_cache(self) -> bool:
        return True

    def collective_rpc(self, fn):
        if self.dead:
            raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")
        return [{"loaded": {"cpu": 0, "disk": 0}, "saved": 0, "masked": {"batches": 0}}]

    def chat(self, messages, sps, use_tqdm=False):
        policy = sps[0].extra_args["kv_transfer_params"].get(REQUEST_POLICY_KEY)
        if self.dead or policy == self.dies_on:
            self.dead = True
            raise EngineDeadError("EngineCore encountered an issue. See stack trace (above) for the root cause.")
        return [SimpleNamespace(outputs=[SimpleNamespace(text="42", finish_reason="stop")]) for _ in messages]


def test_a_dead_engine_is_one_error_line_naming_the_policy_and_turn(monkeypatch, tmp_path, capsys):
    import vllm

    monkeypatch.setattr(vllm, "LLM", lambda **kw: DyingLLM("quant:int8", **kw))
    case = SimpleNamespace(id="c0", task="passkey", context="ctx",
                           multi_turns=[SimpleNamespace(input="q?", answer="42", scorer="substring")])
    monkeypatch.setattr(oa, "_cases", lambda args, path: [case])
    monkeypatch.setattr(oa, "_env", lambda args: None)
    out = tmp_path / "r.json"
    rc = oa.main(["--model", str(tmp_path), "--turns", "1", "--policies", "keep,quant:int8,quant:int4",
                  "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and not out.exists()
    lines = [ln for ln in err.splitlines() if ln.startswith("offload_accuracy: error:")]
    assert len(lines) == 1, err
    assert "policy 'quant:int8' failed at turn 1/1: EngineDeadError" in lines[0]
    assert "Traceback" not in err


def test_other_errors_are_not_swallowed(monkeypatch, tmp_path):
    monkeypatch.setattr(oa, "run", lambda args: (_ for _ in ()).throw(ValueError("bug in the script")))
    with pytest.raises(ValueError):
        oa.main(["--out", str(tmp_path / "r.json")])


class CuttingLLM(DyingLLM):
    """Never dies; answers each request with ``max_tokens`` characters of a UUID, cut (finish_reason "length")
    where that is short of the whole UUID; records every request's max_tokens."""

    UUID = "095d6969-63a6-46cb-a001-c74dda2991e4"

    def __init__(self, **kw) -> None:
        super().__init__(dies_on="", **kw)
        self.max_tokens: list[int] = []

    def chat(self, messages, sps, use_tqdm=False):
        assert len(sps) == len(messages)  # one SamplingParams per question
        self.max_tokens += [sp.max_tokens for sp in sps]
        cut = [sp.max_tokens < len(self.UUID) for sp in sps]
        return [SimpleNamespace(outputs=[SimpleNamespace(text=self.UUID[:sp.max_tokens],
                                                         finish_reason="length" if c else "stop")])
                for sp, c in zip(sps, cut)]


@pytest.mark.parametrize("argv,budgets,cut", [([], [96, 16], 1), (["--max-tokens", "24"], [24, 24], 2)])
def test_each_question_gets_its_tasks_answer_budget_and_cut_answers_are_counted(monkeypatch, tmp_path, capsys,
                                                                                  argv, budgets, cut):
    """kv's UUID answers get the kv task's 96 tokens, passkey's its 16 (an explicit --max-tokens for all); every
    answer stopped at its budget (finish_reason "length") is counted per turn and per row, with a warning line."""
    import vllm

    llm = CuttingLLM()
    monkeypatch.setattr(vllm, "LLM", lambda **kw: llm)
    cases = [SimpleNamespace(id=f"{task}-0", task=task, context="ctx",
                             multi_turns=[SimpleNamespace(input="q?", answer=CuttingLLM.UUID, scorer="substring")])
             for task in ("kv", "passkey")]
    monkeypatch.setattr(oa, "_cases", lambda args, path: cases)
    monkeypatch.setattr(oa, "_env", lambda args: None)
    args = oa._parse(["--model", str(tmp_path), "--tasks", "kv,passkey", "--turns", "1", "--policies", "keep",
                      *argv])
    rows = oa.kvplug_rows(args, cases, tmp_path, cuda=False)
    assert llm.max_tokens == budgets * 2  # the baseline's turn, then keep's
    for row in rows:
        assert row["cut_at_max_tokens"] == cut and row["per_turn"][0]["cut_at_max_tokens"] == cut
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("WARNING")]
    assert len(warnings) == 2 and f"{cut} of 2 answers stopped at their max tokens" in warnings[0]


# --peers: other offload systems' rows in the same table (no engine here)

def _case(i: int, turns: int = 2):
    return SimpleNamespace(id=f"c{i}", task="passkey", context="ctx",
                           multi_turns=[SimpleNamespace(input=f"q{t}?", answer="42", scorer="substring")
                                        for t in range(turns)])


def test_peers_parse_and_unknown_ones_stop_before_any_engine(capsys):
    args = oa._parse(["--peers", "native,lmcache-0.5.3,lmcache", "--cpu-tier", "6GiB"])
    assert oa.peer_names(args) == ["native", "lmcache-0.5.3", "lmcache"] and oa.cpu_tier_gib(args.cpu_tier) == 6.0
    assert oa.peer_names(oa._parse([])) == []
    with pytest.raises(SystemExit):
        oa._parse(["--peers", "native,lmcache-next"])
    assert "--peers: unknown peer 'lmcache-next'" in capsys.readouterr().err


def test_a_peers_engine_has_no_kvplug_connector_and_its_own_cpu_tier(tmp_path):
    args = oa._parse(["--cpu-tier", "6GiB", "--block-size", "16", "--max-model-len", "8192"])
    shared = oa.engine_kwargs(args, tmp_path, cuda=True)
    native = oa.peer_engine_kwargs("native", args, tmp_path, cuda=True)
    assert native == {**shared, "disable_log_stats": False, "kv_offloading_size": 6.0}
    lmc = oa.peer_engine_kwargs("lmcache-0.5.3", args, tmp_path, cuda=True)
    cfg = lmc.pop("kv_transfer_config")
    assert lmc == {**shared, "disable_log_stats": False}
    expected = lmcache.lmcache_transfer_config()
    assert {k: getattr(cfg, k) for k in expected} == expected


def test_a_peers_environment_drops_kvplugs_tiers_and_gets_lmcaches_budget(tmp_path):
    args = oa._parse(["--cpu-tier", "6GiB", "--lmcache-root", str(tmp_path)])
    base = {"KVPLUG_OFFLOAD__ENABLED": "true", "KVPLUG_CONFIG_JSON": "{}", "PATH": "/bin"}
    assert oa.peer_env("native", args, base) == {"PATH": "/bin"}
    env = oa.peer_env("lmcache-0.5.3", args, base)
    assert env["LMCACHE_MAX_LOCAL_CPU_SIZE"] == "6.0" and not [k for k in env if k.startswith("KVPLUG_")]
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path / "lmcache-0.5.3")


def test_an_unstaged_lmcache_is_a_row_with_its_reason_not_a_crash(tmp_path):
    args = oa._parse(["--peers", "lmcache-0.5.3", "--lmcache-root", str(tmp_path), "--turns", "2"])
    row = oa.run_peer("lmcache-0.5.3", args, [_case(0)], [["42", "42"]])
    assert row["peer"] and str(tmp_path / "lmcache-0.5.3") in row["error"] and "stage-lmcache.sh" in row["error"]
    assert "\n" not in row["error"]


def _peer_result(monkeypatch, texts, evidence, stderr_lines=()):
    seen = {}

    def fake(cmd, env, failure, timeout=None, stderr_tail=0, on_line=None):
        seen.update(cmd=cmd, env=env)
        for line in stderr_lines:
            on_line(line)
        return {"texts": texts, "evidence": evidence, "startup_s": 1.0, "seconds": 2.0}

    monkeypatch.setattr(oa.harness, "run_result_process", fake)
    return seen


def test_a_native_peer_row_merges_into_the_table_with_points_and_its_evidence(monkeypatch, tmp_path):
    args = oa._parse(["--peers", "native", "--turns", "2", "--cases", "1", "--policies", "keep",
                      "--out", str(tmp_path / "r.json")])
    cases = [_case(0), _case(1)]
    ev = [{"external_hit_tokens": 0, "cached_tokens": 0, "prompt_tokens": 900},
          {"external_hit_tokens": 832, "cached_tokens": 864, "prompt_tokens": 950}]
    seen = _peer_result(monkeypatch, [["42", "42"], ["42", "no"]], ev)
    row = oa.run_peer("native", args, cases, [["42", "42"], ["42", "42"]])
    assert seen["cmd"][-2:] == ["--peer-worker", "native"] and "--peers" not in seen["cmd"]
    assert "--out" not in seen["cmd"] and "--turns" in seen["cmd"]
    assert not [k for k in seen["env"] if k.startswith("KVPLUG_")]
    assert row["per_turn"][1]["accuracy"] == 0.5 and row["per_turn"][1]["agreement"] == 0.5
    assert not row["offload_no_op"] and row["no_op_reason"] is None
    base = {"policy": "none", "accuracy": 1.0, "agreement": 1.0, "per_turn": [
        {"turn": t, "accuracy": 1.0, "agreement": 1.0} for t in (1, 2)], "masked_batches": 0, "offload_no_op": False}
    results = {"model": "m", "device": "cpu", "date": "d", "args": vars(args), "runs": [base, row]}
    oa.add_points(results["runs"])
    assert row["points_vs_none"] == -25.0 and row["target_points"] is None
    table = oa.markdown(results)
    assert "| native | 1.00 / 1.00 | 0.50 / 0.50 | 0.750 / 0.75 | -25.0 |  | 832 tokens (vLLM external hits) | - |" \
        in table


def test_a_peer_that_loaded_nothing_is_a_no_op_row_with_the_reason(monkeypatch):
    args = oa._parse(["--peers", "native", "--turns", "2"])
    ev = [{"external_hit_tokens": 0, "cached_tokens": 0, "prompt_tokens": 900},
          {"external_hit_tokens": 0, "cached_tokens": 32, "prompt_tokens": 950}]
    _peer_result(monkeypatch, [["42", "42"]], ev)
    row = oa.run_peer("native", args, [_case(0)], [["42", "42"]])
    assert row["offload_no_op"] and "external_prefix_cache_hits stayed 0" in row["no_op_reason"]
    results = {"model": "m", "device": "cpu", "date": "d", "args": vars(args), "runs": [
        {"policy": "none", "accuracy": 1.0, "agreement": 1.0, "offload_no_op": False, "masked_batches": 0,
         "per_turn": [{"turn": t, "accuracy": 1.0, "agreement": 1.0} for t in (1, 2)]}, row]}
    oa.add_points(results["runs"])
    table = oa.markdown(results)
    assert "| NO-OP | 0 tokens (vLLM external hits) |" in table
    assert "NO-OP native: vLLM's vllm:external_prefix_cache_hits stayed 0" in table
    # without vLLM's counter, cached tokens after the reset decide
    assert oa.peer_no_op("native", [{}, {"cached_tokens": 900, "prompt_tokens": 950}]) is None
    assert "under half" in oa.peer_no_op("native", [{}, {"cached_tokens": 32, "prompt_tokens": 950}])


def test_lmcache_evidence_is_its_own_log_per_later_turn(monkeypatch, tmp_path):
    (tmp_path / "lmcache-0.5.3").mkdir()
    monkeypatch.setattr(lmcache, "lmcache_preflight", lambda mode, root, env: ({"version": "0.5.3"}, None))
    args = oa._parse(["--peers", "lmcache-0.5.3", "--turns", "3", "--lmcache-root", str(tmp_path)])
    ev = [{"cached_tokens": 0, "prompt_tokens": 900}, {"cached_tokens": 768, "prompt_tokens": 950},
          {"cached_tokens": 768, "prompt_tokens": 990}]
    log = [lmcache.PHASE_MARK + "turn1", "LMCache INFO: Stored 768 out of total 900 tokens",
           lmcache.PHASE_MARK + "follow_ups", lmcache.FOLLOW_UP_MARK + "2",
           "LMCache INFO: Retrieved 768 out of 768 required tokens", lmcache.FOLLOW_UP_MARK + "3",
           "LMCache INFO: Retrieved 512 out of 768 required tokens"]
    _peer_result(monkeypatch, [["42", "42", "42"]], ev, log)
    row = oa.run_peer("lmcache-0.5.3", args, [_case(0, 3)], [["42", "42", "42"]])
    assert [p["lmcache_retrieved_tokens"] for p in row["per_turn"]] == [0, 768, 512]
    assert not row["offload_no_op"] and row["lmcache"] == {"version": "0.5.3"}
    assert oa.loaded_cell(row) == "1280 tokens (LMCache's log)"
    # stored but never retrieved: the LMCache library's reason
    _peer_result(monkeypatch, [["42", "42", "42"]], ev, log[:4])
    row = oa.run_peer("lmcache-0.5.3", args, [_case(0, 3)], [["42", "42", "42"]])
    assert row["offload_no_op"] and "follow-up lookups hit 0 tokens" in row["no_op_reason"]


def test_a_peer_whose_engine_failed_is_one_line_and_skipped_by_points_and_plot(monkeypatch):
    args = oa._parse(["--peers", "native", "--turns", "2"])

    def dies(cmd, env, failure, timeout=None, stderr_tail=0, on_line=None):
        raise SystemExit(f"{failure} (exit 1)\nValueError: kv_offloading_size is not supported on CPU")

    monkeypatch.setattr(oa.harness, "run_result_process", dies)
    row = oa.run_peer("native", args, [_case(0)], [["42", "42"]])
    assert row["error"] == "native run failed (exit 1): ValueError: kv_offloading_size is not supported on CPU"
    runs = [{"policy": "none", "accuracy": 1.0, "agreement": 1.0, "offload_no_op": False, "masked_batches": 0,
             "per_turn": [{"turn": t, "accuracy": 1.0, "agreement": 1.0} for t in (1, 2)]}, row]
    oa.add_points(runs)
    assert "points_vs_none" not in row
    table = oa.markdown({"model": "m", "device": "cpu", "date": "d", "args": vars(args), "runs": runs})
    assert "| native | could not run: native run failed (exit 1): ValueError: kv_offloading_size is not supported on " \
        "CPU | | | | | |" in table


def test_native_evidence_is_vllms_external_prefix_cache_hits_counter():
    metrics = [SimpleNamespace(name="vllm:prefix_cache_hits", value=900),
               SimpleNamespace(name=oa.EXTERNAL_HITS, value=832)]
    assert oa.peer_evidence(SimpleNamespace(get_metrics=lambda: metrics)) == {"external_hit_tokens": 832}
    assert oa.peer_evidence(SimpleNamespace(get_metrics=lambda: metrics[:1])) == {}

    def stats_off():
        raise AssertionError("Stat logging disabled")

    assert oa.peer_evidence(SimpleNamespace(get_metrics=stats_off)) == {}


def test_engines_start_by_spawn_unless_the_user_chose(monkeypatch):
    # On the H100 the first engine's core died ("Cannot re-initialize CUDA in forked subprocess") under fork.
    args = SimpleNamespace(streaming_window=None, snapkv_keep_ratio=None, cpu_tier="1GiB")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_WORKER_MULTIPROC_METHOD"}
    monkeypatch.setattr(os, "environ", env)  # _env writes kvplug's variables: keep them out of other tests
    oa._env(args)
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "spawn"
    env["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"
    oa._env(args)
    assert env["VLLM_WORKER_MULTIPROC_METHOD"] == "fork"
