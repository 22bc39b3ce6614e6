"""vLLM general plugin entry point (``vllm.general_plugins: kvplug = kvplug.plugin:register``).

vLLM calls ``register()`` once in every process it starts (API server, engine core, workers, Ray
workers). It reads the config from the process environment, hands each feature its sections (the
attention backend through attention_backends.wiring, offload through offload.wiring), registers kvplug's
attention backend and records that this process loaded the plugin.
"""
from __future__ import annotations

import logging

from attention_backends import wiring as attention_wiring
from cache_policies.provider import RegistryPolicyProvider
from kvplug import __version__, metrics, settings, vllm_compat
from offload import wiring as offload_wiring

logger = logging.getLogger("vllm.kvplug")  # inherit vLLM's handlers and level
_state: dict[str, object] = {}


def configure_features(cfg: settings.KvplugConfig) -> None:
    """Hand every feature its config sections (and offload its cache-policy provider)."""
    metrics.configure(cfg.metrics)
    attention_wiring.configure(cfg.sparse_prefill, cfg.retrieval_decode, cfg.metrics,
                               drop_masks_enabled=cfg.offload.enabled)
    offload_wiring.configure(cfg.offload, cfg.metrics, RegistryPolicyProvider(cfg.cache_policy))


def register() -> None:
    if _state.get("registered"):
        return
    cfg = settings.from_process_env()  # a bad config must stop the process, not run silently without kvplug
    vllm_compat.check_supported()
    untested = vllm_compat.untested_release_warning()
    if untested:
        logger.warning(untested)
    configure_features(cfg)
    slot = vllm_compat.register_attention_backend()
    vllm_compat.propagate_env_to_ray()
    m = metrics.get(cfg.metrics)
    if m is not None:
        m.info.labels(version=__version__, vllm_version=vllm_compat.vllm_version(),
                      platform=vllm_compat.platform_name(),
                      features=",".join(cfg.enabled_features()) or "none").set(1)
        m.plugin_loads.labels(process=metrics.process_role()).inc()
    _state.update(registered=True, config=cfg, slot=slot)
    logger.info("kvplug %s registered attention backend as %s in %s (features: %s)", __version__, slot,
                metrics.process_role(), ", ".join(cfg.enabled_features()) or "none")


def active_config() -> settings.KvplugConfig:
    """The config this process registered with (resolving it if register() has not run). For the composition
    and top layers only: features get their sections through their wiring modules."""
    cfg = _state.get("config")
    if cfg is None:
        cfg = settings.from_process_env()
        _state["config"] = cfg
    return cfg  # type: ignore[return-value]
