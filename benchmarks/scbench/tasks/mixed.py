"""Mixed task: the contexts of two tasks concatenated, turns alternating between
them (SCBench's Mix.* tasks).  Default pair: Retr.KV + passkey."""

from __future__ import annotations

from .base import Case, ContextTooSmall
from .registry import TASKS, register

NAME = "mixed"
DEFAULT_COMPONENTS = ("kv", "passkey")
SEP = "\n\n"


@register(NAME, "two task contexts concatenated, turns alternating (--mix)", max_tokens=96)  # kv turns: see kv.py
def generate(seed, index: int, context_tokens: int, turns: int, count_tokens,
             components: tuple[str, str] | list[str] | None = None, **options) -> Case:
    a, b = tuple(components or DEFAULT_COMPONENTS)
    for c in (a, b):
        if c not in TASKS or c == NAME:
            raise ValueError(f"mixed: unknown component task {c!r}")
    n_a, n_b = (turns + 1) // 2, max(turns // 2, 1)
    margin = 0
    while True:
        half = (context_tokens - margin) // 2
        if half <= 0:
            raise ContextTooSmall(f"context budget of {context_tokens} tokens is too small")
        ca = TASKS[a](f"{seed}/mixed-a", index, half, n_a, count_tokens, **options)
        cb = TASKS[b](f"{seed}/mixed-b", index, half, n_b, count_tokens, **options)
        context = ca.context + SEP + cb.context
        tokens = count_tokens(context)
        if tokens <= context_tokens:
            break
        margin += max(8, tokens - context_tokens)
    turns_out = []
    for t in range(turns):
        src = ca if t % 2 == 0 else cb
        turns_out.append(src.multi_turns[t // 2])
    return Case(id=f"{NAME}-{a}+{b}-{seed}-{index}", task=NAME, context=context,
                multi_turns=turns_out, context_tokens=tokens)
