import pytest

from attention_backends.retrieval_decode.planner import RetrievalParams
from kvplug import settings


def test_defaults_are_off_and_valid():
    cfg = settings.resolve(environ={})
    assert cfg.retrieval_decode.enabled is False
    assert "retrieval_decode" not in cfg.enabled_features()


def test_enabled_via_set_and_env():
    cfg = settings.resolve(sets=["retrieval_decode.enabled=true", "retrieval_decode.budget_fraction=0.1"],
                         environ={"KVPLUG_RETRIEVAL_DECODE__SINK_BLOCKS": "2"})
    rd = cfg.retrieval_decode
    assert rd.enabled and rd.budget_fraction == 0.1 and rd.sink_blocks == 2
    assert "retrieval_decode" in cfg.enabled_features()


@pytest.mark.parametrize("setting, key", [
    ("budget_tokens=0", "retrieval_decode.budget_tokens"),
    ("budget_fraction=1.5", "retrieval_decode.budget_fraction"),
    ("sink_blocks=-1", "retrieval_decode.sink_blocks"),
    ("recent_tokens=0", "retrieval_decode.recent_tokens"),
    ("min_context_tokens=-5", "retrieval_decode.min_context_tokens"),
    ("gqa_reduce=mean", "retrieval_decode.gqa_reduce"),
    ("recent_tokens=4096", "retrieval_decode.budget_tokens"),
    ("budget=3", "retrieval_decode.budget"),
    ("budget_tokens=lots", "retrieval_decode.budget_tokens"),
])
def test_bad_values_name_the_key(setting, key):
    with pytest.raises(settings.KvplugConfigError, match=key.replace(".", r"\.")):
        settings.resolve(sets=[f"retrieval_decode.{setting}"], environ={})


def test_params_budget_in_blocks():
    cfg = settings.resolve(sets=["retrieval_decode.recent_tokens=40", "retrieval_decode.budget_tokens=100"], environ={})
    p = RetrievalParams.from_config(cfg.retrieval_decode, block_size=16)
    assert p.recent_blocks == 4  # 40 tokens may straddle 4 blocks of 16
    import torch
    assert p.budget_blocks(torch.tensor([1000])).tolist() == [7]
    frac = RetrievalParams.from_config(settings.resolve(sets=["retrieval_decode.budget_fraction=0.1"], environ={})
                                       .retrieval_decode, block_size=32)
    assert frac.budget_blocks(torch.tensor([8000, 320])).tolist() == [25, 10]  # 800 tokens; floor sink+recent
