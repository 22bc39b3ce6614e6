"""Load runner and `kvplug bench run/compare` against an in-process fake
OpenAI SSE server on 127.0.0.1 (bounds, errors, modes, outputs)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import socket
import time

import pytest

from benchmarks.cli import main
from benchmarks.scbench.load import ArrivalClock, LoadConfig, run_load
from benchmarks.scbench.tasks import generate_cases
from benchmarks.scbench.tokenizer import approx_count


def bench(tmp_path, fake, *extra, name="run", plots=False):
    out = tmp_path / name
    argv = ["run", "--endpoint", fake.base_url, "--tokenizer", "approx", "--task", "kv",
            "--context-tokens", "400", "--turns", "3", "--sessions", "3", "--max-tokens", "16",
            "--out", str(out), "--no-progress", *extra]
    if not plots:
        argv.append("--no-plots")
    rc = main(argv)
    data = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    return rc, out, data


def test_multi_turn_end_to_end_outputs(tmp_path, fake_server, capsys):
    rc, out, data = bench(tmp_path, fake_server, "--mode", "multi-turn", plots=True)
    assert rc == 0
    s = data["summary"]
    assert s["requests"] == 9 and s["completed"] == 9 and s["errors"] == 0 and data["planned"] == 9
    assert s["accuracy"] == 1.0  # the fake answers kv questions correctly
    assert set(s["accuracy_per_turn"]) == {"1", "2", "3"}
    # prefix-cache rate from the vllm counters: the fake adds 25 hits per 100 queries
    assert s["prefix_cache_hit_rate"] == pytest.approx(0.25)
    deltas = s["metrics"]["deltas"]
    # 9 requests + the /v1/models probe does not count; the fake counts chat requests only
    assert deltas["kvplug_fake_requests_total"] == 9
    for r in data["requests"]:
        assert r["status"] == "ok" and r["ttft"] is not None and r["e2e"] >= r["ttft"]
        assert r["score"] == 1.0 and r["answer"] in r["prediction"]
        assert r["output_tokens"] >= 1 and r["prompt_tokens"] > 0
    assert {r["session"] for r in data["requests"]} == {0, 1, 2}
    for p in ("ttft_per_turn.png", "accuracy_per_turn.png", "latency_cdf.png"):
        assert (out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "summary.md").read_text()
    assert "| accuracy (ok requests) | 1.000 |" in md and "ttft_per_turn.png" in md
    assert data["command"].startswith("kvplug bench run --endpoint http://127.0.0.1:")
    assert f"- command: `{data['command']}`" in md
    assert "accuracy 1.000" in capsys.readouterr().out


def test_multi_turn_history_uses_golden_answers(tmp_path, fake_server):
    fake_server.answer = "wrong answer"
    rc, _, data = bench(tmp_path, fake_server, "--sessions", "1", "--mode", "multi-turn")
    assert rc == 0 and data["summary"]["accuracy"] == 0.0
    bodies = fake_server.bodies
    assert [len(b["messages"]) for b in bodies] == [1, 3, 5]
    golden = [r["answer"] for r in sorted(data["requests"], key=lambda r: r["turn"])]
    last = bodies[-1]["messages"]
    assert [m["role"] for m in last] == ["user", "assistant", "user", "assistant", "user"]
    assert last[1]["content"] == golden[0] and last[3]["content"] == golden[1]
    assert last[0]["content"].startswith("Extract the value")
    assert bodies[0]["stream"] is True and bodies[0]["stream_options"] == {"include_usage": True}


def test_own_answers_feed_model_replies_back(tmp_path, fake_server):
    fake_server.answer = "my own reply"
    rc, _, _ = bench(tmp_path, fake_server, "--sessions", "1", "--own-answers")
    assert rc == 0
    last = fake_server.bodies[-1]["messages"]
    assert last[1]["content"] == "my own reply" and last[3]["content"] == "my own reply"


def test_multi_request_is_concurrent_and_independent(tmp_path, fake_server):
    fake_server.first_token_delay = 0.2
    rc, _, data = bench(tmp_path, fake_server, "--mode", "multi-request", "--concurrency", "4")
    assert rc == 0
    assert all(len(b["messages"]) == 1 for b in fake_server.bodies)
    assert data["summary"]["completed"] == 9 and data["summary"]["accuracy"] == 1.0
    assert fake_server.peak_inflight == 4  # concurrent, and capped at --concurrency


def test_concurrency_limit_is_respected(tmp_path, fake_server):
    fake_server.first_token_delay = 0.05
    rc, _, _ = bench(tmp_path, fake_server, "--mode", "multi-request", "--concurrency", "2",
                     "--sessions", "4")
    assert rc == 0 and fake_server.peak_inflight == 2


def test_max_requests_stops_the_run(tmp_path, fake_server):
    rc, _, data = bench(tmp_path, fake_server, "--sessions", "5", "--max-requests", "4")
    assert rc == 0
    assert len(data["requests"]) == 4 and fake_server.requests == 4
    assert data["stop_reason"] == "max-requests"
    assert data["planned"] == 4  # not the cases' 15 turns: replica_routing's bookkeeping reads this


def test_max_seconds_stops_the_run(tmp_path, fake_server):
    fake_server.first_token_delay = 0.4
    t = time.perf_counter()
    rc, _, data = bench(tmp_path, fake_server, "--sessions", "20", "--turns", "5",
                        "--concurrency", "2", "--max-seconds", "1.0")
    elapsed = time.perf_counter() - t
    assert rc == 0
    assert data["stop_reason"] == "max-seconds"
    assert elapsed < 6  # 100 requests at 0.4 s / 2 would take 20 s
    s = data["summary"]
    assert 2 <= s["completed"] <= 6
    assert s["requests"] == s["completed"] + s["cancelled"] + s["errors"]
    assert data["summary"]["wall_s"] < 2.0


def test_server_errors_are_counted_not_fatal(tmp_path, fake_server):
    fake_server.fail_every = 3
    rc, out, data = bench(tmp_path, fake_server, "--sessions", "4", "--mode", "multi-request",
                          "--concurrency", "1")
    assert rc == 0
    s = data["summary"]
    assert s["requests"] == 12 and s["errors"] == 4 and s["completed"] == 8
    assert s["error_kinds"] == {"HTTP 500": 4}
    errs = [r for r in data["requests"] if r["status"] == "error"]
    assert all(r["http_status"] == 500 and "injected failure" in r["error"] for r in errs)
    assert all(r["score"] is None for r in errs)
    assert s["accuracy"] == 1.0 and s["accuracy_incl_errors"] == pytest.approx(8 / 12)
    assert "## Errors" in (out / "summary.md").read_text()


def test_multi_turn_session_survives_a_failed_turn(tmp_path, fake_server):
    fake_server.fail_every = 2
    rc, _, data = bench(tmp_path, fake_server, "--sessions", "1", "--turns", "3")
    assert rc == 0
    assert [r["status"] for r in sorted(data["requests"], key=lambda r: r["turn"])] == ["ok", "error", "ok"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_one_line_exit_2(tmp_path, capsys):
    port = _closed_port()
    rc = main(["run", "--endpoint", f"http://127.0.0.1:{port}", "--tokenizer", "approx",
               "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "--endpoint" in err and "\n" not in err and "Traceback" not in err


def test_connection_errors_are_recorded(tmp_path, capsys):
    port = _closed_port()
    out = tmp_path / "x"
    rc = main(["run", "--endpoint", f"http://127.0.0.1:{port}", "--model", "m", "--tokenizer",
               "approx", "--context-tokens", "300", "--sessions", "2", "--turns", "2",
               "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 1  # nothing succeeded, but no crash and the results are written
    data = json.loads((out / "results.json").read_text())
    assert data["summary"]["errors"] == 4
    assert all(r["error"].startswith("ConnectError") for r in data["requests"])
    assert data["summary"]["metrics"]["available"] is False


@pytest.mark.parametrize("argv,needle", [
    (["run", "--endpoint", "E", "--sessions", "0"], "--sessions"),
    (["run", "--endpoint", "E", "--concurrency", "x"], "--concurrency"),
    (["run", "--endpoint", "E", "--rate", "-1"], "--rate"),
    (["run", "--endpoint", "E", "--max-seconds", "0"], "--max-seconds"),
    (["run", "--endpoint", "E", "--task", "nope"], "--task"),
    (["run", "--endpoint", "E", "--mode", "both"], "--mode"),
    (["run", "--endpoint", "", "--task", "kv"], "--endpoint"),
    (["run", "--endpoint", "http://127.0.0.1:1", "--extra-body", "[1]"], "--extra-body"),
    (["run", "--endpoint", "http://127.0.0.1:1", "--extra-body", "{x"], "--extra-body"),
    (["kernels", "--iters", "0"], "--iters"),
    (["run", "--endpoint", "ftp://x"], "--endpoint"),
    (["run", "--endpoint", "http://127.0.0.1:1", "--mix", "kv,passkey"], "--mix"),
    (["run", "--endpoint", "http://127.0.0.1:1", "--task", "mixed", "--mix", "kv,zzz"], "--mix"),
    (["compare", "/nonexistent/results.json"], "/nonexistent"),
    (["kernels", "--which", "nope"], "--which"),
    (["kernels", "--shapes", "{"], "--shapes"),
    (["frobnicate"], "frobnicate"),
])
def test_bad_input_one_line_exit_2(argv, needle, capsys):
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert needle in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_context_too_small_is_bad_input(tmp_path, fake_server, capsys):
    rc = main(["run", "--endpoint", fake_server.base_url, "--tokenizer", "approx",
               "--context-tokens", "10", "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and "--context-tokens" in err[-1]


def test_poisson_rate_paces_requests(fake_server):
    cases = generate_cases("kv", seed=0, sessions=6, context_tokens=300, turns=1,
                           count_tokens=approx_count)
    cfg = LoadConfig(api_base=fake_server.base_url + "/v1", model="fake-model",
                     mode="multi-request", concurrency=8, rate=10.0, seed=3)
    out = asyncio.run(run_load(cases, cfg))
    # the arrival schedule is seeded: reproduce it
    rng = random.Random("arrivals:3")
    arrivals = [0.0]
    for _ in range(5):
        arrivals.append(arrivals[-1] + rng.expovariate(10.0))
    starts = sorted(r["start"] for r in out["records"])
    for got, want in zip(starts, arrivals):
        assert got >= want - 0.01
    assert out["wall_s"] >= arrivals[-1]
    assert math.isinf(ArrivalClock(math.inf, 0, 0).rate)


def test_compare_prints_side_by_side(tmp_path, fake_server, capsys):
    bench(tmp_path, fake_server, "--label", "A", name="a")
    fake_server.answer = "nope"
    bench(tmp_path, fake_server, "--label", "B", name="b")
    capsys.readouterr()
    rc = main(["compare", str(tmp_path / "a"), str(tmp_path / "b" / "results.json"),
               "--out", str(tmp_path / "cmp.md")])
    out = capsys.readouterr().out
    assert rc == 0
    assert out.splitlines()[0] == "| metric | A | B |"
    acc = next(line for line in out.splitlines() if line.startswith("| accuracy |"))
    assert acc == "| accuracy | 1.000 | 0.000 |"
    same = next(line for line in out.splitlines() if line.startswith("| same answer text as A |"))
    assert same == "| same answer text as A | 1.000 | 0.000 |"
    assert "kvplug_fake_requests_total" in out
    assert (tmp_path / "cmp.md").read_text() == out


@pytest.mark.parametrize("task,expected", [("kv", 96), ("mixed", 96), ("math-find", 16), ("passkey", 16)])
def test_default_max_tokens_per_task(tmp_path, fake_server, task, expected):
    fake_server.answer = "1"
    rc = main(["run", "--endpoint", fake_server.base_url, "--tokenizer", "approx", "--task", task,
               "--context-tokens", "300", "--turns", "1", "--sessions", "1", "--out",
               str(tmp_path / "o"), "--no-progress", "--no-plots"])
    assert rc == 0 and fake_server.bodies[0]["max_tokens"] == expected


def test_reset_prefix_cache_option(tmp_path, fake_server, capsys):
    rc, out, data = bench(tmp_path, fake_server, "--sessions", "1", "--reset-prefix-cache")
    assert rc == 0 and fake_server.resets == 1
    assert data["environment"]["prefix_cache_reset"] is True
    assert "(cache reset before the run)" in (out / "summary.md").read_text()
    rc, _, data = bench(tmp_path, fake_server, "--sessions", "1", name="again")
    assert fake_server.resets == 1 and data["environment"]["prefix_cache_reset"] is None


def test_default_endpoint_is_kvplug_serve():
    from benchmarks.cli import DEFAULT_ENDPOINT, _build_parser
    from serving.server import DEFAULT_PORT

    args = _build_parser().parse_args(["run"])
    assert args.endpoint == DEFAULT_ENDPOINT == f"http://127.0.0.1:{DEFAULT_PORT}"
    assert (args.task, args.mode, args.context_tokens) == ("kv", "multi-turn", 2048)


def test_extra_body_and_session_header_reach_the_server(tmp_path, fake_server):
    rc, _, data = bench(tmp_path, fake_server, "--sessions", "2", "--turns", "1",
                        "--extra-body", '{"kv_transfer_params": {"policy": "keep"}, "top_k": 1}')
    assert rc == 0
    assert all(b["kv_transfer_params"] == {"policy": "keep"} and b["top_k"] == 1
               for b in fake_server.bodies)
    sessions = sorted(h["x-session-id"] for h in fake_server.headers)
    assert sessions == sorted(r["case_id"] for r in data["requests"]) and len(set(sessions)) == 2
    assert data["config"]["extra_body"]["top_k"] == 1


def test_follow_up_ttft_counts_later_turns_only(tmp_path, fake_server):
    rc, out, data = bench(tmp_path, fake_server, "--sessions", "2", "--turns", "3")
    s = data["summary"]
    assert rc == 0 and s["ttft_followup_s"]["n"] == 4 and s["ttft_s"]["n"] == 6
    assert "TTFT p50 follow-up turns" in (out / "summary.md").read_text()


def test_request_timeout_is_an_error_not_a_hang(tmp_path, fake_server):
    fake_server.first_token_delay = 1.5
    t = time.perf_counter()
    rc, _, data = bench(tmp_path, fake_server, "--sessions", "2", "--turns", "1",
                        "--request-timeout", "0.3", "--mode", "multi-request")
    assert rc == 1 and time.perf_counter() - t < 5  # nothing succeeded: exit 1, results written
    assert data["summary"]["errors"] == 2
    assert all(r["error"].startswith(("timeout", "ReadTimeout")) for r in data["requests"])


def test_interrupt_keeps_finished_requests(fake_server):
    """Ctrl-C cancels run_load (asyncio.run does that): finished records come back, in-flight
    ones are marked cancelled, nothing raises."""
    fake_server.first_token_delay = 0.3
    cases = generate_cases("kv", seed=0, sessions=6, context_tokens=300, turns=1,
                           count_tokens=approx_count)
    cfg = LoadConfig(api_base=fake_server.base_url + "/v1", model="fake-model",
                     mode="multi-request", concurrency=2)

    async def go():
        two_done = asyncio.Event()

        ok = 0

        def on_record(rec):
            nonlocal ok
            ok += rec["status"] == "ok"
            if ok >= 2:
                two_done.set()

        task = asyncio.create_task(run_load(cases, cfg, on_record=on_record))
        await asyncio.wait_for(two_done.wait(), 30)
        await asyncio.sleep(0.05)  # the next two requests are in flight now
        task.cancel()
        return await task

    out = asyncio.run(go())
    assert out["stop_reason"] == "interrupted"
    statuses = [r["status"] for r in out["records"]]
    assert statuses.count("ok") == 2 and len(statuses) < 6
    assert set(statuses[2:]) <= {"cancelled"} and fake_server.requests < 6


def test_report_rewrites_summary_and_plots(tmp_path, fake_server):
    rc, out, data = bench(tmp_path, fake_server, "--sessions", "1", "--turns", "2")
    assert rc == 0 and data["plots"] == [] and not (out / "latency_cdf.png").exists()
    (out / "summary.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "latency_cdf.png").read_bytes()[:4] == b"\x89PNG"
    assert "latency_cdf.png" in (out / "summary.md").read_text()
    assert json.loads((out / "results.json").read_text())["plots"] == [
        "ttft_per_turn.png", "accuracy_per_turn.png", "latency_cdf.png"]



def test_cache_report_headers_become_a_summary_table_and_a_plot(tmp_path, fake_server):
    fake_server.cache_header = True
    rc, out, data = bench(tmp_path, fake_server, "--sessions", "2", "--turns", "3", plots=True)
    assert rc == 0
    cs = data["summary"]["cache_sources"]
    assert cs["per_turn"]["1"] == {"gpu": 0, "cpu": 0, "disk": 0, "recomputed": 600}
    assert cs["per_turn"]["3"] == {"gpu": 256, "cpu": 512, "disk": 0, "recomputed": 80}
    assert cs["miss_reasons"] == {"none": 4, "never_seen": 2}
    assert data["requests"][0]["cache"]["policy"] == "keep"
    assert "cache_sources.png" in data["plots"] and (out / "cache_sources.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 3 | 256 (30%) | 512 (60%) | 0 (0%) | 80 (9%) |" in (out / "summary.md").read_text()


def test_policy_mix_shares_each_context_across_policies_and_repeat_runs_sessions_again(tmp_path, fake_server):
    rc, out, data = bench(tmp_path, fake_server, "--sessions", "4", "--policy-mix", "keep,quant:int8",
                          "--repeat", "--max-requests", "14", "--concurrency", "1")
    assert rc == 0 and data["summary"]["requests"] == 14
    reqs = data["requests"]
    assert {(r["session"], r["policy"]) for r in reqs} == {(0, "keep"), (1, "quant:int8"), (2, "keep"),
                                                          (3, "quant:int8")}
    by_session = {r["session"]: r["case_id"] for r in reqs}
    assert by_session[0] == by_session[1] != by_session[2] == by_session[3]  # shared prefixes
    assert max(r["round"] for r in reqs) >= 1  # 3 turns a round: 14 requests start sessions over


@pytest.mark.parametrize("argv, message", [
    (["--policy-mix", "keep,quant:int9"], "unknown cache policy 'quant:int9'"),
    (["--policy-mix", "keep,quant:int8"], "--sessions 3 is not a multiple"),
    (["--repeat"], "--repeat needs --max-seconds or --max-requests"),
])
def test_policy_mix_and_repeat_reject_bad_flags_in_one_line(tmp_path, fake_server, capsys, argv, message):
    rc, _, _ = bench(tmp_path, fake_server, *argv)
    assert rc == 2 and message in capsys.readouterr().err


def test_load_start_on_the_wall_clock_brackets_the_records(fake_server):
    # benchmarks/replica_routing.py lines a replica kill up with the records through started_unix
    cases = generate_cases("kv", seed=0, sessions=2, context_tokens=300, turns=2, count_tokens=approx_count)
    cfg = LoadConfig(api_base=fake_server.base_url + "/v1", model="fake-model", mode="multi-turn", concurrency=2)
    before = time.time()
    out = asyncio.run(run_load(cases, cfg))
    after = time.time()
    assert before <= out["started_unix"] <= after
    assert all(out["started_unix"] + r["start"] + r["e2e"] <= after for r in out["records"])
