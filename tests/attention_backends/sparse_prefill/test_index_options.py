"""IndexOptions (index_options.py): the sparse_prefill keys that shape each chunk's index and kernel, made once from
the config (SparsePrefillConfig.index_options) and handed down whole."""
from __future__ import annotations

import dataclasses

import msgspec
import pytest

from attention_backends.sparse_prefill.config import SparsePrefillConfig
from attention_backends.sparse_prefill.index_options import IndexOptions
from kvplug import settings

# The sparse_prefill keys that are not index options, each for a reason: the decision to go sparse (enabled,
# min_prompt_tokens, cost_table, cost_margin), which patterns and budgets (pattern_config, default_pattern,
# default_budgets, budget_scale_limit: the layer plans), which kernel library (executor: runner.executor).
NOT_INDEX_OPTIONS = {"enabled", "min_prompt_tokens", "cost_table", "cost_margin", "pattern_config", "default_pattern",
                     "default_budgets", "budget_scale_limit", "executor"}
OPTION_FIELDS = [f.name for f in dataclasses.fields(IndexOptions)]


def _set(field: str):
    """A valid value of ``field`` other than its default (ints: whole query blocks, unlike any other field's)."""
    default = getattr(IndexOptions(), field)
    if isinstance(default, bool):
        return not default
    return 64 * (2 + OPTION_FIELDS.index(field))


def test_every_config_key_is_an_index_option_or_known_not_to_be():
    """A new sparse_prefill key must be carried into IndexOptions or listed above: this fails until it is."""
    keys = {f.name for f in msgspec.structs.fields(SparsePrefillConfig)}
    assert keys == set(OPTION_FIELDS) | NOT_INDEX_OPTIONS, (sorted(keys - set(OPTION_FIELDS) - NOT_INDEX_OPTIONS),
                                                            sorted((set(OPTION_FIELDS) | NOT_INDEX_OPTIONS) - keys))
    defaults = SparsePrefillConfig()
    assert defaults.index_options() == IndexOptions()  # the same defaults
    assert all(getattr(defaults, f) == getattr(IndexOptions(), f) for f in OPTION_FIELDS)


@pytest.mark.parametrize("field", OPTION_FIELDS)
def test_each_config_key_reaches_its_field_and_only_it(field):
    value = _set(field)
    cfg = settings.resolve(sets=[f"sparse_prefill.{field}={str(value).lower()}"], environ={}).sparse_prefill
    assert cfg.index_options() == dataclasses.replace(IndexOptions(), **{field: value})


def test_all_keys_at_once():
    cfg = msgspec.convert({f: _set(f) for f in OPTION_FIELDS}, SparsePrefillConfig)
    options = cfg.index_options()
    assert {f: getattr(options, f) for f in OPTION_FIELDS} == {f: _set(f) for f in OPTION_FIELDS}


@pytest.mark.parametrize("sets, message", [
    (["sparse_prefill.dense_tail_rows=-1"], "sparse_prefill.dense_tail_rows must be >= 0 (0 = off), got -1"),
    (["sparse_prefill.vertical_segment_rows=100"],
     "sparse_prefill.vertical_segment_rows must be 0 (off) or a positive multiple of 64 (whole query blocks), got 100"),
    (["sparse_prefill.vertical_segment_rows=-64"], "sparse_prefill.vertical_segment_rows must be 0 (off)"),
])
def test_bad_values_are_config_errors_naming_the_key(sets, message):
    """The config's checks live in IndexOptions; the config still reports them under its own path, as before."""
    with pytest.raises(settings.KvplugConfigError) as err:
        settings.resolve(sets=sets, environ={})
    assert message in str(err.value)


@pytest.mark.parametrize("kwargs, exc, needle", [
    ({"dense_tail_rows": -64}, ValueError, "dense_tail_rows"),
    ({"vertical_segment_rows": 96}, ValueError, "vertical_segment_rows"),
    ({"group_shared": True}, TypeError, "group_shared"),  # the config key's name, not a shorthand
])
def test_bad_options_name_the_field(kwargs, exc, needle):
    with pytest.raises(exc, match=needle):
        IndexOptions(**kwargs)


def test_keyword_only_frozen_and_hashable():
    """Hashable: the warm-up keys on it and torch.compile takes it as a constant; frozen, so a runner's options
    cannot change under a compiled graph (reconfigure replaces them whole)."""
    with pytest.raises(TypeError):
        IndexOptions(True)  # noqa: FBT003 - which flag would that be?
    options = IndexOptions(group_shared_selection=True, dense_tail_rows=64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.dense_tail_rows = 0
    assert hash(options) == hash(IndexOptions(group_shared_selection=True, dense_tail_rows=64))
    assert len({options, IndexOptions(group_shared_selection=True, dense_tail_rows=64), IndexOptions()}) == 2
