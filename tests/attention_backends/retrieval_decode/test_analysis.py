"""Analysis selectors (benchmarks only) against the production selection and the dense oracle."""
from __future__ import annotations

import pytest
import torch

from attention_backends.retrieval_decode import analysis
from attention_backends.retrieval_decode.reference import dense_decode_attention, selected_block_attention
from attention_backends.retrieval_decode.selection import select_for_queries
from tests.attention_backends.retrieval_decode.helpers import make_case

SINK, RECENT = 1, 2


def _run(case, selector, budget, gqa_reduce="max"):
    return analysis.analysis_decode(selector, case.q, case.key_cache, case.value_cache, case.summaries.kmin,
                                    case.summaries.kmax, case.block_table, case.seq_lens, budget, SINK, RECENT,
                                    gqa_reduce, 0.25)


@pytest.mark.parametrize("selector", analysis.SELECTORS[1:])
def test_a_budget_of_every_block_is_dense_attention(selector):
    case = make_case()
    nb = (case.seq_lens + 15) // 16
    torch.testing.assert_close(_run(case, selector, nb), dense_decode_attention(
        case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, 0.25), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gqa_reduce", ["max", "sum"])
def test_quest_torch_picks_what_the_production_selection_picks(gqa_reduce):
    case = make_case()
    budget = torch.tensor([6, 9, 4])
    nb = (case.seq_lens + 15) // 16
    sel = select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table,
                             nb, budget, int(budget.max()), SINK, RECENT, gqa_reduce)
    want = selected_block_attention(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, sel,
                                    0.25)
    torch.testing.assert_close(_run(case, "quest_torch", budget, gqa_reduce), want, atol=1e-5, rtol=1e-5)


def test_a_needle_block_is_found_by_every_selector_at_a_small_budget():
    case = make_case(seq_lens=(900,), num_blocks=200, seed=3)
    needle = int(case.block_table[0, 20])  # logical block 20: neither sink nor recent
    case.key_cache[needle] = 12 * case.q[0].view(2, 3, 16).mean(1, keepdim=True).expand(2, 16, 16)
    case.summaries.kmin[needle], case.summaries.kmax[needle] = case.key_cache[needle].amin(1), case.key_cache[needle].amax(1)
    dense = dense_decode_attention(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, 0.25)
    far = _run(case, "quest_torch", torch.tensor([3]))  # sink + recent only: misses the needle
    for selector in analysis.SELECTORS[1:]:
        for reduce in ("max", "sum", "mass"):
            got = _run(case, selector, torch.tensor([4]), reduce)
            assert (got - dense).norm() < 0.5 * (far - dense).norm(), (selector, reduce)


def test_unknown_selector_is_named():
    with pytest.raises(ValueError, match="bogus"):
        _run(make_case(), "bogus", torch.tensor([4, 4, 4]))
