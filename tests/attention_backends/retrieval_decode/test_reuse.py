"""Selection reuse across decode steps (reuse.py; retrieval_decode.reselect_interval): the per-row tracker the
metadata builder steps, and the CPU path's selection (runner._reuse_selection: fresh rows select and store, every
row reads its stored selection plus the blocks started since), step by step over a growing batch."""
from __future__ import annotations

import pytest
import torch

from attention_backends.retrieval_decode import planner, reuse
from attention_backends.retrieval_decode.reference import selected_block_attention
from attention_backends.retrieval_decode.runner import RetrievalDecodeRunner, select_for_plan
from kvplug.config import KvplugConfigError
from tests.attention_backends.retrieval_decode.helpers import make_case

BS = 16


def _params(interval: int, **kw) -> planner.RetrievalParams:
    base = dict(block_size=BS, budget_tokens=96, budget_fraction=0.0, sink_blocks=1, recent_tokens=20,
                min_context_tokens=128, reselect_interval=interval)
    return planner.RetrievalParams(**{**base, **kw})


class Batch:
    """Requests of one paged case decoding together; ``order`` says which request sits in which batch row."""

    def __init__(self, params, seq_lens=(900, 700, 60), capacity=8):
        self.case = make_case(seq_lens=seq_lens, hkv=2, group=3, d=16, bs=BS, num_blocks=160)
        self.params = params
        self.tracker = reuse.ReuseTracker(capacity, "cpu")
        self.runner = RetrievalDecodeRunner(impl=None)
        self.capacity = capacity
        self.k = planner.graph_k(params, max(seq_lens))

    def step(self, lens: dict[int, int], order: list[int]):
        """One pure-decode step: request order[i] in row i at length lens[order[i]]. Returns (out, fresh_out,
        selection, plan, reselect) for the retrieval rows (fresh_out: the same step selecting every row)."""
        c, p = self.case, self.params
        rows = torch.tensor(order)
        seq = torch.tensor([lens[r] for r in order])
        table = c.block_table[rows]
        n = len(order)
        plan = planner.plan(p, torch.arange(n + 1), seq, n, table, n)
        retrieval = torch.zeros(n, dtype=torch.bool)
        retrieval[plan.req_ids] = True
        reselect, sel_seq_lens = self.tracker.step(table, seq, retrieval, p.reselect_interval, BS)
        plan.reuse = reuse.ReuseRows(plan.req_ids, reselect[plan.req_ids].clone(), sel_seq_lens[plan.req_ids].clone(),
                                     self.capacity, self.k, p.reuse_extra_blocks)
        q = c.q[rows][plan.rows]
        sel = self.runner._reuse_selection(q, c.summaries.kmin, c.summaries.kmax, plan, p)
        out = selected_block_attention(q, c.key_cache, c.value_cache, plan.block_table, plan.seq_lens, sel, 0.2)
        fresh = select_for_plan(q, c.summaries.kmin, c.summaries.kmax, plan, p)
        fresh_out = selected_block_attention(q, c.key_cache, c.value_cache, plan.block_table, plan.seq_lens, fresh,
                                             0.2)
        return out, fresh_out, sel, plan, plan.reuse.reselect


def _blocks(sel, n, h) -> set[int]:
    return set(sel.blocks[n, h][sel.valid[n, h]].tolist())


def test_config_rejects_an_interval_below_one():
    from attention_backends.retrieval_decode.config import RetrievalDecodeConfig

    RetrievalDecodeConfig(reselect_interval=8).validate("retrieval_decode")
    with pytest.raises(KvplugConfigError, match="retrieval_decode.reselect_interval"):
        RetrievalDecodeConfig(reselect_interval=0).validate("retrieval_decode")
    assert RetrievalDecodeConfig().reselect_interval == 8  # on by default (measured on the H100: BENCHMARKS.md)


def test_rows_reselect_every_nth_step_and_reuse_in_between():
    """interval 4: steps 0, 4, 8 select; 1-3 and 5-7 read the stored selection plus the blocks started since (a
    block boundary is crossed at step 1); the short request (below min_context) never takes the retrieval path."""
    b = Batch(_params(4))
    lens = {0: 880, 1: 672, 2: 40}  # 672 = 42 full blocks: the next token starts block 42
    flags, first = [], None
    for t in range(9):
        out, fresh_out, sel, plan, reselect = b.step(lens, [0, 1, 2])
        assert plan.req_ids.tolist() == [0, 1]
        flags.append(reselect.tolist())
        if t % 4 == 0:
            torch.testing.assert_close(out, fresh_out, rtol=0, atol=0)  # a reselect step is today's step
            first = {(n, h): _blocks(sel, n, h) for n in range(2) for h in range(2)}
            first_nb = plan.num_blocks.clone()
        else:
            for n in range(2):
                nb = int(plan.num_blocks[n])
                for h in range(2):
                    got = _blocks(sel, n, h)
                    assert got == first[n, h] | set(range(int(first_nb[n]), nb)), (t, n, h)
                    assert 0 in got and set(range(nb - p_recent(b), nb)) <= got  # sink and recent window read
        lens = {r: v + 1 for r, v in lens.items()}
    assert flags == [[1, 1], [0, 0], [0, 0], [0, 0], [1, 1], [0, 0], [0, 0], [0, 0], [1, 1]]
    assert int(b.tracker.reused) == 12 and int(b.tracker.reselected) == 6


