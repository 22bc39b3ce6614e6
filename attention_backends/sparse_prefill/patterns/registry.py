"""Every sparse prefill pattern by name (kvpress-style registry; tests are parametrized over it)."""
from __future__ import annotations

from attention_backends.sparse_prefill.patterns.a_shape import AShape
from attention_backends.sparse_prefill.patterns.base import PatternBudgetError, SparsePattern
from attention_backends.sparse_prefill.patterns.block_sparse import BlockSparse
from attention_backends.sparse_prefill.patterns.vertical_slash import VerticalSlash

PATTERNS: dict[str, type[SparsePattern]] = {p.name: p for p in (AShape, VerticalSlash, BlockSparse)}
# Pattern names that mean "attend densely" (a head the search could not sparsify).
DENSE = "dense"


def get(name: str, where: str = "") -> type[SparsePattern]:
    try:
        return PATTERNS[name]
    except KeyError:
        raise PatternBudgetError(f"{where}unknown sparse prefill pattern {name!r} "
                                 f"(known: {', '.join([*PATTERNS, DENSE])})") from None
