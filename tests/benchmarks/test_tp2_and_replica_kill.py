"""benchmarks/gpu_tp2.py --bench (per-turn accuracy TP=2 vs TP=1) and benchmarks/replica_routing.py
--kill-replica-after (which replica, the requests around the kill): the pure parts, no engine."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

import pytest

from benchmarks import gpu_tp2, replica_routing


def _rec(case, turn, score=None, status="ok", start=0.0, e2e=1.0, error=None):
    return {"case_id": case, "turn": turn, "score": score, "status": status, "start": start, "e2e": e2e,
            "error": error}


def test_per_turn_pairs_questions_and_says_when_tp2_is_within_noise():
    cases = [f"c{i}" for i in range(40)]
    tp1 = [_rec(c, t, 1.0) for c in cases for t in (1, 2)]
    # turn 1: the same answers; turn 2: TP=2 loses 20 of 40, far outside noise
    tp2 = [_rec(c, 1, 1.0) for c in cases] + [_rec(c, 2, 0.0 if i < 20 else 1.0) for i, c in enumerate(cases)]
    table = gpu_tp2.per_turn_accuracy(tp1, tp2)
    assert list(table) == ["1", "2"]
    assert table["1"]["n"] == 40 and table["1"]["within_noise"]
    assert table["1"]["tp2_minus_tp1"]["mean"] == 0.0
    t2 = table["2"]
    assert t2["tp1"]["accuracy"] == 1.0 and t2["tp2"]["accuracy"] == 0.5
    assert t2["tp2_minus_tp1"]["mean"] == -0.5 and t2["tp2_minus_tp1"]["ci95"][1] < 0
    assert not t2["within_noise"]
    lo, hi = t2["tp2"]["ci95"]
    assert lo < 0.5 < hi  # Wilson interval of 20/40
    assert "| 2 | 40 |" in gpu_tp2.accuracy_table(table)


def test_per_turn_leaves_out_a_question_that_failed_in_one_run():
    tp1 = [_rec("a", 1, 1.0), _rec("b", 1, 0.0)]
    tp2 = [_rec("a", 1, 1.0), _rec("b", 1, status="error", error="HTTPStatusError: 500")]
    row = gpu_tp2.per_turn_accuracy(tp1, tp2)["1"]
    assert row["n"] == 1 and row["unpaired"] == 1
    assert row["tp1"]["accuracy"] == 1.0  # b is not in TP=1's accuracy either: the same questions on both sides


def test_serve_args_carry_sets_and_passthrough_and_the_executor_backend_only_above_tp1():
    args = argparse.Namespace(model="/m", distributed_executor_backend="ray", dtype="float16", gpu_mem=0.4,
                              sets=["sparse_prefill.enabled=true"], serve_args="--offload cpu:8GiB")
    one, two = gpu_tp2.serve_args(args, 1, 9216), gpu_tp2.serve_args(args, 2, 9216)
    assert "--distributed-executor-backend" not in one
    assert two[two.index("--distributed-executor-backend") + 1] == "ray"
    for a in (one, two):
        assert a[a.index("--set") + 1] == "sparse_prefill.enabled=true"
        assert a[a.index("--offload") + 1] == "cpu:8GiB"
        assert a[a.index("--max-model-len") + 1] == "9216"


def test_pick_replica_takes_the_busiest_healthy_one():
    reps = [{"name": "r0", "healthy": True, "in_flight": 1}, {"name": "r1", "healthy": False, "in_flight": 9},
            {"name": "r2", "healthy": True, "in_flight": 3}]
    assert replica_routing.pick_replica(reps)["name"] == "r2"
    assert replica_routing.pick_replica([{"name": "r0", "healthy": False}]) is None


def test_kill_bookkeeping_splits_requests_around_the_kill():
    records = [
        _rec("a", 1, 1.0, start=0.0, e2e=2.0),  # ended before the kill at 5 s
        _rec("b", 1, status="error", start=4.0, e2e=1.5, error="RemoteProtocolError: peer closed"),  # in flight
        _rec("c", 1, 1.0, start=4.5, e2e=3.0),  # in flight, retried elsewhere: ok
        _rec("a", 2, status="error", start=6.0, e2e=600.0, error="timeout after 600s"),  # after: hung
        _rec("b", 2, 1.0, start=7.0, e2e=1.0),
    ]
    q = replica_routing.kill_bookkeeping(records, 5.0, planned=5)
    assert q["before"] == {"total": 1, "ok": 1, "errors": 0, "cancelled": 0, "timed_out": 0}
    assert q["in_flight"] == {"total": 2, "ok": 1, "errors": 1, "cancelled": 0, "timed_out": 0}
    assert q["after"] == {"total": 2, "ok": 1, "errors": 1, "cancelled": 0, "timed_out": 1}
    assert not q["every_request_ended"]  # one request ended only by the timeout
    records[3] = _rec("a", 2, status="error", start=6.0, e2e=0.1, error="HTTPStatusError: 503")
    assert replica_routing.kill_bookkeeping(records, 5.0, planned=5)["every_request_ended"]
    assert not replica_routing.kill_bookkeeping(records, 5.0, planned=6)["every_request_ended"]  # one never issued
    assert replica_routing.kill_bookkeeping(records, None, planned=5)["before"]["total"] == 5


@pytest.fixture
def fake_replica():
    """A process in a session of its own, with a child, as serving/replicas.py starts a replica's server."""
    proc = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"],
                            start_new_session=True)
    yield proc
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _listing(monkeypatch, replicas):
    class Resp:
        def json(self):
            return {"replicas": replicas}

    monkeypatch.setattr(replica_routing.httpx, "get", lambda url, timeout: Resp())


