"""kvplug configuration: one msgspec Struct tree, layered from defaults, YAML, env and CLI.

Precedence (later wins): defaults < YAML file (``--config`` / ``KVPLUG_CONFIG``) < ``KVPLUG_<SECTION>__<KEY>``
environment variables < ``--set section.key=value`` CLI overrides. The resolved config travels to every vLLM
process (engine core, workers, Ray workers) as JSON in ``KVPLUG_CONFIG_JSON``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

import msgspec
import yaml

ENV_PREFIX = "KVPLUG_"
ENV_CONFIG_PATH = "KVPLUG_CONFIG"
ENV_CONFIG_JSON = "KVPLUG_CONFIG_JSON"
# KVPLUG_* variables that are not config keys (paths, logging, runtime switches); every other name with the
# prefix must be a config key, so a typo stops the launcher instead of being ignored. Every KVPLUG_ variable
# the code reads belongs here (tests/kvplug/test_config.py checks it against the source tree).
NON_CONFIG_ENV = frozenset({
    ENV_CONFIG_PATH, ENV_CONFIG_JSON,
    "KVPLUG_CACHE_DIR",              # kvplug/models.py: where prepared models live
    "KVPLUG_LOG_LEVEL",
    "KVPLUG_PINNED_POOL",            # offload/host_memory.py: 0 = no pinned pool for the CPU tier
    "KVPLUG_RD_SELECT_EARLY_EXIT",   # attention_backends/retrieval_decode/triton_kernels.py
    "KVPLUG_BENCH_TOKENIZER",        # benchmarks/scbench/tokenizer.py
})


class KvplugConfigError(ValueError):
    """A config value is wrong; the message names the key and where it came from."""


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    def validate(self, path: str) -> None:  # pragma: no cover - overridden where there is something to check
        return None


class SparsePrefillConfig(_Section):
    """Dynamic sparse prefill (MInference patterns): attention_backends/sparse_prefill/."""

    enabled: bool = False
    # A prefill chunk goes sparse once its sequence (cached context + chunk) holds this many tokens;
    # shorter prompts, and every decode token, stay dense. 32K: measured on an H100 (BENCHMARKS.md), the
    # per-layer index build costs 2.6-6 ms at 4K-32K while dense attention costs 0.3 ms at 4K and 12.7 ms
    # at 32K, so below ~32K the sparse path cannot win whatever the density.
    min_prompt_tokens: int = 32768
    # Per-head pattern JSON (`kvplug patterns search` writes one); "auto" = the config shipped for the
    # served model if there is one, else default_pattern on every head.
    pattern_config: str = "auto"
    default_pattern: str = "vertical_slash"
    # Budgets of default_pattern (omitted ones take the pattern's defaults).
    default_budgets: dict[str, int] = {}

    def validate(self, path: str) -> None:
        if self.min_prompt_tokens < 1:
            raise KvplugConfigError(f"{path}.min_prompt_tokens must be >= 1, got {self.min_prompt_tokens}")
        if self == SparsePrefillConfig(min_prompt_tokens=self.min_prompt_tokens, enabled=self.enabled):
            return  # defaults are valid; skip importing the pattern registry (it pulls in torch)
        from attention_backends.sparse_prefill import head_config
        from attention_backends.sparse_prefill.patterns.base import PatternBudgetError

        try:
            head_config.check_head(head_config.HeadPattern(pattern=self.default_pattern, budgets=self.default_budgets))
        except PatternBudgetError as exc:
            key = "default_pattern" if "unknown sparse prefill pattern" in str(exc) else "default_budgets"
            raise KvplugConfigError(f"{path}.{key}: {exc}") from None
        if self.pattern_config != "auto":
            try:
                head_config.load(self.pattern_config)
            except PatternBudgetError as exc:
                raise KvplugConfigError(f"{path}.pattern_config: {exc}") from None


class RetrievalDecodeConfig(_Section):
    """Retrieval-based (Quest-style) sparse decoding: attention_backends/retrieval_decode/."""

    enabled: bool = False
    # Tokens of KV each decode token reads per kv-head (whole blocks, sink and recent window included).
    budget_tokens: int = 2048
    # If > 0, the budget is this fraction of each sequence's context instead of budget_tokens.
    budget_fraction: float = 0.0
    # Leading blocks always read (attention sinks).
    sink_blocks: int = 1
    # The most recent tokens always read (the current block is always read).
    recent_tokens: int = 256
    # Sequences shorter than this, or not longer than their budget, decode densely.
    min_context_tokens: int = 4096
    # GQA: a kv-head's blocks are ranked by the "max" (or "sum") of its query heads' Quest bounds.
    gqa_reduce: str = "max"
    # The first layers attend broadly (Quest keeps its first two dense): they decode densely.
    dense_layers: int = 2

    def validate(self, path: str) -> None:
        if self.budget_tokens < 1:
            raise KvplugConfigError(f"{path}.budget_tokens must be >= 1, got {self.budget_tokens}")
        if not 0.0 <= self.budget_fraction <= 1.0:
            raise KvplugConfigError(f"{path}.budget_fraction must be in [0, 1], got {self.budget_fraction}")
        if self.sink_blocks < 0:
            raise KvplugConfigError(f"{path}.sink_blocks must be >= 0, got {self.sink_blocks}")
        if self.recent_tokens < 1:
            raise KvplugConfigError(f"{path}.recent_tokens must be >= 1 (the current block), got {self.recent_tokens}")
        if self.min_context_tokens < 0:
            raise KvplugConfigError(f"{path}.min_context_tokens must be >= 0, got {self.min_context_tokens}")
        if self.dense_layers < 0:
            raise KvplugConfigError(f"{path}.dense_layers must be >= 0, got {self.dense_layers}")
        if self.gqa_reduce not in ("max", "sum"):
            raise KvplugConfigError(f"{path}.gqa_reduce must be 'max' or 'sum', got {self.gqa_reduce!r}")
        if self.budget_fraction == 0.0 and self.budget_tokens < self.recent_tokens:
            raise KvplugConfigError(f"{path}.budget_tokens ({self.budget_tokens}) must be >= "
                                    f"{path}.recent_tokens ({self.recent_tokens}): the window is part of the budget")


class PolicyRule(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Pick ``policy`` for shared prefixes of at least ``min_prefix_tokens`` (and of ``tenant``, if set)."""

    policy: str
    min_prefix_tokens: int = 0
    tenant: str = ""


