"""The two hooks kvplug's backend calls: plan in the metadata builder, run in the attention impl.

Both return None when sparse prefill is off, so the backend stays a passthrough.
"""
from __future__ import annotations

import json
from typing import Any, Callable

from attention_backends import wiring
from attention_backends.sparse_prefill import planner, runner
from kvplug import vllm_compat


def _config():
    cfg = wiring.current().sparse_prefill
    return cfg if cfg.enabled else None


class BuilderHook:
    def __init__(self, min_prompt_tokens: int) -> None:
        self.min_prompt_tokens = min_prompt_tokens

    def after_build(self, attn_metadata: Any, common_attn_metadata: Any, build_dense: Callable[[Any], Any]) -> None:
        """Plan this batch (host metadata only) and attach the plan to ``attn_metadata``."""
        runner.flush_pending()
        plan = planner.attach(attn_metadata, common_attn_metadata, self.min_prompt_tokens, build_dense)
        if plan is not None:
            runner.record_batch(plan)
        else:
            runner.record_dense_batch(vllm_compat.batch_phases(common_attn_metadata).prefill_tokens)


def builder_hook() -> BuilderHook | None:
    cfg = _config()
    return None if cfg is None else BuilderHook(cfg.min_prompt_tokens)


def impl_runner(impl: Any) -> runner.SparsePrefillRunner | None:
    """A runner for one attention impl (layer), or None when sparse prefill is off."""
    cfg = _config()
    if cfg is None:
        return None
    pattern_config = planner.pattern_config_for(cfg.pattern_config, vllm_compat.current_model_name(),
                                                cfg.default_pattern, json.dumps(cfg.default_budgets, sort_keys=True))
    return runner.SparsePrefillRunner(pattern_config, impl.num_heads, impl.num_kv_heads, impl.scale)


plan_of = planner.plan_of
