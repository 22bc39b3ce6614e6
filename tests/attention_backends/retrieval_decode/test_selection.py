import pytest
import torch

from attention_backends.retrieval_decode.reference import dense_decode_attention, selected_block_attention
from attention_backends.retrieval_decode.selection import gather_summaries, quest_scores, select_for_queries
from tests.attention_backends.retrieval_decode.helpers import make_case

SCALE = 0.25


def _select(case, budget_blocks, k, sink=1, recent=1, reduce="max"):
    bs = case.key_cache.shape[2]
    nb = (case.seq_lens + bs - 1) // bs
    return select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table, nb,
                              torch.as_tensor(budget_blocks).expand_as(nb), k, sink, recent, reduce)


def _naive_dense(case):
    """Independent oracle: gather each sequence's keys contiguously and run plain softmax attention."""
    bs = case.key_cache.shape[2]
    outs = []
    for i, s in enumerate(case.seq_lens.tolist()):
        pos = torch.arange(s)
        phys = case.block_table[i, pos // bs].long()
        k = case.key_cache[phys, :, pos % bs]  # [s, H, D]
        v = case.value_cache[phys, :, pos % bs]
        hkv = k.shape[1]
        q = case.q[i].view(hkv, -1, k.shape[-1])
        p = torch.softmax(torch.einsum("hgd,shd->hgs", q, k) * SCALE, dim=-1)
        outs.append(torch.einsum("hgs,shd->hgd", p, v).reshape(-1, k.shape[-1]))
    return torch.stack(outs)


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_budget_of_all_blocks_equals_dense_exactly(reduce):
    case = make_case()
    width = case.block_table.shape[1]
    sel = _select(case, width, width, reduce=reduce)
    bs = case.key_cache.shape[2]
    assert torch.equal(sel.valid.sum(-1), ((case.seq_lens + bs - 1) // bs).view(-1, 1).expand(-1, 2))
    out = selected_block_attention(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, sel,
                                   SCALE)
    dense = dense_decode_attention(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, SCALE)
    assert torch.equal(out, dense)
    torch.testing.assert_close(dense, _naive_dense(case), rtol=1e-5, atol=1e-5)


def test_quest_score_bounds_every_key_in_the_block():
    case = make_case(seq_lens=(256,), hkv=1, group=1)
    smin, smax = gather_summaries(case.summaries.kmin, case.summaries.kmax, case.block_table)
    scores = quest_scores(case.q.view(1, 1, 1, -1), smin, smax)  # [1, 1, B]
    for b in range(16):
        keys = case.key_cache[int(case.block_table[0, b]), 0]  # [bs, D]
        assert scores[0, 0, b] >= (keys @ case.q[0, 0]).max() - 1e-5


def test_planted_block_is_selected_per_kv_head():
    case = make_case(seq_lens=(1024, 800), hkv=2, group=3, d=16)
    bs = case.key_cache.shape[2]
    planted = {(0, 0): 20, (0, 1): 37, (1, 0): 5, (1, 1): 44}
    for (seq, head), blk in planted.items():
        phys = int(case.block_table[seq, blk])
        # One query head of the group points at a key that only the planted block contains.
        direction = case.q[seq, head * 3 + 1] / case.q[seq, head * 3 + 1].norm()
        case.key_cache[phys, head, 7] = 40 * direction
        case.summaries.update(case.key_cache[phys, :, 7].unsqueeze(0).clone(), torch.tensor([phys * bs + 7]))
    sel = _select(case, budget_blocks=4, k=4, sink=1, recent=1)
    for (seq, head), blk in planted.items():
        picked = sel.blocks[seq, head][sel.valid[seq, head]].tolist()
        nb = -(-int(case.seq_lens[seq]) // bs)
        assert blk in picked and 0 in picked and nb - 1 in picked and len(picked) == 4
        assert picked == sorted(picked)


def test_budgets_per_sequence_and_forced_blocks():
    case = make_case(seq_lens=(1024, 400, 40))
    bs = case.key_cache.shape[2]
    nb = (case.seq_lens + bs - 1) // bs  # 64, 25, 3
    budgets = torch.tensor([10, 6, 10])
    sel = select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table, nb, budgets, 10,
                             sink_blocks=2, recent_blocks=3)
    count = sel.valid.sum(-1)
    assert count[0].tolist() == [10, 10] and count[1].tolist() == [6, 6] and count[2].tolist() == [3, 3]
    for i in range(2):
        for h in range(2):
            picked = sel.blocks[i, h][sel.valid[i, h]].tolist()
            assert {0, 1, int(nb[i]) - 3, int(nb[i]) - 2, int(nb[i]) - 1} <= set(picked)
    # Invalid slots point at a readable block of the sequence.
    assert (sel.blocks < nb.view(-1, 1, 1)).all()


def test_sparse_attention_is_close_to_dense_when_budget_covers_the_mass():
    # Keys of one block aligned with the query dominate the softmax: top-k keeps it and the output is ~dense.
    case = make_case(seq_lens=(2048,), hkv=1, group=2, d=32)
    case.key_cache *= 0.1
    bs = case.key_cache.shape[2]
    phys = int(case.block_table[0, 50])
    case.key_cache[phys, 0] = case.q[0, 0] * 3
    pos = torch.arange(2048)
    slots = case.block_table[0, pos // bs].long() * bs + pos % bs
    case.summaries.update(case.key_cache[slots // bs, :, slots % bs], slots)
    sel = _select(case, budget_blocks=8, k=8)
    assert 50 in sel.blocks[0, 0].tolist()
    out = selected_block_attention(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, sel, 1.0)
    dense = dense_decode_attention(case.q, case.key_cache, case.value_cache, case.block_table, case.seq_lens, 1.0)
    torch.testing.assert_close(out[0, 0], dense[0, 0], rtol=0, atol=1e-3)


def test_selection_and_attention_are_shape_static_on_meta_tensors():
    """No .item(), no bool(), no data-dependent shapes: everything runs on data-less meta tensors."""
    m = dict(device="meta")
    n, hkv, g, d, width, nblk, bs, k = 3, 2, 4, 16, 40, 200, 16, 8
    q = torch.empty(n, hkv * g, d, **m)
    kmin = torch.empty(nblk + 1, hkv, d, **m)
    kmax = torch.empty(nblk + 1, hkv, d, **m)
    table = torch.empty(n, width, dtype=torch.int32, **m)
    nb = torch.empty(n, dtype=torch.int64, **m)
    sel = select_for_queries(q, kmin, kmax, table, nb, nb, k, 1, 2)
    assert sel.blocks.shape == (n, hkv, k)
    cache = torch.empty(nblk, hkv, bs, d, **m)
    out = selected_block_attention(q, cache, cache, table, nb, sel, 0.1)
    assert out.shape == q.shape


def _two_level(case, budget_tokens, group_blocks, refine, recent_tokens=48):
    from attention_backends.retrieval_decode import planner

    p = planner.RetrievalParams(block_size=16, budget_tokens=budget_tokens, budget_fraction=0.0, sink_blocks=1,
                                recent_tokens=recent_tokens, min_context_tokens=64, group_blocks=group_blocks,
                                group_refine=refine)
    nb, budget = planner.device_budgets(p, case.seq_lens)
    k = int(budget.max())
    groups = p.candidate_groups(budget) if group_blocks > 1 else None
    sel = select_for_queries(case.q, case.summaries.kmin, case.summaries.kmax, case.block_table, nb, budget, k,
                             p.sink_blocks, p.recent_blocks, "max", group_blocks, groups)
    return sel, nb, budget, p


def test_two_level_keeps_exactly_the_budget_with_sink_and_window_and_only_candidate_blocks():
    """Every (sequence, kv-head) reads exactly its budget; sink and recent blocks are in; every other block comes
    from a kept group; with candidates covering every group it is single-level Quest exactly."""
    case = make_case(seq_lens=(1500, 777, 300), hkv=2, group=3, num_blocks=256)
    sel, nb, budget, p = _two_level(case, 256, 4, 1.0)
    assert sel.valid.sum(-1).tolist() == [[int(b)] * 2 for b in budget]
    for n in range(3):
        for h in range(2):
            picked = set(sel.blocks[n, h][sel.valid[n, h]].tolist())
            assert 0 in picked and set(range(int(nb[n]) - p.recent_blocks, int(nb[n]))) <= picked
    single, *_ = _two_level(case, 256, 1, 1.0)
    everything, *_ = _two_level(case, 256, 4, 100.0)
    assert torch.equal(everything.blocks, single.blocks) and torch.equal(everything.valid, single.valid)
    assert not torch.equal(sel.blocks, single.blocks)  # one candidate group per 4 budget blocks: a real cut


def test_two_level_finds_a_planted_block_through_its_group():
    """A block whose keys align with the query lifts its group's bound too: found at a small budget."""
    case = make_case(seq_lens=(2000,), hkv=1, group=2, d=16, num_blocks=200)
    target = 61
    phys = int(case.block_table[0, target])
    direction = case.q[0, 0] / case.q[0, 0].norm()
    case.summaries.kmin[phys, 0] = torch.minimum(case.summaries.kmin[phys, 0], 40 * direction)
    case.summaries.kmax[phys, 0] = torch.maximum(case.summaries.kmax[phys, 0], 40 * direction)
    sel, *_ = _two_level(case, 128, 4, 1.0)
    assert target in sel.blocks[0, 0][sel.valid[0, 0]].tolist()


def test_block_agreement_counts_only_free_picks():
    from attention_backends.retrieval_decode.analysis import block_agreement
    from attention_backends.retrieval_decode.runner import selection_mask
    from attention_backends.retrieval_decode.selection import Selection

    a = Selection(torch.tensor([[[0, 3, 5, 9]]]), torch.tensor([[[True, True, True, False]]]))
    b = Selection(torch.tensor([[[0, 4, 5, 9]]]), torch.tensor([[[True, True, True, True]]]))
    ma, mb = selection_mask(a, 10), selection_mask(b, 10)
    assert ma[0, 0].nonzero().flatten().tolist() == [0, 3, 5]  # the invalid slot's block 9 is not read
    forced = (torch.arange(10) == 0).view(1, 1, 10)
    assert block_agreement(ma, mb, forced) == (1, 3)  # of b's free picks 4, 5, 9: a shares 5
