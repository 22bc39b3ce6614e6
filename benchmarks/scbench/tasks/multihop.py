"""Retr.MultiHop: RULER-style variable tracking.

``VAR ABCDE = 12345`` followed by ``hops`` assignments ``VAR X = VAR <prev>``
hidden in repeated filler text; each turn asks for all variables assigned a
given value (one chain per turn; the other chains act as distractors).
"""

from __future__ import annotations

import string

from .base import FILLER, Case, Turn, case_rng, fitted_case, random_digits, spread_positions
from .registry import register

NAME = "multihop"
HOPS = 4
INSTRUCTION = ("Memorize and track the chain(s) of variable assignment hidden in the "
               "following text.")


def _build(seed, index: int, turns: int, n: int, hops: int) -> tuple[str, list[Turn]]:
    rng = case_rng(seed, NAME, index)
    names: set[str] = set()
    values: set[str] = set()

    def new_name() -> str:
        while True:
            v = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
            if v not in names:
                names.add(v)
                return v

    chains = []  # (value, [vars], [statements])
    for _ in range(turns):
        while True:
            value = random_digits(rng, 5)
            if value not in values:
                values.add(value)
                break
        vars_ = [new_name() for _ in range(hops + 1)]
        stmts = [f"VAR {vars_[0]} = {value}."]
        stmts += [f"VAR {vars_[i]} = VAR {vars_[i - 1]}." for i in range(1, hops + 1)]
        chains.append((value, vars_, stmts))
    # Random interleaving that keeps each chain's order.
    order = [c for c, (_, _, st) in enumerate(chains) for _ in st]
    rng.shuffle(order)
    nxt = [0] * len(chains)
    statements = []
    for c in order:
        statements.append(chains[c][2][nxt[c]])
        nxt[c] += 1
    slots = spread_positions(rng, n, len(statements))
    pieces: list[str] = []
    si = 0
    for i in range(n + 1):
        while si < len(statements) and slots[si] == i:
            pieces.append(statements[si])
            si += 1
        if i < n:
            pieces.append(FILLER)
    context = INSTRUCTION + "\n\n" + " ".join(pieces)
    out = []
    for value, vars_, _ in chains:
        out.append(Turn(
            input=(f"Question: Find all variables that are assigned the value {value} in the "
                   f"text above. Answer: According to the chain(s) of variable assignment in "
                   f"the text above, {len(vars_)} variables are assigned the value {value}, "
                   f"they are: "),
            answer=list(vars_), scorer="all_of_set", task=NAME,
            meta={"value": value, "hops": hops}))
    return context, out


@register(NAME, "variable tracking: VAR chains in filler; find all variables assigned a value",
          max_tokens=64)
def generate(seed, index: int, context_tokens: int, turns: int, count_tokens,
             hops: int = HOPS, **_) -> Case:
    return fitted_case(NAME, seed, index, context_tokens, count_tokens,
                       lambda n: _build(seed, index, turns, n, hops), min_units=1)