def test_kill_replica_kills_the_listed_server_and_its_group(monkeypatch, fake_replica):
    _listing(monkeypatch, [{"name": "r0", "healthy": True, "in_flight": 0, "pid": 999999999, "url": "u0"},
                           {"name": "r1", "healthy": True, "in_flight": 2, "pid": fake_replica.pid, "url": "u1"}])
    out = replica_routing.kill_replica("http://router")
    assert out["replica"] == "r1" and out["pid"] == fake_replica.pid and out["killed_unix"] and "error" not in out
    assert fake_replica.wait(timeout=30) == -signal.SIGKILL


def test_kill_replica_leaves_a_pid_that_does_not_lead_its_group(monkeypatch):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # in pytest's group
    try:
        _listing(monkeypatch, [{"name": "r0", "healthy": True, "in_flight": 1, "pid": child.pid, "url": "u"}])
        out = replica_routing.kill_replica("http://router")
        assert out["killed_unix"] is None and "process group" in out["error"]
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_serve_and_run_kills_mid_run_and_puts_the_kill_on_the_loads_clock(monkeypatch, tmp_path):
    import contextlib
    import json
    import threading
    import types

    killed = threading.Event()
    started_unix = 1000.0

    @contextlib.contextmanager
    def serve(args, log_path, **kw):
        yield types.SimpleNamespace(base="http://router", command="kvplug serve " + " ".join(args))

    def run_mode(base, mode, out_dir, bench_args, switch=True):
        assert killed.wait(30)  # the timer fires while the bench runs
        records = [_rec("a", 1, 1.0, start=0.0, e2e=1.0), _rec("b", 1, status="error", start=4.0, e2e=2.0,
                                                              error="RemoteProtocolError: x")]
        (out_dir / "results.json").write_text(json.dumps({
            "environment": {"load_started_unix": started_unix}, "cases": [{"turns": 1}, {"turns": 1}],
            "requests": records}))
        return {"mode": mode}

    def kill(endpoint):
        killed.set()
        return {"replica": "r1", "pid": 1, "killed_unix": started_unix + 5.0}

    monkeypatch.setattr(replica_routing.harness, "serve_kvplug", serve)
    monkeypatch.setattr(replica_routing, "run_mode", run_mode)
    monkeypatch.setattr(replica_routing, "kill_replica", kill)
    monkeypatch.setattr(replica_routing.httpx, "get",
                        lambda url, timeout: types.SimpleNamespace(json=lambda: {"replicas": []}))
    run = replica_routing.serve_and_run(["--replicas", "2"], "tier-aware", tmp_path / "run", [], kill_after_s=0.01)
    k = run["kill"]
    assert k["replica"] == "r1" and k["fired"] and k["at_load_s"] == 5.0
    assert k["requests"]["before"]["total"] == 1 and k["requests"]["in_flight"]["errors"] == 1
    assert k["requests"]["every_request_ended"]
    assert "no 'planned'" in k["planned_note"]  # this results.json is an older one: the cases' turns are counted
    assert "killed r1 at 5.0 s" in replica_routing.table([{**run, "ttft_per_turn_s": {}, "prefix_cache_hit_rate": None,
                                                          "ttft_followup_s": None, "errors": 1}])


