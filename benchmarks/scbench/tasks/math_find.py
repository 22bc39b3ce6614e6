"""Math.Find: a long list of distinct integers; each turn asks for a different
statistic (largest, smallest, median, ...).  Scored on the first number of the
prediction."""

from __future__ import annotations

from .base import Case, Turn, case_rng, fitted_case
from .registry import register

NAME = "math-find"
INSTRUCTION = "Below is a list of numbers. You will be asked questions about it."
# (name, function of the sorted list); the list always has odd length.
OPS = [
    ("largest", lambda s: s[-1]),
    ("smallest", lambda s: s[0]),
    ("median", lambda s: s[len(s) // 2]),
    ("second largest", lambda s: s[-2]),
    ("second smallest", lambda s: s[1]),
]


def _build(seed, index: int, turns: int, n: int) -> tuple[str, list[Turn]]:
    rng = case_rng(seed, NAME, index)
    n = n if n % 2 == 1 else n + 1
    numbers = rng.sample(range(0, max(100_000, 10 * n)), n)
    ordered = sorted(numbers)
    start = rng.randrange(len(OPS)) if turns < len(OPS) else 0
    context = INSTRUCTION + "\n\n[" + ", ".join(map(str, numbers)) + "]"
    out = []
    for t in range(turns):
        op, fn = OPS[(start + t) % len(OPS)]
        median_note = " (the middle value after sorting)" if op == "median" else ""
        out.append(Turn(
            input=(f"What is the {op} number in the list above{median_note}? Answer with the "
                   f"number only.\nThe {op} number of the list is: "),
            answer=fn(ordered), scorer="first_number", task=NAME,
            meta={"op": op, "num_numbers": n}))
    return context, out


@register(NAME, "list of distinct integers; largest / smallest / median / ... per turn", max_tokens=16)
def generate(seed, index: int, context_tokens: int, turns: int, count_tokens, **_) -> Case:
    return fitted_case(NAME, seed, index, context_tokens, count_tokens,
                       lambda n: _build(seed, index, turns, n), min_units=5)
