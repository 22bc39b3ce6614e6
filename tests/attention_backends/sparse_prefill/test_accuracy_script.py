"""benchmarks/sparse_prefill_accuracy.py pieces that need no engine: answer agreement classes, config lookup."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import sparse_prefill_accuracy as acc


def test_agreement_classes():
    top2 = [[[5, -0.1], [6, -2.0]], [[7, -0.6], [8, -0.8]]]
    assert acc.agreement([5, 7], top2, [5, 7]) == "same"
    assert acc.agreement([5, 7], top2, [5, 8]) == "near_tie"  # dense's runner-up, 0.2 nats behind
    assert acc.agreement([5, 7], top2, [5, 8], near_tie=0.1) == "differ"
    assert acc.agreement([5, 7], top2, [6, 7]) == "differ"  # 1.9 nats: a real change
    assert acc.agreement([5, 7], top2, [5, 9]) == "differ"  # not even dense's runner-up


def test_pattern_config_lookup(tmp_path):
    """By the model's identity (its config.json), whatever the folder is called."""
    import json

    from attention_backends.sparse_prefill import head_config, model_identity

    def folder(name: str, shipped: str) -> Path:
        ident = head_config.load(model_identity.SHIPPED_CONFIGS / shipped).identity
        cfg = {"architectures": [ident.architecture], "num_hidden_layers": ident.num_layers,
               "num_attention_heads": ident.num_heads} | {k: v for k, v in ident.fields.items() if k in (
                   "model_type", "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings")}
        cfg |= {"num_key_value_heads": ident.num_kv_heads, "head_dim": ident.head_dim,
                "rope_theta": ident.fields["rope_theta"]}
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        return tmp_path / name

    staged = folder("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct.json")  # stage-model.sh's folder name
    assert acc.pattern_config_path("auto", staged).endswith("qwen2.5-coder-0.5b-instruct.json")
    assert acc.pattern_config_path("auto", folder("renamed", "smollm2-135m-instruct.json")).endswith(
        "smollm2-135m-instruct.json")
    assert acc.pattern_config_path("/x/cfg.json", staged) == "/x/cfg.json"
    with pytest.raises(SystemExit, match="--pattern-config"):
        acc.pattern_config_path("auto", Path("/no/such-model"))


def test_task_summary_counts_what_dense_gets_right():
    """--tasks mode: per-task accuracy from the scorer, the paired difference, and answers kept where dense is
    right (a sparse answer that differs from a wrong dense answer does not count against it)."""
    items = [{"case": i // 2, "task": "passkey", "turn": i % 2, "context_tokens": 8000, "answer": "123",
              "scorer": "substring"} for i in range(4)]
    top = [[[1, -0.1], [2, -3.0]]]
    dense = {"prompt_tokens": [9000] * 4, "token_ids": [[1], [1], [1], [1]], "top2": [top] * 4,
             "texts": ["123", "123", "9", "9"]}
    sparse = {"token_ids": [[1], [2], [1], [2]], "texts": ["123", "8", "9", "123"]}
    out = acc.task_summary(items, dense, sparse, near_tie=0.5)
    t = out["per_task"]["passkey"]
    assert t["n"] == 4 and t["dense_accuracy"] == 0.5 and t["sparse_accuracy"] == 0.5
    assert t["dense_right"] == 2 and t["kept_where_dense_right"] == 0.5
    assert t["identical"] == 0.5
    assert t["sparse_minus_dense"]["mean"] == 0.0
    assert out["per_turn"]["1"]["n"] == 2
    assert out["overall"]["n"] == 4