class CachePolicyConfig(_Section):
    """Prefix-cache policy layer: how offloaded KV blocks are kept (cache_policies/registry.py lists names).

    Choice per request: ``kv_transfer_params.kvplug_policy`` if given, else the first matching rule, else
    ``default``.
    """

    enabled: bool = False
    default: str = "keep"
    rules: list[PolicyRule] = msgspec.field(default_factory=list)
    int4_group_size: int = 32
    int4_residual_tokens: int = 32
    streaming_sink_tokens: int = 4
    streaming_window_tokens: int = 1024
    snapkv_keep_ratio: float = 0.5
    snapkv_window_tokens: int = 32
    snapkv_pool_kernel: int = 5

    def validate(self, path: str) -> None:
        from cache_policies import registry

        try:
            registry.check_name(self.default, "policy")
            for i, rule in enumerate(self.rules):
                registry.check_name(rule.policy, "policy")
        except registry.UnknownPolicyError as exc:
            key = f"{path}.default" if self.default not in registry.POLICY_NAMES else f"{path}.rules[{i}].policy"
            raise KvplugConfigError(f"{key}: {exc}") from None
        for name in ("int4_group_size", "streaming_window_tokens", "snapkv_window_tokens", "snapkv_pool_kernel"):
            if getattr(self, name) < 1:
                raise KvplugConfigError(f"{path}.{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("int4_residual_tokens", "streaming_sink_tokens"):
            if getattr(self, name) < 0:
                raise KvplugConfigError(f"{path}.{name}: must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.snapkv_keep_ratio <= 1.0:
            raise KvplugConfigError(f"{path}.snapkv_keep_ratio: must be in (0, 1], got {self.snapkv_keep_ratio}")


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "t": 1000**4, "tb": 1000**4, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: "str | int", key: str = "size") -> int:
    """'8GiB' -> 8589934592, '500MB' -> 500000000, 1024 -> 1024; KvplugConfigError naming ``key``."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        raw = str(text).strip().lower().replace(" ", "")
        num = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = raw[len(num):]
        try:
            value = int(float(num) * _SIZE_UNITS[unit])
        except (ValueError, KeyError, OverflowError):  # OverflowError: '1e400' is inf, 'nan' is not a number
            raise KvplugConfigError(f"{key}: {text!r} is not a size (e.g. 8GiB, 500MB, 1073741824)") from None
    if value < 0:
        raise KvplugConfigError(f"{key}: size must be >= 0, got {text!r}")
    return value


class OffloadConfig(_Section):
    """CPU and disk tiers for evicted prefix KV blocks, through kvplug's KV connector (offload/connector.py).

    ``kvplug serve --offload cpu:8GiB,disk:/path:100GiB`` fills these. ``disk_path`` empty = no disk tier.
    Eviction: least recently used first, where each reuse of an entry counts as ``reuse_weight`` extra
    recent accesses (0 = plain LRU), so shared contexts many requests come back to outlive one-off prompts.
    """

    enabled: bool = False
    cpu_size: str | int = "8GiB"  # bytes, or with a unit: 8GiB, 500MB
    disk_path: str = ""
    disk_size: str | int = "100GiB"
    reuse_weight: float = 8.0

    def validate(self, path: str) -> None:
        cpu = parse_size(self.cpu_size, f"{path}.cpu_size")
        disk = parse_size(self.disk_size, f"{path}.disk_size")
        if self.disk_path and disk == 0:
            raise KvplugConfigError(f"{path}.disk_size: a disk tier at {self.disk_path!r} needs a size > 0")
        if self.enabled and cpu == 0 and not self.disk_path:
            raise KvplugConfigError(f"{path}: enabled with no tier (cpu_size is 0 and disk_path is empty)")
        if self.reuse_weight < 0:
            raise KvplugConfigError(f"{path}.reuse_weight: must be >= 0, got {self.reuse_weight}")
        if self.disk_path:
            # Relative paths would depend on each process's cwd (engine core, workers, Ray actors).
            if not os.path.isabs(self.disk_path):
                raise KvplugConfigError(f"{path}.disk_path: must be an absolute path, got {self.disk_path!r}")
            if os.path.exists(self.disk_path) and not os.path.isdir(self.disk_path):
                raise KvplugConfigError(f"{path}.disk_path: {self.disk_path!r} exists and is not a directory")

    @property
    def cpu_bytes(self) -> int:
        return parse_size(self.cpu_size, "offload.cpu_size")

    @property
    def disk_bytes(self) -> int:
        return parse_size(self.disk_size, "offload.disk_size") if self.disk_path else 0


class MetricsConfig(_Section):
    enabled: bool = True
    # Prefix of every kvplug metric name on /metrics.
    prefix: str = "kvplug"

    def validate(self, path: str) -> None:
        if not self.prefix or not self.prefix.replace("_", "a").isalnum() or self.prefix[0].isdigit():
            raise KvplugConfigError(f"{path}.prefix: {self.prefix!r} is not a valid Prometheus metric name prefix")


class KvplugConfig(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
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
        return msgspec.json.encode(self).decode()


SECTIONS = KvplugConfig.__struct_fields__


def _set_path(tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise KvplugConfigError(f"{source}: key {dotted!r} must look like 'section.key' (sections: {', '.join(SECTIONS)})")
    section, key = parts
    if section not in SECTIONS:
        raise KvplugConfigError(f"{source}: unknown config section {section!r} (known: {', '.join(SECTIONS)})")
    fields = type(getattr(KvplugConfig(), section)).__struct_fields__
    if key not in fields:
        known = ", ".join(fields) or "none yet"
        raise KvplugConfigError(f"{source}: unknown key '{section}.{key}' (keys of {section}: {known})")
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        raise KvplugConfigError(f"{source}: config section {section!r} must be a mapping")
    node[key] = value


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _parse_scalar(text: str) -> Any:
    """Env and CLI values are YAML scalars: 'true' -> True, '8' -> 8, '[1, 2]' -> [1, 2]."""
    try:
        return yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        return text


def _convert(tree: Mapping[str, Any], source: str) -> KvplugConfig:
    try:
        cfg = msgspec.convert(tree, KvplugConfig, strict=False)
    except msgspec.ValidationError as exc:
        raise KvplugConfigError(f"invalid kvplug config ({source}): {_explain(exc)}") from None
    for name in SECTIONS:
        section = getattr(cfg, name)
        _check_finite(section, name)
        section.validate(name)
    return cfg


def _check_finite(section: msgspec.Struct, path: str) -> None:
    """NaN passes every `<`/`>` range check and inf most of them: reject both in any float field."""
    for key in section.__struct_fields__:
        value = getattr(section, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise KvplugConfigError(f"{path}.{key}: must be a finite number, got {value}")


def _explain(exc: msgspec.ValidationError) -> str:
    """Rewrite msgspec's '... - at `$.section`' into a dotted key users can grep for."""
    msg = str(exc)
    head, sep, where = msg.rpartition(" - at `")
    if not sep:
        head, where = msg, "$"
    path = where.rstrip("`").removeprefix("$").lstrip(".")
    if "unknown field `" in head:
        field = head.split("unknown field `", 1)[1].split("`", 1)[0]
        key = f"{path}.{field}" if path else field
        return f"unknown key {key!r}"
    return f"key {path!r}: {head}" if path else head


def load_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise KvplugConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise KvplugConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KvplugConfigError(f"config file {path}: top level must be a mapping of sections, got {type(data).__name__}")
    return data


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """``KVPLUG_METRICS__ENABLED=false`` -> {'metrics': {'enabled': False}}. Unknown names are errors."""
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        body = name[len(ENV_PREFIX):]
        if "__" not in body:
            raise KvplugConfigError(
                f"environment variable {name}: expected {ENV_PREFIX}<SECTION>__<KEY> (e.g. KVPLUG_METRICS__ENABLED);"
                f" other KVPLUG_ variables kvplug knows: {', '.join(sorted(NON_CONFIG_ENV))}")
        section, key = body.lower().split("__", 1)
        _set_path(tree, f"{section}.{key}", _parse_scalar(raw), f"environment variable {name}")
    return tree


def cli_overrides(assignments: Iterable[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise KvplugConfigError(f"--set {item!r}: expected section.key=value")
        _set_path(tree, key.strip(), _parse_scalar(raw), f"--set {item}")
    return tree


def resolve(config_path: str | None = None, sets: Iterable[str] = (),
            environ: Mapping[str, str] | None = None) -> KvplugConfig:
    """Build the effective config from every layer; raise KvplugConfigError naming the bad key."""
    environ = os.environ if environ is None else environ
    path = config_path or environ.get(ENV_CONFIG_PATH)
    tree: dict[str, Any] = {}
    sources = []
    if path:
        tree = _merge(tree, load_yaml(path))
        sources.append(f"file {path}")
    env_tree = env_overrides(environ)
    if env_tree:
        tree = _merge(tree, env_tree)
        sources.append("KVPLUG_* environment")
    cli_tree = cli_overrides(sets)
    if cli_tree:
        tree = _merge(tree, cli_tree)
        sources.append("--set")
    return _convert(tree, " + ".join(sources) or "defaults")


def from_process_env(environ: Mapping[str, str] | None = None) -> KvplugConfig:
    """The config inside a vLLM process: the JSON the launcher resolved, else resolve from env here."""
    environ = os.environ if environ is None else environ
    blob = environ.get(ENV_CONFIG_JSON)
    if blob:
        try:
            tree = json.loads(blob)
        except json.JSONDecodeError as exc:
            raise KvplugConfigError(f"{ENV_CONFIG_JSON} is not valid JSON: {exc}") from None
        return _convert(tree, ENV_CONFIG_JSON)
    return resolve(environ=environ)