def test_kill_bookkeeping_counts_the_requests_the_bench_planned_not_the_cases_turns(monkeypatch, tmp_path,
                                                                                     fake_server):
    """A real `kvplug bench run --max-requests 4` (3 sessions x 3 turns: 9 turns) against the fake server: every
    planned request ended, which the cases' turns (9) would deny."""
    import contextlib
    import json
    import time
    import types

    from benchmarks.cli import main as bench_main

    @contextlib.contextmanager
    def serve(args, log_path, **kw):
        yield types.SimpleNamespace(base=fake_server.base_url, command="kvplug serve")

    def run_mode(base, mode, out_dir, bench_args, switch=True):
        assert bench_main(["run", "--endpoint", base, "--out", str(out_dir), "--no-progress", "--no-plots",
                           *bench_args]) == 0
        return {"mode": mode}

    monkeypatch.setattr(replica_routing.harness, "serve_kvplug", serve)
    monkeypatch.setattr(replica_routing, "run_mode", run_mode)
    monkeypatch.setattr(replica_routing, "kill_replica",
                        lambda endpoint: {"replica": "r1", "pid": 1, "killed_unix": time.time()})
    monkeypatch.setattr(replica_routing.httpx, "get",
                        lambda url, timeout: types.SimpleNamespace(json=lambda: {"replicas": []}))
    bench_args = ["--tokenizer", "approx", "--task", "kv", "--context-tokens", "400", "--turns", "3",
                  "--sessions", "3", "--max-tokens", "16", "--max-requests", "4"]
    run = replica_routing.serve_and_run([], "tier-aware", tmp_path / "run", bench_args, kill_after_s=0.0)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert sum(c["turns"] for c in results["cases"]) == 9 and results["planned"] == 4
    q = run["kill"]["requests"]
    assert q["planned"] == 4 and q["all"] == {"total": 4, "ok": 4, "errors": 0, "cancelled": 0, "timed_out": 0}
    assert q["every_request_ended"] and "planned_note" not in run["kill"]


def test_kill_bookkeeping_without_a_planned_count_judges_only_how_requests_ended():
    """--repeat until --max-seconds plans no count (None): every_request_ended looks at cancels and timeouts only."""
    records = [_rec("a", 1, 1.0), _rec("a", 2, 1.0)]
    assert replica_routing.kill_bookkeeping(records, None, planned=None)["every_request_ended"]
    records.append(_rec("a", 3, status="cancelled"))
    assert not replica_routing.kill_bookkeeping(records, None, planned=None)["every_request_ended"]


@pytest.mark.parametrize("script, option", [(gpu_tp2, "bench_dir"), (replica_routing, "runs_dir")])
def test_bulky_run_folders_default_to_a_git_ignored_folder_in_the_checkout(script, option):
    """Relative, so it exists wherever the repo is (on the device: beside $OUT, not at a root the run cannot
    write); ignored, so per-run folders never land among the committed benchmarks/results."""
    from pathlib import Path

    default = getattr(script.parser().parse_args([]), option)
    assert not Path(default).is_absolute()
    repo = Path(__file__).resolve().parents[2]
    probe = str(Path(default) / "0-run" / "results.json")
    assert subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", probe]).returncode == 0
