"""The two hooks kvplug's backend calls: plan in the metadata builder, run in the attention impl.

Both return None when sparse prefill is off, so the backend stays a passthrough. The impls (built with the
model, before the builders) record the model's attention shape and per-head config; the builder's hook
builds the per-chunk decider from them on its first batch.
"""
from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

import msgspec
from torch.profiler import record_function

from attention_backends import wiring
from attention_backends.sparse_prefill import cost_model, executor, planner, runner
from attention_backends.sparse_prefill.index import BLOCK
from kvplug import metrics, vllm_compat
from kvplug.config import KvplugConfigError

logger = logging.getLogger("vllm.kvplug.sparse_prefill")


def _config():
    cfg = wiring.current().sparse_prefill
    return cfg if cfg.enabled else None


# Benchmark knob (benchmarks/sparse_prefill_accuracy.py --variants): sparse prefill keys replaced at run time in
# this process through LLM.collective_rpc, so one engine (one start-up) answers the same questions dense and
# under several configs. {"dense": True} sends every chunk to the dense backend. Empty = the config as resolved.
OVERRIDE_KEYS = ("pattern_config", "group_shared_selection", "fused_estimate", "budget_scale_limit", "dense_tail_rows",
                 "vertical_segment_rows", "min_prompt_tokens", "exact_selection", "gqa_shaped_estimate")
_override: dict[str, Any] = {}
_override_version = 0  # bumped by set_override: builder hooks rebuild their decider
_runners: "weakref.WeakSet[runner.SparsePrefillRunner]" = weakref.WeakSet()


def set_override(_worker: Any = None, **fields: Any) -> None:
    """Replace sparse prefill keys (OVERRIDE_KEYS, plus ``dense``) in this process from the next batch on
    (``collective_rpc(set_override, kwargs=...)``); no fields = back to the resolved config. A bad key or value
    is a ValueError naming it, and leaves the current override in place."""
    global _override_version
    unknown = sorted(set(fields) - set(OVERRIDE_KEYS) - {"dense"})
    if unknown:
        raise ValueError(f"unknown sparse prefill override {unknown[0]!r} (known: dense, {', '.join(OVERRIDE_KEYS)})")
    base = wiring.current().sparse_prefill
    keys = {k: v for k, v in fields.items() if k != "dense"}
    try:
        cfg = msgspec.convert(msgspec.structs.asdict(base) | keys, type(base), strict=False)  # types checked
        cfg.validate("sparse_prefill")
    except msgspec.ValidationError as exc:
        raise ValueError(f"sparse prefill override: {exc}") from None
    except KvplugConfigError as exc:
        raise ValueError(str(exc)) from None
    _override.clear()
    _override.update(fields)
    _override_version += 1
    if not base.enabled:
        return  # no runners, no builder hooks: nothing goes sparse whatever the override
    chosen = _chosen(cfg)
    for r in list(_runners):
        r.reconfigure(chosen.config, _index_options(cfg, chosen))
    logger.info("kvplug sparse prefill: override %s", fields or "cleared")


def _effective(cfg: Any) -> Any:
    """``cfg`` with the benchmark override's keys (set_override) replaced."""
    keys = {k: v for k, v in _override.items() if k != "dense"}
    return msgspec.convert(msgspec.structs.asdict(cfg) | keys, type(cfg), strict=False) if keys else cfg


_model: str = ""  # the served model, recorded at layer init (vLLM's config is current only then)


def _chosen(cfg: Any) -> planner.ChosenConfig:
    return planner.choose_pattern_config(cfg.pattern_config, _model, cfg.default_pattern,
                                         json.dumps(cfg.default_budgets, sort_keys=True))


def _per_head(chosen: planner.ChosenConfig) -> bool:
    """A per-head config (layers of their own) compiles one graph set per distinct layer plan: compiled_index=auto
    keeps it eager; a uniform one has a single plan."""
    return bool(chosen.config.layers)


def _index_options(cfg: Any, chosen: planner.ChosenConfig) -> Any:
    return cfg.index_options(vllm_compat.platform_name(), _per_head(chosen))


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


def make_decider(cfg: Any, context: ModelContext | None, device: str,
                 chosen: planner.ChosenConfig | None = None) -> tuple[cost_model.ChunkDecider, str]:
    """The decider for this process and a line saying which rule it applies (logged, and the info metric).
    ``chosen``: the per-head config in use when it is not the one the layers recorded (set_override)."""
    chosen = chosen or (context.chosen if context is not None else None)
    searched = chosen.config.searched_tokens if chosen is not None else None
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
    cfg_layers = chosen.config.num_layers or context.num_layers or 1
    heads = cost_model.HeadDensity(chosen.config, cfg_layers, context.num_heads)
    # the executor that will run the sparse chunks here (auto: fa2_sparse only where it can run)
    platform = "cpu" if device == "cpu" else "cuda"
    runs = executor.resolve(cfg.executor, platform, context.head_dim).name
    decider = cost_model.ChunkDecider(floor, table, heads, context.num_heads, context.head_dim, cfg.cost_margin,
                                      executor=runs, compiled_index=cfg.compiles_index(platform, _per_head(chosen)),
                                      whole_page_gather=cfg.fa2_whole_page_gather, **scale)
    t = decider.terms
    priced = f"{t.executor} terms, {'compiled' if t.compiled_index else 'eager'} index"
    if runs == "fa2_sparse" and cfg.fa2_whole_page_gather:
        priced += (", whole-page K/V gather" if t.whole_page_gather
                   else ", whole-page K/V gather priced as the per-token one (the table has no gather_pages)")
    return decider, (f"cost model ({why}, device {device!r}, {priced}, margin {cfg.cost_margin}, "
                     f"floor {floor} tokens)")


