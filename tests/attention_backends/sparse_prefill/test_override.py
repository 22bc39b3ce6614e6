"""backend_hooks.set_override (the accuracy benchmark's --variants): one engine switches the per-head config,
group-shared selection and budget scaling between sweeps, or sends every chunk dense; bad keys are named."""
from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch

from attention_backends import wiring
from attention_backends.retrieval_decode.config import RetrievalDecodeConfig
from attention_backends.sparse_prefill import backend_hooks, head_config, runner
from attention_backends.sparse_prefill.config import SparsePrefillConfig
from attention_backends.sparse_prefill.index_options import IndexOptions
from attention_backends.sparse_prefill.model_identity import SHIPPED_CONFIGS
from kvplug.metrics import MetricsConfig

SHIPPED = str(SHIPPED_CONFIGS / "smollm2-135m-instruct.json")


@pytest.fixture
def hooks(monkeypatch, tmp_path):
    """Sparse prefill on with the shipped SmolLM2 config; a fresh override state; a second config searched at
    another length (what a variant switches to)."""
    monkeypatch.setattr(wiring, "_current", None)
    wiring.configure(SparsePrefillConfig(enabled=True, pattern_config=SHIPPED, cost_table="none"),
                     RetrievalDecodeConfig(), MetricsConfig(), False)
    monkeypatch.setattr(backend_hooks, "_override", {})
    monkeypatch.setattr(backend_hooks, "_override_version", 0)
    monkeypatch.setattr(backend_hooks, "_runners", weakref.WeakSet())
    monkeypatch.setattr(backend_hooks, "_context", None)
    monkeypatch.setattr(backend_hooks, "_model", "")
    # what vLLM's current config says at layer init (impl_runner records it)
    monkeypatch.setattr(backend_hooks.vllm_compat, "current_model_name", lambda: "served-model")
    cfg = head_config.load(SHIPPED)
    other = tmp_path / "other.json"
    other.write_bytes(head_config.PatternConfig(
        default=head_config.HeadPattern(pattern="a_shape", budgets={"sink": 16, "window": 128}),
        calibration={"tokens": 3000}, num_layers=cfg.num_layers, num_heads=cfg.num_heads).to_json())
    return SimpleNamespace(shipped=cfg, other=str(other))


def _impl():
    return SimpleNamespace(num_heads=9, num_kv_heads=3, scale=0.125, head_size=64)


def test_override_reconfigures_live_and_new_runners_and_clears(hooks):
    r = backend_hooks.impl_runner(_impl())
    assert r.pattern_config.searched_tokens == hooks.shipped.searched_tokens and r.index_options == IndexOptions()
    r._layer_plans[1.0] = "stale plan"
    backend_hooks.set_override(pattern_config=hooks.other, group_shared_selection="true")
    shared = IndexOptions(group_shared_selection=True)
    assert r.pattern_config.default.pattern == "a_shape" and r.index_options == shared
    assert r._layer_plans == {}  # plans of the old config are gone
    late = backend_hooks.impl_runner(_impl())  # built while the override holds: gets it too
    assert late.pattern_config.default.pattern == "a_shape" and late.index_options == shared
    backend_hooks.set_override()  # cleared: the resolved config again
    assert r.pattern_config.searched_tokens == hooks.shipped.searched_tokens and r.index_options == IndexOptions()


# --variants passes values as text; the runners' whole IndexOptions follows (the other fields stay as resolved)
@pytest.mark.parametrize("fields, options", [
    ({"dense_tail_rows": "256"}, IndexOptions(dense_tail_rows=256)),
    ({"vertical_segment_rows": "1024"}, IndexOptions(vertical_segment_rows=1024)),
    ({"exact_selection": "true", "vertical_segment_rows": 64},
     IndexOptions(exact_selection=True, vertical_segment_rows=64)),
    ({"fused_estimate": True}, IndexOptions(fused_estimate=True)),
    ({"gqa_shaped_estimate": "true"}, IndexOptions(gqa_shaped_estimate=True)),
])
def test_index_options_switch_between_sweeps(hooks, fields, options):
    r = backend_hooks.impl_runner(_impl())
    assert r.index_options == IndexOptions()
    backend_hooks.set_override(**fields)
    assert r.index_options == options and backend_hooks.impl_runner(_impl()).index_options == options
    backend_hooks.set_override()
    assert r.index_options == IndexOptions()


@pytest.mark.parametrize("fields, needle", [
    ({"cost_table": "auto"}, "'cost_table'"),  # not switchable at run time
    ({"min_prompt_tokens": 0}, "min_prompt_tokens"),
    ({"group_shared_selection": "maybe"}, "group_shared_selection"),
    ({"budget_scale_limit": 0.5}, "budget_scale_limit"),
    ({"dense_tail_rows": -64}, "dense_tail_rows"),
    ({"vertical_segment_rows": 96}, "vertical_segment_rows"),
    ({"pattern_config": "/no/such.json"}, "pattern_config"),
])
def test_bad_override_names_the_key_and_keeps_the_previous_one(hooks, fields, needle):
    backend_hooks.set_override(group_shared_selection=True)
    with pytest.raises(ValueError, match=needle):
        backend_hooks.set_override(**fields)
    assert backend_hooks._override == {"group_shared_selection": True}


def test_decider_follows_the_override(hooks):
    backend_hooks.impl_runner(_impl())  # records the model context (the resolved config)
    hook = backend_hooks.builder_hook()
    assert hook.decider().searched_tokens == hooks.shipped.searched_tokens
    backend_hooks.set_override(pattern_config=hooks.other, budget_scale_limit=2)
    d = hook.decider()
    assert d.searched_tokens == 3000 and d.budget_scale_limit == 2.0
    assert d.decide(1024, 12000).budget_factor == 2.0  # 4x the searched length, capped at the override's 2
    backend_hooks.set_override()
    assert hook.decider().searched_tokens == hooks.shipped.searched_tokens


def test_dense_override_plans_nothing(hooks, monkeypatch):
    hook = backend_hooks.builder_hook()
    monkeypatch.setattr(backend_hooks.planner, "attach", lambda *a, **k: pytest.fail("planned a dense sweep"))
    monkeypatch.setattr(runner, "STATS", dict(runner.STATS, dense_prefill_tokens=0, batches=0))
    cam = SimpleNamespace(query_start_loc_cpu=torch.tensor([0, 4000, 4001]), num_reqs=2)
    backend_hooks.set_override(dense=True)
    hook.after_build(SimpleNamespace(), cam, lambda c: None)
    assert runner.STATS["dense_prefill_tokens"] == 4000 and runner.STATS["batches"] == 0


def test_floor_follows_the_override(hooks):
    """min_prompt_tokens switched at run time (the replay's dense_first_chunk): a chunk whose sequence holds
    fewer tokens goes dense, the later chunks of the same prompt still sparse."""
    backend_hooks.impl_runner(_impl())
    hook = backend_hooks.builder_hook()
    assert not hook.decider().decide(8192, 16384).sparse  # cost_table none: the default floor (32768)
    backend_hooks.set_override(min_prompt_tokens="8193")
    d = hook.decider()
    assert not d.decide(8192, 8192).sparse and d.decide(8192, 16384).sparse
    backend_hooks.set_override()
    assert not hook.decider().decide(8192, 16384).sparse
