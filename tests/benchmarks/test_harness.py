"""benchmarks/harness.py: what a worker process that died leaves in the parent's error."""

from __future__ import annotations

import os
import sys
import time

import pytest

from benchmarks import harness

CHILD = ("import sys; print('loading', file=sys.stderr); print('noise'); "
         "print('ImportError: libc10.so: undefined symbol: _ZN3c10X', file=sys.stderr); "
         "print('RuntimeError: Engine core initialization failed.', file=sys.stderr); "
         "print('bye', file=sys.stderr); sys.exit(3)")


def test_stderr_tail_names_the_error_of_a_dead_worker(capfd):
    with pytest.raises(SystemExit) as exc:
        harness.run_result_process([sys.executable, "-c", CHILD], {}, "x run failed", stderr_tail=8)
    assert str(exc.value).splitlines() == ["x run failed (exit 3)", "ImportError: libc10.so: undefined symbol: "
                                           "_ZN3c10X", "RuntimeError: Engine core initialization failed."]
    err = capfd.readouterr().err
    assert "loading" in err and "bye" in err and "noise" in err  # the child's output still streams through


def test_without_tail_the_error_is_only_the_exit_code():
    with pytest.raises(SystemExit) as exc:
        harness.run_result_process([sys.executable, "-c", CHILD], {}, "x run failed")
    assert str(exc.value) == "x run failed (exit 3)"


def test_stderr_tail_returns_the_result_of_a_worker_that_succeeded():
    code = "import sys; print('warn', file=sys.stderr); print('RESULT {\"a\": 1}')"
    assert harness.run_result_process([sys.executable, "-c", code], {}, "f", stderr_tail=4) == {"a": 1}


def test_on_line_sees_every_stderr_line_of_the_child(capfd):
    seen = []
    assert harness.run_result_process([sys.executable, "-c", "import sys; print('a', file=sys.stderr); "
                                       "print('b', file=sys.stderr); print('RESULT {}')"], {}, "f",
                                      on_line=seen.append) == {}
    assert seen == ["a", "b"]
    assert "a\nb\n" in capfd.readouterr().err  # and the lines still stream through


def test_error_lines_prefers_lines_that_name_an_error():
    lines = ["a", "ValueError: x", "    raise RuntimeError(", "b", "OSError: undefined symbol: y", "c"]
    assert harness.error_lines(lines, 1) == ["OSError: undefined symbol: y"]
    assert harness.error_lines(lines, 5) == ["ValueError: x", "OSError: undefined symbol: y"]
    assert harness.error_lines(["a", "b", "c"], 2) == ["b", "c"]  # nothing marked: the last lines
    assert harness.error_lines(lines, 0) == []


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


def test_timeout_ends_the_worker_and_the_processes_it_started():
    # the worker starts a grandchild (as an engine worker starts vLLM's engine core), then hangs
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(120)']); print(f'grandchild {p.pid}', file=sys.stderr, flush=True); time.sleep(120)")
    with pytest.raises(SystemExit) as exc:
        harness.run_result_process([sys.executable, "-c", code], {}, "x run failed", timeout=3, stderr_tail=2)
    head, line = str(exc.value).splitlines()
    assert head == "x run failed (timed out after 3 s)"
    pid = int(line.split()[1])
    for _ in range(100):  # SIGKILL is delivered at once; the kernel may take a moment to reap
        if _gone(pid):
            break
        time.sleep(0.1)
    assert _gone(pid), "the grandchild outlived the timeout"


# ---- servers: kvplug serve's process tree (tests/benchmarks/fake_kvplug_serve.py stands in for it)

def _running(pids: dict[str, int]) -> list[str]:
    return [role for role, pid in pids.items() if not _gone(pid)]


def _all_pids(read_pids) -> dict[str, int]:
    for _ in range(100):  # the fake engine core writes its pid a moment after the server answers
        if len(pids := read_pids()) == 3:
            return pids
        time.sleep(0.1)
    raise AssertionError(f"the fake server's tree did not start: {read_pids()}")


def test_serve_kvplug_leaves_no_process_of_the_servers_tree(fake_kvplug_serve, monkeypatch, tmp_path):
    # the launcher dies at once on SIGTERM; the API server and engine core, in a session of their own, would stay
    monkeypatch.setenv("FAKE_SERVE_MODE", "abandon")
    with harness.serve_kvplug(["model"], tmp_path / "serve.log", timeout_s=30, stop_timeout_s=1) as server:
        assert harness.http_request("GET", server.base + "/health")[0] == 200
        assert server.command.startswith("kvplug serve model --port ")
        pids = _all_pids(fake_kvplug_serve)
        assert _running(pids) == ["launcher", "server", "core"]
    assert _running(pids) == [], "processes of the server outlived its stop"


