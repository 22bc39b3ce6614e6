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
    ("group_blocks=3", "retrieval_decode.group_blocks"),
    ("group_blocks=0", "retrieval_decode.group_blocks"),
    ("group_refine=0.5", "retrieval_decode.group_refine"),
    ("break_even=auto", "retrieval_decode.break_even"),
    ("select=sort", "retrieval_decode.select"),
    ("fused_kv_write=maybe", "retrieval_decode.fused_kv_write"),
])
def test_bad_values_name_the_key(setting, key):
    with pytest.raises(settings.KvplugConfigError, match=key.replace(".", r"\.")):
        settings.resolve(sets=[f"retrieval_decode.{setting}"], environ={})


def test_fused_kv_write_is_on_by_default_and_reaches_each_layers_runner(monkeypatch):
    """fused_kv_write (default true: the same bytes as the two launches, tests/attention_backends/retrieval_decode/
    test_triton_kernels.py) goes from the config to every layer's runner; false keeps the two launches."""
    from types import SimpleNamespace

    from attention_backends.retrieval_decode import backend_hooks

    assert settings.resolve(environ={}).retrieval_decode.fused_kv_write is True
    for sets, want in (([], True), (["retrieval_decode.fused_kv_write=false"], False)):
        cfg = settings.resolve(sets=["retrieval_decode.enabled=true", *sets], environ={}).retrieval_decode
        monkeypatch.setattr(backend_hooks, "_config", lambda cfg=cfg: cfg)
        r = backend_hooks.impl_runner(SimpleNamespace(scale=1.0, sliding_window=None, sinks=None, alibi_slopes=None))
        assert r.fused_kv_write is want


def test_params_budget_in_blocks():
    cfg = settings.resolve(sets=["retrieval_decode.recent_tokens=40", "retrieval_decode.budget_tokens=100"], environ={})
    p = RetrievalParams.from_config(cfg.retrieval_decode, block_size=16)
    assert p.recent_blocks == 4  # 40 tokens may straddle 4 blocks of 16
    import torch
    assert p.budget_blocks(torch.tensor([1000])).tolist() == [7]
    frac = RetrievalParams.from_config(settings.resolve(sets=["retrieval_decode.budget_fraction=0.1"], environ={})
                                       .retrieval_decode, block_size=32)
    assert frac.budget_blocks(torch.tensor([8000, 320])).tolist() == [25, 10]  # 800 tokens; floor sink+recent


def test_two_level_and_break_even_fields_reach_the_params(tmp_path, monkeypatch):
    """group_blocks / group_refine go to RetrievalParams; break_even="measured" raises min_context to this
    device's measured crossover (never lowers it), and an unmeasured device keeps min_context_tokens."""
    import json

    from attention_backends.retrieval_decode import break_even

    table = tmp_path / "break_even.json"
    table.write_text(json.dumps({"devices": {"GPU X": {"group_blocks=4": {"context_tokens": 30000},
                                                        "group_blocks=1": {"context_tokens": 1000}}}}))
    monkeypatch.setattr(break_even, "TABLE_PATH", table)
    monkeypatch.setattr(break_even.min_context, "__defaults__", ("bisect", table))
    cfg = settings.resolve(sets=["retrieval_decode.group_blocks=4", "retrieval_decode.group_refine=3",
                                 "retrieval_decode.break_even=measured"], environ={}).retrieval_decode
    p = RetrievalParams.from_config(cfg, block_size=16, device_name="GPU X")
    assert (p.group_blocks, p.group_refine, p.min_context_tokens) == (4, 3.0, 30000)
    assert RetrievalParams.from_config(cfg, block_size=16, device_name="GPU Y").min_context_tokens == 4096
    single = settings.resolve(sets=["retrieval_decode.break_even=measured"], environ={}).retrieval_decode
    assert RetrievalParams.from_config(single, block_size=16, device_name="GPU X").min_context_tokens == 4096
    off = settings.resolve(sets=["retrieval_decode.group_blocks=4"], environ={}).retrieval_decode
    assert RetrievalParams.from_config(off, block_size=16, device_name="GPU X").min_context_tokens == 4096


def test_graph_dense_path_is_off_by_default_and_reaches_the_params():
    cfg = settings.resolve(environ={}).retrieval_decode
    assert cfg.graph_dense_path is False
    assert RetrievalParams.from_config(cfg, block_size=16).graph_dense_path is False
    on = settings.resolve(sets=["retrieval_decode.graph_dense_path=true"], environ={}).retrieval_decode
    assert RetrievalParams.from_config(on, block_size=16).graph_dense_path is True
    with pytest.raises(settings.KvplugConfigError, match=r"retrieval_decode\.graph_dense_path"):
        settings.resolve(sets=["retrieval_decode.graph_dense_path=maybe"], environ={})
