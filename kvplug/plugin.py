"""vLLM general plugin entry point (``vllm.general_plugins: kvplug = kvplug.plugin:register``).

vLLM calls ``register()`` once in every process it starts (API server, engine core, workers, Ray
workers). It reads the config from the process environment, registers kvplug's attention backend and
records that this process loaded the plugin.
"""
from __future__ import annotations

import logging

from kvplug import __version__, config, metrics, vllm_compat

logger = logging.getLogger("vllm.kvplug")  # inherit vLLM's handlers and level
_state: dict[str, object] = {}


def register() -> None:
    if _state.get("registered"):
        return
    cfg = config.from_process_env()  # a bad config must stop the process, not run silently without kvplug
    vllm_compat.check_supported()
    slot = vllm_compat.register_attention_backend()
    vllm_compat.propagate_env_to_ray()
    m = metrics.get(cfg)
    if m is not None:
        m.info.labels(version=__version__, vllm_version=vllm_compat.vllm_version(),
                      platform=vllm_compat.platform_name(),
                      features=",".join(cfg.enabled_features()) or "none").set(1)
        m.plugin_loads.labels(process=metrics.process_role()).inc()
    _state.update(registered=True, config=cfg, slot=slot)
    logger.info("kvplug %s registered attention backend as %s in %s (features: %s)", __version__, slot,
                metrics.process_role(), ", ".join(cfg.enabled_features()) or "none")


def active_config() -> config.KvplugConfig:
    """The config this process registered with (resolving it if register() has not run)."""
    cfg = _state.get("config")
    if cfg is None:
        cfg = config.from_process_env()
        _state["config"] = cfg
    return cfg  # type: ignore[return-value]
