import torch

from attention_backends.retrieval_decode import planner
from attention_backends.retrieval_decode.planner import RetrievalParams

P = RetrievalParams(block_size=16, budget_tokens=64, budget_fraction=0.0, sink_blocks=1, recent_tokens=16,
                    min_context_tokens=100)


def test_plan_picks_long_decodes_only():
    # reqs: decode long (seq 500), prefill chunk (3 tokens), decode short (seq 50), decode within budget (seq 60)
    qsl = torch.tensor([0, 1, 4, 5, 6, 0, 0])  # padded to more requests than num_reqs
    seq = torch.tensor([500, 300, 50, 60])
    table = torch.arange(4 * 40, dtype=torch.int32).view(4, 40)
    p = planner.plan(P, qsl, seq, 4, table, num_tokens=8)
    assert p is not None
    assert p.req_ids.tolist() == [0] and p.rows.tolist() == [0]
    assert p.rest_req_ids.tolist() == [1, 2, 3] and p.rest_rows.tolist() == [1, 2, 3, 4, 5]
    assert p.k == 4 and p.budget_blocks.tolist() == [4] and p.num_blocks.tolist() == [32]
    assert p.blocks_read == 4 and p.blocks_total == 32
    assert torch.equal(p.block_table, table[:1])
    assert planner.selected_tokens(p).tolist() == [3 * 16 + 4]  # 500 = 31*16 + 4


def test_no_plan_when_everything_is_dense():
    qsl = torch.tensor([0, 5, 6])
    assert planner.plan(P, qsl, torch.tensor([5, 90]), 2, torch.zeros(2, 8, dtype=torch.int32), 6) is None


def test_split_lengths_follow_the_kernels_rule_and_zero_the_other_path():
    """The graph's dense path (graph_dense_path): each length lands in exactly one of the two buffers, retrieval
    exactly where the kernels' own rule (device_budgets: budget < blocks, >= min_context) says so, for a fixed
    budget (one comparison) and a fractional one; padding rows (0) go nowhere."""
    import dataclasses

    seq = torch.arange(0, 700, dtype=torch.int32)
    for params in (P, dataclasses.replace(P, min_context_tokens=0), dataclasses.replace(P, budget_tokens=100),
                   dataclasses.replace(P, budget_fraction=0.3, min_context_tokens=40)):
        nb, budget = planner.device_budgets(params, seq)
        want = budget < nb
        assert torch.equal(planner.retrieval_rows(params, seq), want), params
        dense, retrieval = torch.full_like(seq, -1), torch.full_like(seq, -1)
        planner.split_lengths(params, seq, dense, retrieval)
        assert torch.equal(retrieval, torch.where(want, seq, 0)) and torch.equal(dense, torch.where(want, 0, seq))
        assert torch.equal(dense + retrieval, seq) and bool(want.any()) and bool((~want[1:]).any())


def test_graph_k_drops_min_contexts_read_all_slots_with_the_dense_path():
    """Without the dense path a sequence under min_context reads all its blocks through the k slots; with it
    those go to the dense kernel, so k is the largest sparse budget (at min_context 40K: 2502 -> 128 slots)."""
    import dataclasses

    p = RetrievalParams(block_size=16, budget_tokens=2048, budget_fraction=0.0, sink_blocks=1, recent_tokens=256,
                        min_context_tokens=40027)
    assert planner.graph_k(p, 131072) == 2502
    assert planner.graph_k(dataclasses.replace(p, graph_dense_path=True), 131072) == 128
