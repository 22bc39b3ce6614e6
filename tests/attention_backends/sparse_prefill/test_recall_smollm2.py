"""Attention recall of the pattern config kvplug uses for SmolLM2 (shipped config, else the default), on
SmolLM2's real post-RoPE Q/K of a locally generated 4K KV-retrieval prompt, replaying chunked prefill."""
from __future__ import annotations

import pytest
import torch

from attention_backends.sparse_prefill import calibration, planner, search


@pytest.fixture(scope="module")
def captured(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    prompt, _ = calibration.kv_retrieval(lambda s: len(tok(s).input_ids), 4096, seed=123)  # not the search's seed
    torch.manual_seed(0)
    return search.capture_qk(str(smollm2_path), prompt, "cpu")


def test_recall_of_the_config_in_use_is_at_least_095(captured, smollm2_path):
    qs, ks, scale, T = captured
    assert T >= 4000 and len(qs) == 30 and qs[0].shape[1] == 9 and ks[0].shape[1] == 3
    cfg = planner.pattern_config_for("auto", str(smollm2_path), "vertical_slash", "{}")
    recall, density = search.evaluate_config(qs, ks, scale, cfg, chunk=1024, rows_per_chunk=256)
    print(f"SmolLM2 4K: mean recall {recall.mean():.4f} (min head {recall.min():.4f}), density {density.mean():.4f}")
    assert recall.mean() >= 0.95
    assert density.mean() < 1.0  # it is actually sparse
