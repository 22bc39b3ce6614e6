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
    staged = tmp_path / "qwen2.5-coder-0.5b"  # the name ../shared/gpu/stage-model.sh gives the folder
    assert acc.pattern_config_path("auto", staged).endswith("qwen2.5-coder-0.5b-instruct.json")
    assert acc.pattern_config_path("auto", tmp_path / "smollm2-135m-instruct").endswith("smollm2-135m-instruct.json")
    assert acc.pattern_config_path("/x/cfg.json", staged) == "/x/cfg.json"
    with pytest.raises(SystemExit, match="--pattern-config"):
        acc.pattern_config_path("auto", Path("/no/such-model"))