def test_a_launcher_that_ignores_sigterm_is_killed_with_its_tree(fake_kvplug_serve, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_SERVE_MODE", "stubborn")
    with harness.kvplug_server(["model"], tmp_path / "serve.log", stop_timeout_s=1) as server:
        assert harness.health_failure(server, 30) is None
        pids = _all_pids(fake_kvplug_serve)
    assert _running(pids) == []
    assert server.proc.returncode == -9


def test_health_failure_says_why_the_server_is_not_up(fake_kvplug_serve, monkeypatch, tmp_path):
    monkeypatch.setenv("FAKE_SERVE_MODE", "exit")
    with harness.kvplug_server(["model"], tmp_path / "serve.log") as server:
        assert harness.health_failure(server, 30) == "kvplug serve exited 3 before /health answered"
    with pytest.raises(SystemExit) as exc:
        with harness.serve_kvplug(["model"], tmp_path / "serve.log", tag="t"):
            pass
    assert str(exc.value).startswith("[t] kvplug serve exited 3 before /health answered; log ")
    assert "Engine core initialization failed" in str(exc.value)  # the log's tail

    monkeypatch.setenv("FAKE_SERVE_MODE", "silent")
    with harness.kvplug_server(["model"], tmp_path / "serve.log") as server:
        assert harness.health_failure(server, 1) == "/health did not answer within 1 s"
    assert _running({"launcher": server.proc.pid}) == []


def test_stop_process_tree_ends_a_script_and_the_process_it_started(tmp_path):
    # a script whose child ignores SIGTERM (as an engine core busy in a kernel may): SIGKILL after the grace
    code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGTERM, signal.SIG_IGN); print(\"ready\", flush=True); time.sleep(120)']); "
            "time.sleep(120)")
    log = tmp_path / "log"
    proc = harness.start_session([sys.executable, "-c", code], log)
    for _ in range(100):  # the child's SIGTERM handler is in place
        if "ready" in log.read_text():
            break
        time.sleep(0.1)
    tree = harness.process_tree(proc.pid)
    assert len(tree) == 1
    harness.stop_process_tree(proc, grace_s=1)
    assert proc.returncode is not None and [p for p in tree if not _gone(p)] == []


# ------------------------------------------------------------- sparse prefill engines (replay and accuracy scripts)
# The values below are what sparse_prefill_replay.py and sparse_prefill_accuracy.py built themselves before the
# shared part moved here (checked against their code at 820460a).

def test_chat_max_model_len_leaves_room_for_the_turns_and_is_capped_by_the_positions():
    assert harness.chat_max_model_len(16000, 3, 16) == 18432  # 16784 tokens -> 17408 + 1024
    assert harness.chat_max_model_len(24000, 3, 16) == 26624
    assert harness.chat_max_model_len(8192 - 256 - 16, 1, 16) == 9216  # a multiple of 1024 stays
    assert harness.chat_max_model_len(8192 - 256 - 15, 1, 16) == 10240
    assert harness.chat_max_model_len(24000, 3, 16, positions=20000) == 20000
    assert harness.chat_max_model_len(16000, 3, 16, positions=32768) == 18432


@pytest.mark.parametrize("cuda,gpu_mem,memory", [(False, None, {"kv_cache_memory_bytes": 2 << 30}),
                                                 (False, 0.3, {"kv_cache_memory_bytes": 2 << 30}),
                                                 (True, None, {}), (True, 0.3, {"gpu_memory_utilization": 0.3})])
def test_sparse_prefill_llm_kwargs(monkeypatch, cuda, gpu_mem, memory):
    monkeypatch.setattr(harness, "cuda_available", lambda: cuda)
    monkeypatch.setattr(harness, "kvplug_attention_kwargs", lambda: {"attention_config": "kvplug"})
    assert harness.sparse_prefill_llm_kwargs("/m", 9216, 2048, True, gpu_mem) == {
        "model": "/m", "max_model_len": 9216, "seed": 0, "enable_prefix_caching": True,
        "max_num_batched_tokens": 2048, "attention_config": "kvplug", **memory}


def test_sparse_prefill_env_drops_an_inherited_config(monkeypatch):
    monkeypatch.setenv("KVPLUG_CONFIG_JSON", "{}")
    env = harness.sparse_prefill_env(4096)
    assert "KVPLUG_CONFIG_JSON" not in env and env["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    assert {k: v for k, v in env.items() if k.startswith("KVPLUG_SPARSE_PREFILL__")} == {
        "KVPLUG_SPARSE_PREFILL__ENABLED": "true", "KVPLUG_SPARSE_PREFILL__MIN_PROMPT_TOKENS": "4096",
        "KVPLUG_SPARSE_PREFILL__COST_TABLE": "none"}
    env = harness.sparse_prefill_env(8192, "auto", enabled=False, pattern_config="c.json")
    assert env["KVPLUG_SPARSE_PREFILL__ENABLED"] == "false" and env["KVPLUG_SPARSE_PREFILL__COST_TABLE"] == "auto"
    assert env["KVPLUG_SPARSE_PREFILL__PATTERN_CONFIG"] == "c.json"


