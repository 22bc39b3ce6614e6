"""--set KEY=VALUE of the GPU scripts (gpu_sparse_prefill, gpu_retrieval_decode): extra config keys."""
from __future__ import annotations

import pytest

from benchmarks import harness


def test_set_pairs_become_section_keys():
    assert harness.set_pairs(["group_shared_selection=true", " fused_estimate = true "], "sparse_prefill") == {
        "group_shared_selection": "true", "fused_estimate": "true"}
    assert harness.set_pairs([], "retrieval_decode") == {}


@pytest.mark.parametrize("bad", ["group_blocks", "=4"])
def test_set_without_key_or_value_is_refused_naming_it(bad):
    with pytest.raises(SystemExit, match="expected KEY=VALUE \\(a retrieval_decode key\\)"):
        harness.set_pairs([bad], "retrieval_decode")
