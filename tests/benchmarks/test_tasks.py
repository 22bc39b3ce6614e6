"""Task generators: deterministic, sized in tokens, and right by construction.

Every registered task needs an independent solver below (parsing only the
context and question text); a new task without one fails
``test_every_task_has_a_solver``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.scbench.scoring import answer_text, score
from benchmarks.scbench.tasks import TASKS, ContextTooSmall, generate_cases
from benchmarks.scbench.tokenizer import approx_count

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------ solvers
def solve_kv(context: str, question: str):
    start = context.index("JSON data:\n") + len("JSON data:\n")
    data, _ = json.JSONDecoder().raw_decode(context[start:])
    key = re.search(r'Key: "([^"]+)"', question).group(1)
    return data[key]


def solve_prefix_suffix(context: str, question: str):
    p, s = re.search(r'starts with "([^"]+)" and ends with "([^"]+)"', question).groups()
    strings = [ln for ln in context.splitlines() if re.fullmatch(r"[A-Za-z0-9]+", ln)]
    hits = [x for x in strings if x.startswith(p) and x.endswith(s)]
    assert len(hits) == 1, f"{len(hits)} strings match {p}...{s}"
    # distractors sharing exactly one affix exist
    assert any(x.startswith(p) and not x.endswith(s) for x in strings)
    assert any(x.endswith(s) and not x.startswith(p) for x in strings)
    return hits[0]


def solve_multihop(context: str, question: str):
    value = re.search(r"assigned the value (\d+) in the text", question).group(1)
    env: dict[str, str] = {}
    for name, rhs in re.findall(r"VAR ([A-Z]{5}) = (\d+|VAR [A-Z]{5})\.", context):
        if rhs.startswith("VAR "):
            src = rhs[4:]
            assert src in env, f"{name} refers to {src} before it is assigned"
            env[name] = env[src]
        else:
            env[name] = rhs
    return sorted(k for k, v in env.items() if v == value)


def solve_math_find(context: str, question: str):
    numbers = json.loads(re.search(r"\[[\d, ]+\]", context).group(0))
    op = re.search(r"What is the (.+?) number in the list", question).group(1)
    s = sorted(numbers)
    assert len(set(numbers)) == len(numbers) and len(numbers) % 2 == 1
    return {"largest": s[-1], "smallest": s[0], "median": s[len(s) // 2],
            "second largest": s[-2], "second smallest": s[1]}[op]


def solve_passkey(context: str, question: str):
    m = re.search(r"What is the pass key for (.+?)\?", question)
    if m:
        label = re.escape(m.group(1))
        found = re.findall(rf"The pass key for {label} is (\d+)\. Remember it\. \1 is the pass key for {label}\.", context)
    else:
        found = re.findall(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.", context)
    assert len(found) == 1
    return found[0]


SOLVERS = {
    "kv": solve_kv,
    "prefix-suffix": solve_prefix_suffix,
    "multihop": solve_multihop,
    "math-find": solve_math_find,
    "passkey": solve_passkey,
}


def solve(task: str, context: str, question: str):
    return SOLVERS[task](context, question)


def _norm(answer):
    return sorted(answer) if isinstance(answer, list) else answer


# -------------------------------------------------------------------- tests
def test_registry_has_the_issue_tasks():
    assert {"kv", "prefix-suffix", "multihop", "math-find", "passkey", "mixed"} <= set(TASKS)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_has_a_solver(task):
    assert task in SOLVERS or task == "mixed", f"add an independent solver for {task!r}"


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("seed", [0, 7])
def test_answers_correct_by_construction(task, seed):
    cases = generate_cases(task, seed=seed, sessions=3, context_tokens=1500, turns=4,
                           count_tokens=approx_count)
    for case in cases:
        assert len(case.multi_turns) == 4
        assert len({t.input for t in case.multi_turns}) == 4, "each turn asks something new"
        for turn in case.multi_turns:
            assert _norm(solve(turn.task, case.context, turn.input)) == _norm(turn.answer)
            # the golden answer, as said in multi-turn history, scores perfectly
            assert score(turn.scorer, answer_text(turn.answer), turn.answer) == 1.0
        assert turn.answer != cases[0].multi_turns[0].answer or case is cases[0]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic(task):
    kw = dict(sessions=2, context_tokens=1000, turns=3, count_tokens=approx_count)
    a = [c.to_dict() for c in generate_cases(task, seed=3, **kw)]
    b = [c.to_dict() for c in generate_cases(task, seed=3, **kw)]
    c = [c.to_dict() for c in generate_cases(task, seed=4, **kw)]
    assert a == b
    assert a[0]["context"] != c[0]["context"]
    assert a[0]["context"] != a[1]["context"], "sessions get different contexts"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_across_processes(task):
    code = ("import hashlib, json, sys; from benchmarks.scbench.tasks import generate_cases; "
            "from benchmarks.scbench.tokenizer import approx_count; "
            f"cs = generate_cases({task!r}, seed=11, sessions=2, context_tokens=800, turns=2, "
            "count_tokens=approx_count); "
            "print(hashlib.sha256(json.dumps([c.to_dict() for c in cs]).encode()).hexdigest())")
    digests = set()
    for hashseed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": str(REPO)}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env=env, cwd=REPO, check=True)
        digests.add(out.stdout.strip())
    assert len(digests) == 1


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("budget", [600, 3000])
def test_context_fits_token_budget(task, budget):
    (case,) = generate_cases(task, seed=1, sessions=1, context_tokens=budget, turns=2,
                             count_tokens=approx_count)
    assert approx_count(case.context) == case.context_tokens
    assert case.context_tokens <= budget
    assert case.context_tokens >= 0.9 * budget, "context should fill the budget"


@pytest.mark.parametrize("task", sorted(TASKS))
def test_real_tokenizer_budget_and_answers(task, smollm2_counter):
    """Context length is in tokens of the target model's tokenizer (SmolLM2)."""
    cases = generate_cases(task, seed=5, sessions=2, context_tokens=2000, turns=3,
                           count_tokens=smollm2_counter)
    for case in cases:
        assert smollm2_counter(case.context) == case.context_tokens
        assert 0.9 * 2000 <= case.context_tokens <= 2000
        for turn in case.multi_turns:
            assert _norm(solve(turn.task, case.context, turn.input)) == _norm(turn.answer)


@pytest.mark.parametrize("task", sorted(TASKS))
def test_too_small_budget_is_reported(task):
    with pytest.raises(ContextTooSmall):
        generate_cases(task, seed=0, sessions=1, context_tokens=20, turns=3,
                       count_tokens=approx_count)


def test_mixed_alternates_components_and_accepts_pairs():
    (case,) = generate_cases("mixed", seed=0, sessions=1, context_tokens=2000, turns=5,
                             count_tokens=approx_count, components=("math-find", "multihop"))
    assert [t.task for t in case.multi_turns] == ["math-find", "multihop"] * 2 + ["math-find"]
    assert [t.scorer for t in case.multi_turns][:2] == ["first_number", "all_of_set"]
    for t in case.multi_turns:
        assert _norm(solve(t.task, case.context, t.input)) == _norm(t.answer)


def test_kv_asks_distinct_keys_spread_over_the_context():
    (case,) = generate_cases("kv", seed=2, sessions=1, context_tokens=4000, turns=5,
                             count_tokens=approx_count)
    keys = [t.meta["key"] for t in case.multi_turns]
    assert len(set(keys)) == 5
    positions = [t.meta["position"] for t in case.multi_turns]
    assert max(positions) - min(positions) > 5
