"""benchmarks/sparse_prefill_replay.py: question and mode specs (the engine part is a diagnostic run by hand)."""
from __future__ import annotations

import pytest

from benchmarks import sparse_prefill_replay as replay


def test_questions_and_modes():
    assert replay.parse_questions("passkey-0-4@16000, passkey-0-1@24000:2,") == [
        ("passkey-0-4", 16000, 0), ("passkey-0-1", 24000, 2)]
    assert replay.mode_override("dense") == {"dense": True} and replay.mode_override("sparse") == {}
    assert replay.mode_override("tail256") == {"dense_tail_rows": 256}
    assert replay.mode_override("seg1024") == {"vertical_segment_rows": 1024}


@pytest.mark.parametrize("call, needle", [
    (lambda: replay.parse_questions("passkey-0-4"), "not CASE@CONTEXT"),
    (lambda: replay.parse_questions("@16000"), "has no case"),
    (lambda: replay.mode_override("tailx"), "unknown mode 'tailx'"),
])
def test_bad_specs_name_what_is_wrong(call, needle):
    with pytest.raises(SystemExit, match=needle):
        call()


def test_ablation_modes():
    assert replay.mode_override("oracle") == {"exact_selection": True, "vertical_segment_rows": 64}
    assert replay.mode_override("oracle_chunk") == {"exact_selection": True}
    assert replay.mode_override("budgets4") == {"budgets": 4.0}
    assert replay.mode_override("floor9000") == {"min_prompt_tokens": 9000}
    assert replay.mode_override("dense_first_chunk", chunk=4096) == {"min_prompt_tokens": 4097}
    assert replay.mode_override("dense_layers0-2+20") == {"dense_layers": (0, 1, 2, 20)}
    assert replay.mode_override("budgets2&dense_first_chunk") == {"budgets": 2.0, "min_prompt_tokens": 8193}


@pytest.mark.parametrize("mode, needle", [
    ("budgets0", "factor > 0"), ("budgetsx", "factor > 0"), ("dense_layers3-1", "A <= B"),
    ("dense_layers", "layers are"), ("seg64&oracle", "vertical_segment_rows twice"),
    ("dense&tail64", "dense takes no other mode"), ("nope", "unknown mode 'nope'"),
])
def test_bad_ablation_modes_name_what_is_wrong(mode, needle):
    with pytest.raises(SystemExit, match=needle):
        replay.mode_override(mode)


def test_mode_config_writes_the_derived_per_head_config(tmp_path):
    """budgets<F> and dense_layers<...> become a pattern_config the engine switches to; other keys pass through."""
    from attention_backends.sparse_prefill import head_config
    from attention_backends.sparse_prefill.model_identity import SHIPPED_CONFIGS

    base = str(SHIPPED_CONFIGS / "qwen2.5-coder-0.5b-instruct.json")
    cfg = head_config.load(base)
    assert replay.mode_config("tail64", {"dense_tail_rows": 64}, base, tmp_path) == {"dense_tail_rows": 64}
    mode = "budgets2&dense_layers20&dense_first_chunk"
    out = replay.mode_config(mode, replay.mode_override(mode), base, tmp_path)
    assert out["min_prompt_tokens"] == 8193 and set(out) == {"min_prompt_tokens", "pattern_config"}
    derived = head_config.load(out["pattern_config"])
    assert {derived.head(20, h).pattern for h in range(cfg.num_heads)} == {"dense"}
    for li, h in ((0, 2), (0, 0), (19, 0)):  # vertical_slash 2000/2048, block_sparse top_k 8: doubled
        want = {k: 2 * v for k, v in cfg.head(li, h).budgets.items()}
        assert derived.head(li, h).budgets == want and cfg.head(li, h).pattern != "dense"
    assert derived.searched_tokens == cfg.searched_tokens  # budget scaling with length still applies
    with pytest.raises(SystemExit, match="layer 24 out of range"):
        replay.mode_config("dense_layers24", {"dense_layers": (24,)}, base, tmp_path)