class BuilderHook:
    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.min_prompt_tokens = cfg.min_prompt_tokens
        self._decider: cost_model.ChunkDecider | None = None
        self._decider_version = _override_version

    def decider(self) -> cost_model.ChunkDecider:
        if self._decider_version != _override_version:  # set_override: the decider follows the new keys
            self._decider, self._decider_version = None, _override_version
        if self._decider is None:
            cfg = _effective(self.cfg)
            chosen = _chosen(cfg) if _override and _context is not None else None
            self._decider, rule = make_decider(cfg, _context, cost_model.device_name(), chosen)
            chosen = chosen or (_context.chosen if _context is not None else None)
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
            if _override.get("dense"):
                runner.record_dense_batch(vllm_compat.batch_phases(common_attn_metadata).prefill_tokens)
                return
            plan = planner.attach(attn_metadata, common_attn_metadata, self.decider(), build_dense)
            if plan is not None:
                runner.record_batch(plan)
            else:
                runner.record_dense_batch(vllm_compat.batch_phases(common_attn_metadata).prefill_tokens)


def builder_hook(device: Any = None, kv_facts: Callable[[], Any] | None = None) -> BuilderHook | None:
    """The builder's hook, or None when sparse prefill is off. With compiled_index the builder's construction
    (engine start, after the model is loaded) compiles the index build first (warm_up): ``kv_facts`` returns
    vllm_compat.BuilderKvFacts of the builder's layers."""
    cfg = _config()
    if cfg is None:
        return None
    hook = BuilderHook(cfg)
    effective = _effective(cfg)
    if _index_options(effective, _chosen(effective)).compiled_index and kv_facts is not None:
        warm_up(device, kv_facts(), hook.decider())
    return hook


# compiled_index warm-ups done in this process: (device, dtypes, block size, head shape, plans, executor,
# index options, small chunks, floor)
_warmed_up: set[tuple] = set()


# Sequence lengths at which a chunk of one query block is priced: the warm-up compiles its graph only where the
# decider may send such a chunk sparse (with a cost table it never does: the index build's fixed cost).
SMALL_CHUNK_PROBES = (8192, 32768, 131072, 1 << 20)


def warm_up(device: Any, facts: Any, decider: cost_model.ChunkDecider) -> None:
    """compiled_index: compile the index build now, at engine start, rather than in the first sparse chunk
    (tens of seconds on the H100): every distinct layer plan of the per-head config (budgets at factor 1: other
    factors reuse the graphs) through one runner's own path (executor, dtypes), on synthetic inputs of the
    chunk shapes runner.warm_up_geometries lists. Once per process and setting; a failure is logged and leaves
    the first sparse chunk to compile (a compile error itself already sends the build eager: head_config)."""
    import time

    import torch

    r = next(iter(list(_runners)), None)
    if r is None or _context is None:
        return  # no layer built in this process (e.g. a builder without attention layers here)
    device = torch.device(device if device is not None else "cpu")
    layers = range(r.pattern_config.num_layers or _context.num_layers or 1)
    key = (str(device), str(facts.query_dtype), str(facts.cache_dtype), facts.block_size, r.num_heads,
           r.num_kv_heads, _context.head_dim, id(r.pattern_config), r.executor.name, r.index_options)
    small_chunks = any(decider.decide(BLOCK, L).sparse for L in SMALL_CHUNK_PROBES)
    key = key + (small_chunks, decider.floor)
    if key in _warmed_up:
        return
    _warmed_up.add(key)
    start = time.perf_counter()
    try:
        plans, shapes = r.warm_up(layers, facts.query_dtype, facts.cache_dtype, facts.block_size, _context.head_dim,
                                  device, small_chunks=small_chunks, floor=decider.floor)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except Exception as exc:  # noqa: BLE001 - a warm-up must never stop the engine; the first chunk compiles instead
        logger.warning("kvplug sparse prefill: compiled_index warm-up failed (%s: %s); the first sparse chunk "
                       "compiles the index build instead", type(exc).__name__, exc)
        return
    seconds = time.perf_counter() - start
    runner.WARM_UP.update(seconds=round(seconds, 3), plans=plans, geometries=shapes)
    logger.info("kvplug sparse prefill: compiled the index build at start-up in %.1f s (%d layer plans, chunks "
                "(n, L) %s): no request pays the compile", seconds, plans, shapes)


def impl_runner(impl: Any) -> runner.SparsePrefillRunner | None:
    """A runner for one attention impl (layer), or None when sparse prefill is off."""
    global _model
    cfg = _config()
    if cfg is None:
        return None
    _model = vllm_compat.current_model_name()
    _note_layer(_chosen(cfg), impl)  # the resolved config: what the layers record, whatever the override
    chosen_executor = executor.resolve(cfg.executor, vllm_compat.platform_name(), int(impl.head_size))
    cfg = _effective(cfg)
    chosen = _chosen(cfg)
    r = runner.SparsePrefillRunner(chosen.config, impl.num_heads, impl.num_kv_heads, impl.scale,
                                   _index_options(cfg, chosen), chosen_executor)
    _runners.add(r)
    return r


plan_of = planner.plan_of