def test_answer_budgets_follow_each_task_unless_max_tokens_is_given():
    """kv answers are 36-character UUIDs: 16 tokens cut them (the 2026-12-07 H100 run's dense 0.00)."""
    assert harness.answer_budgets("kv,passkey", None) == {"kv": 96, "passkey": 16}
    assert harness.answer_budgets("kv,passkey", 24) == {"kv": 24, "passkey": 24}
    assert "kv 96" in harness.task_budgets_text() and "passkey 16" in harness.task_budgets_text()


def test_count_cut_counts_finish_reason_length_and_warns_where_the_whole_answer_is_scored(capsys):
    from types import SimpleNamespace

    outs = [SimpleNamespace(outputs=[SimpleNamespace(finish_reason=r)]) for r in ("length", "stop", "length")]
    cut = harness.cut_at_budget(outs)
    assert cut == [True, False, True]
    # first_number reads the first number only: a cut answer may still score, no warning
    assert harness.count_cut("x", cut, ["first_number", "substring", "first_number"]) == 2
    assert capsys.readouterr().err == ""
    assert harness.count_cut("dense", cut, ["substring", "substring", "all_of_set"]) == 2
    assert "WARNING [dense]: 2 of 3 answers stopped at their max tokens" in capsys.readouterr().err


class _Built(Exception):
    pass


@pytest.fixture
def fake_engine(monkeypatch, tmp_path):
    """vllm.LLM recording its arguments (and the engine environment) instead of starting; a model folder whose
    config.json allows 20000 positions; 12 cases x (8000, 16000, 24000) x 3 turns of questions."""
    import vllm

    seen = {}

    def llm(**kw):
        seen.update(kw=kw, env={k: v for k, v in os.environ.items() if k.startswith(("KVPLUG", "VLLM_"))})
        raise _Built

    (tmp_path / "config.json").write_text('{"max_position_embeddings": 20000}')
    items = [{"case": f"passkey-0-{i}", "task": "passkey", "context_tokens": c, "turn": t, "messages": []}
             for i in range(12) for c in (8000, 16000, 24000) for t in range(3)]
    monkeypatch.setattr(vllm, "LLM", llm)
    monkeypatch.setattr(harness, "prepare_model", lambda name: tmp_path)
    monkeypatch.setattr(harness, "question_items", lambda *a, **k: items)
    monkeypatch.setattr(harness, "cuda_available", lambda: False)
    monkeypatch.setattr(harness, "kvplug_attention_kwargs", lambda: {})
    monkeypatch.setattr(os, "environ", dict(os.environ, KVPLUG_CONFIG_JSON="{}"))  # the replay sets its own
    return tmp_path, seen


def test_replay_engine(fake_engine):
    from benchmarks import sparse_prefill_replay as replay

    model, seen = fake_engine
    with pytest.raises(_Built):
        replay.main(["--questions", "passkey-0-4@16000,passkey-0-1@24000:2", "--min-prompt-tokens", "1024"])
    # capped by the model's positions (20000), as the accuracy bench does: vLLM refuses a longer engine
    assert seen["kw"] == {"model": str(model), "max_model_len": 20000, "seed": 0, "enable_prefix_caching": True,
                          "max_num_batched_tokens": 8192, "kv_cache_memory_bytes": 2 << 30}
    assert seen["env"] == {"KVPLUG_SPARSE_PREFILL__ENABLED": "true", "KVPLUG_SPARSE_PREFILL__COST_TABLE": "none",
                           "KVPLUG_SPARSE_PREFILL__MIN_PROMPT_TOKENS": "1024", "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
                           "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3000"}


@pytest.mark.parametrize("cuda", [False, True])
def test_accuracy_chat_engine(fake_engine, monkeypatch, cuda):
    from benchmarks import sparse_prefill_accuracy as acc

    model, seen = fake_engine
    monkeypatch.setattr(harness, "cuda_available", lambda: cuda)
    (model / "sweeps.json").write_text("[]")
    for contexts, gpu_mem, max_model_len in (("8000,16000", "0.6", 18432), ("8000,24000", "0.3", 20000)):
        args = acc._parse(["--tasks", "passkey", "--contexts", contexts, "--gpu-mem", gpu_mem, "--worker",
                           "--sweeps", str(model / "sweeps.json")])
        with pytest.raises(_Built):
            acc._worker(args)
        memory = {"gpu_memory_utilization": float(gpu_mem)} if cuda else {"kv_cache_memory_bytes": 2 << 30}
        assert seen["kw"] == {"model": str(model), "max_model_len": max_model_len, "seed": 0,
                              "enable_prefix_caching": True, "max_num_batched_tokens": 8192, **memory}
