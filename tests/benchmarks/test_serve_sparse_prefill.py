"""benchmarks/serve_sparse_prefill.py (sparse prefill through `kvplug serve`, dense vs sparse server): its
arguments, the per-context/turn TTFT table, the paired accuracy and identical-answer figures, the chunk counters
and the summary's warning; harness's bench-run comparison helpers it shares with gpu_tp2. No server."""

from __future__ import annotations

import pytest

from benchmarks import harness, serve_sparse_prefill as ssp


def _args(*argv: str):
    args = ssp.parser().parse_args(["--model", "/m", *argv])
    ssp.check_args(args)
    return args


def _rec(case, turn, score, text, ttft=0.1, context_tokens=1990, task="kv", status="ok"):
    return {"case_id": case, "turn": turn, "score": score, "prediction": text, "ttft": ttft, "status": status,
            "task": task, "context_tokens": context_tokens}


def _result(requests, chunks=None, errors=0):
    deltas = {f'kvplug_sparse_prefill_chunks_total{{decision="{d}",reason="{r}"}}': v
              for (d, r), v in (chunks or {}).items()}
    deltas["kvplug_sparse_prefill_chunks_created{decision=\"sparse\",reason=\"x\"}"] = 1.7e9  # not a count
    return {"summary": {"errors": errors, "metrics": {"deltas": deltas}}, "requests": requests}


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "kv,nope"], "--tasks: unknown task 'nope'"),
    (["--context-tokens", "12k"], "--context-tokens: comma-separated integers"),
    (["--context-tokens", "0"], "--context-tokens: positive integers"),
    (["--sessions", "0"], "--sessions: at least 1"),
    (["--sparse-set", "sparse_prefill.cost_table=none"], "--sparse-set: KEY=VALUE of a sparse_prefill key"),
    (["--sparse-set", "cost_table"], "--sparse-set: KEY=VALUE"),
    (["--set", "sparse_prefill.enabled=true"], "each arm sets it"),
])
def test_bad_arguments_stop_with_one_line_naming_the_flag(argv, message):
    with pytest.raises(SystemExit) as e:
        _args(*argv)
    assert message in str(e.value)


def test_each_arm_serves_the_same_flags_and_only_the_sparse_arm_gets_sparse_keys():
    args = _args("--set", "metrics.prefix=kvp", "--sparse-set", "cost_table=none", "--serve-args",
                 "--gpu-memory-utilization 0.5")
    dense, sparse = (ssp.serve_args(args, arm, "/m", 28672) for arm in ("dense", "sparse"))
    for a in (dense, sparse):
        assert a[:3] == ["/m", "--max-model-len", "28672"] and "metrics.prefix=kvp" in a
        assert a[-2:] == ["--gpu-memory-utilization", "0.5"]
    assert "sparse_prefill.enabled=false" in dense and "sparse_prefill.cost_table=none" not in dense
    assert "sparse_prefill.enabled=true" in sparse and "sparse_prefill.cost_table=none" in sparse


def test_bench_argv_asks_the_same_questions_of_both_arms():
    args = _args("--sessions", "5", "--turns", "4", "--seed", "7", "--max-tokens", "40")
    argv = ssp.bench_argv(args, "http://h:1", "/m", "passkey", 12000, ssp.Path("/o/x"), "dense passkey-12000")
    for flag, value in (("--task", "passkey"), ("--context-tokens", "12000"), ("--sessions", "5"), ("--turns", "4"),
                        ("--seed", "7"), ("--mode", "multi-turn"), ("--max-tokens", "40"), ("--concurrency", "1")):
        assert argv[argv.index(flag) + 1] == value
    assert "--max-tokens" not in ssp.bench_argv(_args(), "http://h:1", "/m", "kv", 1, ssp.Path("/o"), "l")


def _two_arms():
    """kv at 12000 (2 cases x 2 turns) and at 26000 (1 case x 2 turns); sparse faster on turn 1, one kv answer
    lost at 26000, a passkey answer in other words but right."""
    dense = {"kv-12000": _result([_rec(f"c{i}", t, 1.0, f"u{i}{t}", ttft=0.4 if t == 1 else 0.1)
                                  for i in range(2) for t in (1, 2)]),
             "kv-26000": _result([_rec("c0", 1, 1.0, "a", ttft=1.0), _rec("c0", 2, 1.0, "b", ttft=0.2)]),
             "passkey-12000": _result([_rec("c0", 1, 1.0, "12345", task="passkey", ttft=0.4)])}
    sparse = {"kv-12000": _result([_rec(f"c{i}", t, 1.0, f"u{i}{t}", ttft=0.2 if t == 1 else 0.1)
                                   for i in range(2) for t in (1, 2)],
                                  chunks={("sparse", "cost_model"): 3, ("dense", "below_floor"): 2}),
              "kv-26000": _result([_rec("c0", 1, 0.0, "wrong", ttft=0.5), _rec("c0", 2, 1.0, "b", ttft=0.2)],
                                  chunks={("sparse", "cost_model"): 4}),
              "passkey-12000": _result([_rec("c0", 1, 1.0, "It is 12345", task="passkey", ttft=0.3)])}
    return dense, sparse