def p_recent(b: Batch) -> int:
    return b.params.recent_blocks


def test_requests_swapping_rows_reselect_and_equal_full_reselection():
    """Reuse is keyed by row: when two requests trade rows (or a row gets another request), both reselect, so the
    step is exactly a full reselection; a stored selection of one request is never read for another."""
    b = Batch(_params(8))
    lens = {0: 880, 1: 672, 2: 40}
    for _ in range(2):
        b.step(lens, [0, 1, 2])
        lens = {r: v + 1 for r, v in lens.items()}
    out, fresh_out, _, _, reselect = b.step(lens, [1, 0, 2])  # swapped
    assert reselect.tolist() == [1, 1]
    torch.testing.assert_close(out, fresh_out, rtol=0, atol=0)
    lens = {r: v + 1 for r, v in lens.items()}
    out, fresh_out, _, _, reselect = b.step(lens, [1, 0, 2])  # settled in their new rows: reuse again
    assert reselect.tolist() == [0, 0]
    # a new request in row 0 at exactly the length its predecessor would have had: still reselects
    b2 = Batch(_params(8), seq_lens=(900, 900, 60))
    b2.step({0: 700, 1: 701, 2: 40}, [0, 2])
    _, _, _, _, reselect = b2.step({1: 701, 2: 41}, [1, 2])
    assert reselect.tolist() == [1]


def test_a_row_that_did_not_grow_by_one_token_or_was_reset_reselects():
    b = Batch(_params(8))
    lens = {0: 880, 1: 672, 2: 40}
    b.step(lens, [0, 1, 2])
    _, _, _, _, reselect = b.step({0: 882, 1: 673, 2: 41}, [0, 1, 2])  # request 0 skipped a step (preempted...)
    assert reselect.tolist() == [1, 0]
    b.tracker.reset()  # a batch with a prefill chunk in it
    out, fresh_out, _, _, reselect = b.step({0: 883, 1: 674, 2: 42}, [0, 1, 2])
    assert reselect.tolist() == [1, 1]
    torch.testing.assert_close(out, fresh_out, rtol=0, atol=0)


def test_reuse_with_a_fractional_budget_reads_the_stored_budget_plus_new_blocks():
    """budget_fraction: the budget grows with the context; a reused row reads the budget it selected at (stored)
    plus the blocks started since, never slots it did not fill."""
    b = Batch(_params(16, budget_tokens=1, budget_fraction=0.1))
    lens = {0: 880, 1: 672, 2: 40}
    _, _, sel0, plan0, _ = b.step(lens, [0, 1, 2])
    for t in range(1, 16):
        lens = {r: v + 1 for r, v in lens.items()}
        _, _, sel, plan, reselect = b.step(lens, [0, 1, 2])
        assert reselect.tolist() == [0, 0]
        counts = sel.valid[:, 0].sum(-1)
        new = plan.num_blocks - plan0.num_blocks
        assert counts.tolist() == (plan0.budget_blocks + new).tolist()
        assert int(sel.valid.sum(-1).max()) <= b.k + b.params.reuse_extra_blocks
    assert b.params.reuse_extra_blocks == 1  # 15 tokens after the selection start at most one block


def test_reused_selection_of_a_reselect_row_is_the_stored_selection():
    """reuse.reused_selection on reselect rows reads exactly the store's budget (no extra blocks), and a zero-length
    row (padding) reads nothing."""
    p = _params(4)
    stored = torch.arange(40).view(1, 1, 40).repeat(2, 2, 1)
    seq = torch.tensor([800, 0])
    sel = reuse.reused_selection(stored, torch.ones(2, dtype=torch.int32), torch.zeros(2, dtype=torch.int32), seq,
                                 p, p.reuse_extra_blocks)
    _, budget = planner.device_budgets(p, seq)
    assert sel.valid[0, 0].sum() == int(budget[0]) and sel.blocks[0, 0, :int(budget[0])].tolist() == list(range(6))
    assert not sel.valid[1].any()


def test_counts_reset_from_outside_inference_mode_on_a_tracker_made_inside_it():
    """The engine builds its trackers under inference mode; runner.stats_reset (collective_rpc) runs outside it."""
    from attention_backends.retrieval_decode import runner

    with torch.inference_mode():
        t = reuse.ReuseTracker(2, "cpu")
        t.step(torch.zeros(2, 4, dtype=torch.int32), torch.tensor([20, 30]), torch.tensor([True, True]), 4, BS)
    assert reuse.counts()["reselect_steps"] >= 2
    runner.stats_reset()
    assert int(t.reselected) == 0 and int(t.reused) == 0
