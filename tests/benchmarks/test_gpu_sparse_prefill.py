"""benchmarks/gpu_sparse_prefill.py pieces that need no GPU: the extra sparse_prefill keys of the kvplug run."""
from __future__ import annotations

import pytest

from benchmarks import gpu_sparse_prefill as bench


def test_set_pairs_become_sparse_prefill_keys():
    assert bench.extra_keys(["group_shared_selection=true", " fused_estimate = true "]) == {
        "group_shared_selection": "true", "fused_estimate": "true"}
    assert bench.extra_keys([]) == {}


@pytest.mark.parametrize("bad", ["group_shared_selection", "=true"])
def test_set_without_key_or_value_is_refused_naming_it(bad):
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        bench.extra_keys([bad])
