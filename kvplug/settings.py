"""kvplug's config (composition layer): the root struct made of every feature's section, and its loaders.

Each section lives next to the code it configures and validates itself; kvplug/config.py is the generic
loader (defaults < YAML < ``KVPLUG_<SECTION>__<KEY>`` env < ``--set``). serving/, the CLI, benchmarks and
tests resolve kvplug's config through this module.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import msgspec

from attention_backends.retrieval_decode.config import RetrievalDecodeConfig
from attention_backends.sparse_prefill.config import SparsePrefillConfig
from kvplug import config as _loader
from cache_policies.config import CachePolicyConfig
from kvplug.config import ENV_CONFIG_JSON, ENV_CONFIG_PATH, NON_CONFIG_ENV, KvplugConfigError, Section, parse_size
from kvplug.metrics import MetricsConfig
from offload.config import OffloadConfig

__all__ = ["ENV_CONFIG_JSON", "ENV_CONFIG_PATH", "NON_CONFIG_ENV", "SECTIONS", "CachePolicyConfig", "KvplugConfig",
           "KvplugConfigError", "MetricsConfig", "OffloadConfig", "RetrievalDecodeConfig", "SparsePrefillConfig",
           "from_process_env", "parse_size", "resolve"]


class KvplugConfig(Section):
    sparse_prefill: SparsePrefillConfig = msgspec.field(default_factory=SparsePrefillConfig)
    retrieval_decode: RetrievalDecodeConfig = msgspec.field(default_factory=RetrievalDecodeConfig)
    cache_policy: CachePolicyConfig = msgspec.field(default_factory=CachePolicyConfig)
    offload: OffloadConfig = msgspec.field(default_factory=OffloadConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)

    def enabled_features(self) -> list[str]:
        """Names of features switched on (for kvplug_info and logs)."""
        return [name for name in self.__struct_fields__ if getattr(getattr(self, name), "enabled", False)
                and name != "metrics"]

    def to_json(self) -> str:
        return _loader.to_json(self)


SECTIONS = KvplugConfig.__struct_fields__


def resolve(config_path: str | None = None, sets: Iterable[str] = (),
            environ: Mapping[str, str] | None = None) -> KvplugConfig:
    """Build the effective config from every layer; raise KvplugConfigError naming the bad key."""
    return _loader.resolve(KvplugConfig, config_path, sets, environ)


def from_process_env(environ: Mapping[str, str] | None = None) -> KvplugConfig:
    """The config inside a vLLM process: the JSON the launcher resolved, else resolve from env here."""
    return _loader.from_process_env(KvplugConfig, environ)
