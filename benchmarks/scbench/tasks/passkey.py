"""Passkey retrieval: needles "The pass key is 12345. Remember it. 12345 is the
pass key." inside long filler.  With several turns each needle is labelled
(e.g. "the pass key for the red door") so every turn asks a different one."""

from __future__ import annotations

from .base import FILLER, Case, Turn, case_rng, fitted_case, random_digits, spread_positions
from .registry import register

NAME = "passkey"
INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it "
               "and memorize it. I will quiz you about the important information there.")
LABELS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver",
          "golden", "brown", "pink", "grey", "violet", "crimson", "teal"]


def _label(i: int) -> str:
    base = LABELS[i % len(LABELS)]
    return f"the {base} door" if i < len(LABELS) else f"the {base} door number {i // len(LABELS) + 1}"


def _build(seed, index: int, turns: int, n: int) -> tuple[str, list[Turn]]:
    rng = case_rng(seed, NAME, index)
    keys: list[str] = []
    while len(keys) < turns:
        k = random_digits(rng, 5)
        if k not in keys:
            keys.append(k)
    if turns == 1:
        needles = [f"The pass key is {keys[0]}. Remember it. {keys[0]} is the pass key."]
        questions = ["What is the pass key? The pass key is"]
    else:
        labels = [_label(i) for i in rng.sample(range(max(turns, len(LABELS))), turns)]
        needles = [f"The pass key for {lb} is {k}. Remember it. {k} is the pass key for {lb}."
                   for lb, k in zip(labels, keys)]
        questions = [f"What is the pass key for {lb}? The pass key for {lb} is" for lb in labels]
    order = list(range(turns))
    rng.shuffle(order)  # needle order in the text differs from question order
    slots = spread_positions(rng, n, turns)
    pieces: list[str] = []
    si = 0
    for i in range(n + 1):
        while si < turns and slots[si] == i:
            pieces.append(needles[order[si]])
            si += 1
        if i < n:
            pieces.append(FILLER)
    context = INSTRUCTION + "\n\n" + " ".join(pieces)
    depth = {order[si]: slots[si] / max(n, 1) for si in range(turns)}
    out = [Turn(input=questions[t], answer=keys[t], scorer="substring", task=NAME,
                meta={"depth": round(depth[t], 4)}) for t in range(turns)]
    return context, out


@register(NAME, "labelled 5-digit pass keys hidden in filler text; one per turn", max_tokens=16)
def generate(seed, index: int, context_tokens: int, turns: int, count_tokens, **_) -> Case:
    return fitted_case(NAME, seed, index, context_tokens, count_tokens,
                       lambda n: _build(seed, index, turns, n), min_units=1)
