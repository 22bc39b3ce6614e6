"""sparse_prefill config section: defaults, env/CLI layering, errors that name the key."""
from __future__ import annotations

import pytest

from kvplug import settings


def test_defaults_off_cost_model_and_floor_auto():
    cfg = settings.resolve(environ={})
    sp = cfg.sparse_prefill
    assert sp.enabled is False and sp.min_prompt_tokens is None  # 8192 with a cost table, 32768 without
    assert (sp.cost_table, sp.cost_margin, sp.pattern_config) == ("auto", 1.2, "auto")
    assert "sparse_prefill" not in cfg.enabled_features()


def test_env_and_set_layering():
    cfg = settings.resolve(sets=["sparse_prefill.min_prompt_tokens=4096"],
                         environ={"KVPLUG_SPARSE_PREFILL__ENABLED": "true",
                                  "KVPLUG_SPARSE_PREFILL__DEFAULT_BUDGETS": '{"top_k": 8}',
                                  "KVPLUG_SPARSE_PREFILL__DEFAULT_PATTERN": "block_sparse"})
    sp = cfg.sparse_prefill
    assert sp.enabled and sp.min_prompt_tokens == 4096 and sp.default_budgets == {"top_k": 8}
    assert "sparse_prefill" in cfg.enabled_features()


@pytest.mark.parametrize("sets,needle", [
    (["sparse_prefill.min_prompt_tokens=0"], "sparse_prefill.min_prompt_tokens"),
    (["sparse_prefill.default_pattern=streaming"], "sparse_prefill.default_pattern"),
    (["sparse_prefill.default_budgets={\"window\": 5}"], "sparse_prefill.default_budgets"),
    (["sparse_prefill.pattern_config=/nonexistent.json"], "sparse_prefill.pattern_config"),
    (["sparse_prefill.budget=3"], "sparse_prefill.budget"),
    (["sparse_prefill.dense_tail_rows=-1"], "sparse_prefill.dense_tail_rows"),
    (["sparse_prefill.dense_tail_rows=lots"], "sparse_prefill.dense_tail_rows"),
    (["sparse_prefill.vertical_segment_rows=-64"], "sparse_prefill.vertical_segment_rows"),
    (["sparse_prefill.vertical_segment_rows=100"], "sparse_prefill.vertical_segment_rows"),  # not whole blocks
])
def test_bad_values_name_the_key(sets, needle):
    with pytest.raises(settings.KvplugConfigError, match=needle.replace(".", r"\.")):
        settings.resolve(sets=sets, environ={})


def test_group_shared_and_fused_estimate_off_by_default_and_settable():
    sp = settings.resolve(environ={}).sparse_prefill
    assert sp.group_shared_selection is False and sp.fused_estimate is False
    sp = settings.resolve(sets=["sparse_prefill.group_shared_selection=true", "sparse_prefill.fused_estimate=true"],
                          environ={}).sparse_prefill
    assert sp.group_shared_selection is True and sp.fused_estimate is True
    with pytest.raises(settings.KvplugConfigError, match=r"sparse_prefill\.fused_estimate"):
        settings.resolve(sets=["sparse_prefill.fused_estimate=maybe"], environ={})


def test_dense_tail_rows_off_by_default_and_settable():
    assert settings.resolve(environ={}).sparse_prefill.dense_tail_rows == 0
    sp = settings.resolve(environ={"KVPLUG_SPARSE_PREFILL__DENSE_TAIL_ROWS": "128"}).sparse_prefill
    assert sp.dense_tail_rows == 128


def test_vertical_segment_rows_off_by_default_and_settable():
    assert settings.resolve(environ={}).sparse_prefill.vertical_segment_rows == 0
    sp = settings.resolve(sets=["sparse_prefill.vertical_segment_rows=1024"], environ={}).sparse_prefill
    assert sp.vertical_segment_rows == 1024


def test_exact_selection_off_by_default_and_settable():
    assert settings.resolve(environ={}).sparse_prefill.exact_selection is False
    assert settings.resolve(sets=["sparse_prefill.exact_selection=true"], environ={}).sparse_prefill.exact_selection
    with pytest.raises(settings.KvplugConfigError, match=r"sparse_prefill\.exact_selection"):
        settings.resolve(sets=["sparse_prefill.exact_selection=maybe"], environ={})
