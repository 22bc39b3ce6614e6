"""The two hooks kvplug's backend calls: plan in the metadata builder, run in the attention impl.

Both return None when sparse prefill is off, so the backend stays a passthrough. The impls (built with the
model, before the builders) record the model's attention shape and per-head config; the builder's hook
builds the per-chunk decider from them on its first batch.
"""
from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

from torch.profiler import record_function

from attention_backends import wiring
from attention_backends.sparse_prefill import cost_model, executor, planner, runner
from kvplug import metrics, vllm_compat

logger = logging.getLogger("vllm.kvplug.sparse_prefill")


def _config():
    cfg = wiring.current().sparse_prefill
    return cfg if cfg.enabled else None


@dataclass
class ModelContext:
    """What the decider needs from the model: this rank's attention shape and the per-head config."""

    chosen: planner.ChosenConfig
    num_heads: int
    head_dim: int
    num_layers: int = 0  # attention impls built in this process (one per layer)


_context: ModelContext | None = None
_context_lock = threading.Lock()


def _note_layer(chosen: planner.ChosenConfig, impl: Any) -> None:
    global _context
    with _context_lock:
        if _context is None:
            _context = ModelContext(chosen, int(impl.num_heads), int(impl.head_size))
        _context.num_layers += 1


def make_decider(cfg: Any, context: ModelContext | None, device: str) -> tuple[cost_model.ChunkDecider, str]:
    """The decider for this process and a line saying which rule it applies (logged, and the info metric)."""
    searched = context.chosen.config.searched_tokens if context is not None else None
    scale = dict(budget_scale_limit=cfg.budget_scale_limit, searched_tokens=searched)
    table, why = None, "sparse_prefill.cost_table=none"
    if cfg.cost_table == "auto":
        path, table = cost_model.shipped_table_for(device)
        why = f"shipped {path.name}" if path is not None else f"no shipped cost table for device {device!r}"
    elif cfg.cost_table != "none":
        table, why = cost_model.load_table(cfg.cost_table), cfg.cost_table
    if table is not None and context is None:
        table, why = None, f"{why}, but no model shape was recorded"
    if table is None:
        floor = cfg.min_prompt_tokens or cost_model.THRESHOLD_TOKENS
        return cost_model.ChunkDecider(floor, **scale), f"threshold rule from {floor} tokens ({why})"
    floor = cfg.min_prompt_tokens or cost_model.FLOOR_TOKENS
    cfg_layers = context.chosen.config.num_layers or context.num_layers or 1
    heads = cost_model.HeadDensity(context.chosen.config, cfg_layers, context.num_heads)
    decider = cost_model.ChunkDecider(floor, table, heads, context.num_heads, context.head_dim, cfg.cost_margin,
                                      **scale)
    return decider, f"cost model ({why}, device {device!r}, margin {cfg.cost_margin}, floor {floor} tokens)"


class BuilderHook:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.min_prompt_tokens = cfg.min_prompt_tokens
        self._decider: cost_model.ChunkDecider | None = None

    def decider(self) -> cost_model.ChunkDecider:
        if self._decider is None:
            self._decider, rule = make_decider(self.cfg, _context, cost_model.device_name())
            chosen = _context.chosen if _context is not None else None
            logger.info("kvplug sparse prefill: %s", rule)
            m = metrics.get()
            if m is not None:
                m.sparse_prefill_config.labels(pattern_config=chosen.source if chosen else "unknown",
                                               reason=chosen.reason if chosen else "no layer built yet",
                                               decision_rule=rule).set(1)
        return self._decider

    def after_build(self, attn_metadata: Any, common_attn_metadata: Any, build_dense: Callable[[Any], Any]) -> None:
        """Plan this batch (host metadata only) and attach the plan to ``attn_metadata``."""
        with record_function("kvplug.sparse_prefill.plan"):  # named in a profile (benchmarks' --profile)
            runner.flush_pending()
            plan = planner.attach(attn_metadata, common_attn_metadata, self.decider(), build_dense)
            if plan is not None:
                runner.record_batch(plan)
            else:
                runner.record_dense_batch(vllm_compat.batch_phases(common_attn_metadata).prefill_tokens)


def builder_hook() -> BuilderHook | None:
    cfg = _config()
    return None if cfg is None else BuilderHook(cfg)


def impl_runner(impl: Any) -> runner.SparsePrefillRunner | None:
    """A runner for one attention impl (layer), or None when sparse prefill is off."""
    cfg = _config()
    if cfg is None:
        return None
    chosen = planner.choose_pattern_config(cfg.pattern_config, vllm_compat.current_model_name(), cfg.default_pattern,
                                           json.dumps(cfg.default_budgets, sort_keys=True))
    _note_layer(chosen, impl)
    chosen_executor = executor.resolve(cfg.executor, vllm_compat.platform_name(), int(impl.head_size))
    return runner.SparsePrefillRunner(chosen.config, impl.num_heads, impl.num_kv_heads, impl.scale,
                                      cfg.group_shared_selection, cfg.fused_estimate, chosen_executor)


plan_of = planner.plan_of
