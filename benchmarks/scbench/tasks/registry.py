"""Task registry: ``TASKS[name] = generate`` where ``generate(seed, index,
context_tokens, turns, count_tokens, **options) -> Case``;
``generate.default_max_tokens`` is its default answer budget and
``generate.summary`` a one-line description for ``--help``."""

from __future__ import annotations

from typing import Callable

TASKS: dict[str, Callable] = {}


def register(name: str, summary: str, max_tokens: int = 32):
    """``max_tokens``: default output budget for the task's answers."""
    def deco(fn):
        if name in TASKS:
            raise ValueError(f"task {name!r} registered twice")
        fn.task_name = name
        fn.summary = summary
        fn.default_max_tokens = max_tokens
        TASKS[name] = fn
        return fn
    return deco