def test_summary_pairs_questions_per_turn_and_task_and_reads_ttft_per_target_context():
    args = _args("--tasks", "kv,passkey", "--context-tokens", "12000,26000")
    dense, sparse = _two_arms()
    arms = {arm: {"serve_command": f"kvplug serve {arm}", "runs": {}} for arm in ssp.ARMS}
    s = ssp.summarize(args, "/m", arms, {"dense": dense, "sparse": sparse})
    # TTFT grouped by the run's target length (each case's own context_tokens differ), turn by turn
    ttft = {(r["context_tokens"], r["turn"]): r for r in s["ttft"]}
    assert set(ttft) == {(12000, 1), (12000, 2), (26000, 1), (26000, 2)}
    assert ttft[(12000, 1)]["dense"] == {"n": 3, "p50_s": 0.4} and ttft[(12000, 1)]["sparse"]["p50_s"] == 0.2
    assert ttft[(12000, 1)]["dense_over_sparse"] == 2.0 and ttft[(26000, 1)]["dense_over_sparse"] == 2.0
    # the same case id in two runs is two questions, not one
    turn1 = s["accuracy_per_turn"]["1"]
    assert turn1["n"] == 4 and turn1["dense"]["accuracy"] == 1.0 and turn1["sparse"]["accuracy"] == 0.75
    assert turn1["sparse_minus_dense"]["mean"] == -0.25
    assert s["accuracy_per_turn"]["all"]["n"] == 7
    kv = s["accuracy_per_task"]["kv"]
    assert kv["accuracy"]["n"] == 6 and kv["identical"]["identical"] == 5
    pk = s["accuracy_per_task"]["passkey"]
    assert pk["accuracy"]["sparse_minus_dense"]["mean"] == 0.0 and pk["identical"]["identical"] == 0
    assert s["identical"]["a_right"] == 7 and s["identical"]["identical_where_a_right"] == 5
    assert s["sparse_prefill_chunks"]["sparse"] == {"dense/below_floor": 2.0, "sparse/cost_model": 7.0}
    assert s["sparse_prefill_chunks"]["dense"] == {} and "warning" not in s
    s.update(command="python -m benchmarks.serve_sparse_prefill", date="today")
    md = ssp.markdown(s)
    assert "| 12000 | 1 | 3 | 400.0 ms | 200.0 ms | 2.00x |" in md
    assert "| kv | 6 |" in md and "| 5 / 6 | 5 / 6 (0.833) |" in md  # dense right on all 6, one lost
    assert "sparse/cost_model 7" in md


def test_a_sparse_arm_whose_chunks_all_stayed_dense_says_so():
    args = _args("--tasks", "kv", "--context-tokens", "12000")
    rec = [_rec("c0", 1, 1.0, "a")]
    arms = {arm: {"serve_command": arm, "runs": {}} for arm in ssp.ARMS}
    s = ssp.summarize(args, "/m", arms, {"dense": {"kv-12000": _result(rec)},
                                          "sparse": {"kv-12000": _result(rec, chunks={("dense", "cost_model"): 9})}})
    assert "no chunk went sparse" in s["warning"]
    s.update(command="c", date="d")
    assert "**no chunk went sparse" in ssp.markdown(s)


def test_identical_answers_counts_only_questions_both_answered():
    a = [_rec("x", 1, 1.0, "same"), _rec("y", 1, 0.0, "p"), _rec("z", 1, 1.0, "q")]
    b = [_rec("x", 1, 1.0, "same"), _rec("y", 1, 0.0, "p"), _rec("z", 1, None, None, status="error")]
    r = harness.identical_answers(a, b)
    assert r == {"n": 2, "identical": 2, "rate": 1.0, "a_right": 1, "identical_where_a_right": 1,
                 "rate_where_a_right": 1.0}


def test_paired_accuracy_overall_row_pools_every_turn():
    a = [_rec(f"c{i}", t, 1.0, "") for i in range(10) for t in (1, 2)]
    b = [_rec(f"c{i}", t, 1.0 if t == 1 else 0.0, "") for i in range(10) for t in (1, 2)]
    table = harness.paired_accuracy_per_turn(a, b, "dense", "sparse", overall=True)
    assert list(table) == ["1", "2", "all"]
    assert table["all"]["n"] == 20 and table["all"]["sparse_minus_dense"]["mean"] == -0.5
    assert not table["all"]["within_noise"] and table["1"]["within_noise"]
    assert "| all | 20 |" in harness.paired_accuracy_table(table, "dense", "sparse", "dense", "sparse")
