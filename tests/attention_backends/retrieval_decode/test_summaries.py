import torch

from attention_backends.retrieval_decode.summaries import BlockSummaries, refresh_blocks_, update_summaries_
from tests.attention_backends.retrieval_decode.helpers import make_case


def test_summaries_equal_min_max_of_written_keys():
    case = make_case()
    bs = case.key_cache.shape[2]
    for i, s in enumerate(case.seq_lens.tolist()):
        for b in range(-(-s // bs)):
            phys = int(case.block_table[i, b])
            n = min(bs, s - b * bs)
            keys = case.key_cache[phys, :, :n]  # [H, n, D]
            assert torch.equal(case.summaries.kmin[phys], keys.amin(dim=1))
            assert torch.equal(case.summaries.kmax[phys], keys.amax(dim=1))


def test_unwritten_blocks_stay_empty_and_padding_goes_to_trash_row():
    s = BlockSummaries.allocate(4, 1, 2, block_size=4)
    key = torch.tensor([[[1.0, -1.0]], [[5.0, 5.0]]])
    s.update(key, torch.tensor([5, -1]))  # block 1 offset 1; second token is padding
    assert torch.equal(s.kmin[1, 0], torch.tensor([1.0, -1.0]))
    assert torch.isinf(s.kmin[[0, 2, 3]]).all() and (s.kmin[[0, 2, 3]] > 0).all()
    assert torch.equal(s.kmax[4, 0], torch.tensor([5.0, 5.0]))  # trash row absorbed the pad


def test_freed_and_reused_block_gets_fresh_summary():
    s = BlockSummaries.allocate(4, 1, 2, block_size=4)
    # Old owner fills block 2 with large keys.
    s.update(torch.full((4, 1, 2), 100.0), torch.tensor([8, 9, 10, 11]))
    assert s.kmax[2, 0, 0] == 100.0
    # Block 2 is freed and reallocated: the new owner writes from offset 0 (a prefill chunk of 2 tokens)...
    s.update(torch.tensor([[[1.0, 2.0]], [[3.0, -4.0]]]), torch.tensor([8, 9]))
    assert torch.equal(s.kmax[2, 0], torch.tensor([3.0, 2.0]))
    assert torch.equal(s.kmin[2, 0], torch.tensor([1.0, -4.0]))
    # ...then a decode token lands at offset 2 and is merged, not reset.
    s.update(torch.tensor([[[-7.0, 9.0]]]), torch.tensor([10]))
    assert torch.equal(s.kmax[2, 0], torch.tensor([3.0, 9.0]))
    assert torch.equal(s.kmin[2, 0], torch.tensor([-7.0, -4.0]))


def test_shared_prefix_block_shares_its_summary():
    # Two sequences whose block tables both point at physical block 0 (a prefix-cache hit) see one summary;
    # the second sequence's own new block does not touch it.
    s = BlockSummaries.allocate(3, 1, 1, block_size=2)
    s.update(torch.tensor([[[1.0]], [[2.0]]]), torch.tensor([0, 1]))  # seq A writes the shared block
    s.update(torch.tensor([[[9.0]]]), torch.tensor([4]))  # seq B, after a prefix hit, writes block 2
    assert s.kmax[0, 0, 0] == 2.0 and s.kmax[2, 0, 0] == 9.0


def test_update_is_shape_static_on_meta_tensors():
    # Meta tensors have no data: any .item(), bool() or data-dependent shape would raise here.
    kmin = torch.empty(9, 2, 8, device="meta")
    kmax = torch.empty(9, 2, 8, device="meta")
    update_summaries_(kmin, kmax, torch.empty(6, 2, 8, device="meta"),
                      torch.empty(5, dtype=torch.int64, device="meta"), 16)


def test_refresh_blocks_recomputes_from_cache():
    case = make_case()
    s = case.summaries
    phys = case.block_table[0, :3].long()
    want_min, want_max = s.kmin[phys].clone(), s.kmax[phys].clone()
    s.kmin[phys] = 0.0
    s.kmax[phys] = 0.0
    refresh_blocks_(s.kmin, s.kmax, case.key_cache, phys)
    assert torch.equal(s.kmin[phys], want_min) and torch.equal(s.kmax[phys], want_max)
