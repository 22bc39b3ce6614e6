"""Pattern search pieces: captured mass == recall of the reference, choice = cheapest candidate reaching target."""
from __future__ import annotations

import torch

from attention_backends.sparse_prefill import search
from attention_backends.sparse_prefill.head_config import LayerPlan, build_index
from attention_backends.sparse_prefill.index import ChunkGeometry
from attention_backends.sparse_prefill.patterns import registry
from attention_backends.sparse_prefill.reference import attention_recall


def test_captured_mass_equals_reference_recall():
    g = torch.Generator().manual_seed(0)
    n, L = 300, 900
    q, k = torch.randn(n, 4, 16, generator=g), torch.randn(L, 2, 16, generator=g)
    geom = ChunkGeometry(n, L)
    for name, budgets in [("vertical_slash", {"vertical": 50, "slash": 80}), ("block_sparse", {"top_k": 3})]:
        index = build_index(q, k, geom, LayerPlan.uniform(name, 4, **budgets), 0.25)
        rows = torch.arange(n)
        mass = search.captured_mass(search.dense_probs(q, k, geom, rows, 0.25), index, rows, geom).mean(-1)
        torch.testing.assert_close(mass, attention_recall(q, k, index, 0.25), rtol=1e-4, atol=1e-4)


def test_choose_picks_cheapest_candidate_reaching_target_else_dense():
    cands = [("a_shape", {"sink": 64, "window": 64}), ("block_sparse", {"top_k": 4}), ("block_sparse", {"top_k": 8})]
    recall = torch.tensor([[0.99, 0.80, 0.90], [0.96, 0.97, 0.90], [0.999, 0.99, 0.94]])
    density = torch.tensor([[0.3, 0.3, 0.3], [0.2, 0.2, 0.2], [0.5, 0.5, 0.5]])
    heads = search.choose(recall, density, cands, 0.95)
    assert heads[0].pattern == "block_sparse" and heads[0].budgets == {"top_k": 4}  # 0.2 density, 0.96 recall
    assert heads[1].budgets == {"top_k": 4} or heads[1].pattern == "block_sparse"
    assert heads[2].pattern == registry.DENSE  # nothing reaches 0.95


def test_every_search_candidate_is_valid():
    for name, budgets in search.candidates():
        registry.get(name).check_budgets(budgets)


def test_cli_rejects_bad_input_with_one_line(tmp_path, capsys):
    from kvplug.cli import main

    assert main(["patterns", "search", "no-such-model", "--out", str(tmp_path / "c.json")]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
    assert main(["patterns", "search", str(tmp_path), "--out", str(tmp_path / "c.json"), "--target-recall", "1.5"]) == 2
    assert "--target-recall" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()
