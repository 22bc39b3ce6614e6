"""Shared data model and helpers for the SCBench-style task generators.

A generated case follows SCBench's data shape::

    {"id": ..., "task": ..., "context": ..., "multi_turns": [{"input": ..., "answer": ...}, ...]}

Each turn additionally names the ``scorer`` that grades it (a mixed task holds
turns of different kinds) and may carry ``meta`` (debugging aid; never used by
scoring).

Context length is measured in tokens of the target model's tokenizer: every
generator builds its context from ``n`` repeated units (key/value pairs, list
items, filler sentences) and :func:`fit_units` searches the largest ``n`` whose
context fits the requested budget.  Generators are pure functions of
``(seed, index, context_tokens, turns)``: the same inputs give the same case.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Protocol

TokenCounter = Callable[[str], int]


@dataclasses.dataclass
class Turn:
    input: str
    answer: Any  # str for retrieval, list[str] for multi-hop, int for Math.Find
    scorer: str
    task: str
    meta: dict = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Case:
    id: str
    task: str
    context: str
    multi_turns: list[Turn]
    context_tokens: int  # measured with the generator's token counter

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "task": self.task,
            "context": self.context,
            "context_tokens": self.context_tokens,
            "multi_turns": [t.to_dict() for t in self.multi_turns],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(
            id=d["id"],
            task=d["task"],
            context=d["context"],
            context_tokens=d["context_tokens"],
            multi_turns=[Turn(**t) for t in d["multi_turns"]],
        )


class TaskGenerator(Protocol):
    name: str

    def __call__(self, seed: int, index: int, context_tokens: int, turns: int,
                 count_tokens: TokenCounter) -> Case: ...


class ContextTooSmall(ValueError):
    """The token budget cannot hold the minimum content the task needs."""


def case_rng(seed: int, task: str, index: int, salt: str = "") -> random.Random:
    """A deterministic RNG per (seed, task, case index).

    String seeds are hashed with SHA-512 by :mod:`random` (version 2), so this
    is stable across processes regardless of PYTHONHASHSEED.
    """
    return random.Random(f"kvplug-scbench:{seed}:{task}:{index}:{salt}")


def fit_units(build: Callable[[int], Any], context_of: Callable[[Any], str],
              count_tokens: TokenCounter, budget: int, min_units: int,
              probe_units: int = 32) -> tuple[Any, int]:
    """Return ``(build(n), tokens)`` for the largest ``n >= min_units`` whose
    context has at most ``budget`` tokens.

    ``build(n)`` must be deterministic.  Token count is assumed (close to)
    monotone in ``n``; a final check guarantees the returned context fits.
    """
    def tokens_for(n: int) -> tuple[Any, int]:
        built = build(n)
        return built, count_tokens(context_of(built))

    smallest, smallest_tokens = tokens_for(min_units)
    if smallest_tokens > budget:
        raise ContextTooSmall(
            f"context budget of {budget} tokens is too small: the minimal context "
            f"({min_units} units) already needs {smallest_tokens} tokens")
    # Estimate the per-unit cost from a probe, then bracket and bisect.
    probe = max(probe_units, min_units + 1)
    _, probe_tokens = tokens_for(probe)
    per_unit = max((probe_tokens - smallest_tokens) / (probe - min_units), 1e-3)
    guess = max(min_units, int(min_units + (budget - smallest_tokens) / per_unit))
    lo, lo_built, lo_tokens = min_units, smallest, smallest_tokens
    hi = None
    built, tokens = tokens_for(guess)
    if tokens <= budget:
        lo, lo_built, lo_tokens = guess, built, tokens
        step = max(1, guess // 16)
        while True:  # grow until we overshoot
            cand = lo + step
            built, tokens = tokens_for(cand)
            if tokens > budget:
                hi = cand
                break
            lo, lo_built, lo_tokens = cand, built, tokens
            step *= 2
    else:
        hi = guess
    while hi - lo > 1:
        mid = (lo + hi) // 2
        built, tokens = tokens_for(mid)
        if tokens <= budget:
            lo, lo_built, lo_tokens = mid, built, tokens
        else:
            hi = mid
    return lo_built, lo_tokens


def fitted_case(name: str, seed, index: int, context_tokens: int, count_tokens: TokenCounter,
                build: Callable[[int], tuple[str, list[Turn]]], min_units: int) -> Case:
    """The case built by ``build(n) -> (context, turns)`` for the largest ``n`` that fits
    ``context_tokens`` (see :func:`fit_units`)."""
    (context, turns), tokens = fit_units(build, lambda built: built[0], count_tokens,
                                         context_tokens, min_units=min_units)
    return Case(id=f"{name}-{seed}-{index}", task=name, context=context, multi_turns=turns,
                context_tokens=tokens)


# Filler used by passkey (RULER / "needle in a haystack") and variable tracking.
FILLER = ("The grass is green. The sky is blue. The sun is yellow. "
          "Here we go. There and back again.")


def spread_positions(rng: random.Random, n_slots: int, k: int) -> list[int]:
    """``k`` sorted, distinct-as-possible insertion slots in ``[0, n_slots]``."""
    if k <= n_slots + 1:
        return sorted(rng.sample(range(n_slots + 1), k))
    return sorted(rng.randint(0, n_slots) for _ in range(k))


def random_digits(rng: random.Random, n: int = 5) -> str:
    """A random ``n``-digit number without a leading zero."""
    return str(rng.randint(10 ** (n - 1), 10 ** n - 1))
