"""SCBench-style task generators (local, seeded; no dataset download).

``TASKS`` maps a task name to its generator; see :mod:`.base` for the contract.
"""

from __future__ import annotations

from .base import Case, ContextTooSmall, Turn  # noqa: F401
from .registry import TASKS, register  # noqa: F401

# Importing a module registers its task.
from . import kv, prefix_suffix, multihop, math_find, passkey, mixed  # noqa: F401,E402


def budgets_text() -> str:
    """Every task's own answer budget (its ``default_max_tokens``), for --max-tokens help: 'kv 96, math_find 16, ...'."""
    return ", ".join(f"{n} {TASKS[n].default_max_tokens}" for n in sorted(TASKS))


def generate_cases(task: str, *, seed: int, sessions: int, context_tokens: int,
                   turns: int, count_tokens, on_case=None, **options) -> list[Case]:
    """``sessions`` cases of ``task``; case ``i`` depends only on (seed, i, ...).
    ``on_case(case)`` is called after each one (progress bars: long contexts take a while
    to size with a real tokenizer)."""
    gen = TASKS[task]
    cases = []
    for i in range(sessions):
        cases.append(gen(seed, i, context_tokens, turns, count_tokens, **options))
        if on_case:
            on_case(cases[-1])
    return cases
