"""kvplug's configuration loader (core): sections, sizes, and the layered resolution of a root struct.

Precedence (later wins): defaults < YAML file (``--config`` / ``KVPLUG_CONFIG``) < ``KVPLUG_<SECTION>__<KEY>``
environment variables < ``--set section.key=value`` CLI overrides. Keys reach any depth: ``--set a.b.c=V``,
``KVPLUG_A__B__C=V``, nested YAML mappings. The resolved config travels to every vLLM process (engine core,
workers, Ray workers) as JSON in ``KVPLUG_CONFIG_JSON``.

Nothing here knows kvplug's features: each feature defines its section (a ``Section`` subclass next to its
code, validating itself) and kvplug/settings.py composes them into the root struct it passes to
``resolve`` / ``from_process_env``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping, TypeVar

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


class Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every config section (and of a root struct composed of sections).

    Unknown keys are errors. Checks that need the section's dotted path for their message go in
    ``validate(path)``: the loader calls it, after every nested section's, with the path the section has in
    the root (e.g. "offload"). A section may also check in ``__post_init__`` by raising KvplugConfigError
    naming the key: the loader passes such errors on with their message unchanged."""

    def validate(self, path: str) -> None:
        return None


RootT = TypeVar("RootT", bound=msgspec.Struct)


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


def check_finite(section: msgspec.Struct, path: str) -> None:
    """NaN passes every `<`/`>` range check and inf most of them: reject both in any float field."""
    for key in section.__struct_fields__:
        value = getattr(section, key)
        if isinstance(value, float) and not math.isfinite(value):
            raise KvplugConfigError(f"{path}.{key}: must be a finite number, got {value}")


def check_tree(node: msgspec.Struct, path: str = "") -> None:
    """Finite floats, then each nested section, then ``node.validate(path)``, at any depth."""
    if path:
        check_finite(node, path)
    for key in node.__struct_fields__:
        value = getattr(node, key)
        if isinstance(value, msgspec.Struct):
            check_tree(value, f"{path}.{key}" if path else key)
    if isinstance(node, Section):
        node.validate(path)


def _struct_type(tp: Any) -> type | None:
    return tp if isinstance(tp, type) and issubclass(tp, msgspec.Struct) else None


def _fields(struct_type: type) -> dict[str, Any]:
    return {f.name: f.type for f in msgspec.structs.fields(struct_type)}


def set_path(root: type, tree: dict[str, Any], dotted: str, value: Any, source: str) -> None:
    """Put ``value`` at ``dotted`` (section.key, or deeper into nested sections) of ``tree``, checking the
    path against the struct types of ``root``."""
    sections = ", ".join(root.__struct_fields__)
    parts = dotted.split(".")
    if len(parts) < 2 or not all(parts):
        raise KvplugConfigError(f"{source}: key {dotted!r} must look like 'section.key' (sections: {sections})")
    if parts[0] not in root.__struct_fields__:
        raise KvplugConfigError(f"{source}: unknown config section {parts[0]!r} (known: {sections})")
    node, struct_type = tree, root
    for depth, part in enumerate(parts[:-1]):
        struct_type = _struct_type(_fields(struct_type)[part])
        prefix = ".".join(parts[:depth + 1])
        if struct_type is None:
            raise KvplugConfigError(f"{source}: '{prefix}' is a value, not a section: '{dotted}' names no key")
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KvplugConfigError(f"{source}: config section {prefix!r} must be a mapping")
        key = parts[depth + 1]
        fields = struct_type.__struct_fields__
        if key not in fields:
            # fields defaulting to UNSET are removed/renamed keys kept only to fail with their own message
            known = ", ".join(f.name for f in msgspec.structs.fields(struct_type)
                              if f.default is not msgspec.UNSET) or "none yet"
            raise KvplugConfigError(f"{source}: unknown key '{prefix}.{key}' (keys of {prefix}: {known})")
    node[parts[-1]] = value


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


def convert(root: type[RootT], tree: Mapping[str, Any], source: str) -> RootT:
    """``tree`` as a ``root`` struct, every section checked; KvplugConfigError naming the key."""
    try:
        cfg = msgspec.convert(tree, root, strict=False)
    except msgspec.ValidationError as exc:
        if isinstance(exc.__cause__, KvplugConfigError):  # raised by a section's __post_init__
            raise KvplugConfigError(str(exc.__cause__)) from None
        raise KvplugConfigError(f"invalid kvplug config ({source}): {_explain(exc)}") from None
    check_tree(cfg)
    return cfg


def recheck(section: RootT, path: str) -> RootT:
    """``section`` checked again as if loaded at ``path`` (``msgspec.structs.replace`` skips every check)."""
    try:
        out = msgspec.convert(msgspec.to_builtins(section), type(section), strict=False)
    except msgspec.ValidationError as exc:
        if isinstance(exc.__cause__, KvplugConfigError):
            raise KvplugConfigError(str(exc.__cause__)) from None
        raise KvplugConfigError(f"{path}: {_explain(exc)}") from None
    check_tree(out, path)
    return out


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


def env_overrides(root: type, environ: Mapping[str, str]) -> dict[str, Any]:
    """``KVPLUG_METRICS__ENABLED=false`` -> {'metrics': {'enabled': False}}; each further ``__`` goes one
    section deeper (``KVPLUG_A__B__C`` is a.b.c). Unknown names are errors."""
    tree: dict[str, Any] = {}
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name in NON_CONFIG_ENV:
            continue
        body = name[len(ENV_PREFIX):]
        if "__" not in body:
            raise KvplugConfigError(
                f"environment variable {name}: expected {ENV_PREFIX}<SECTION>__<KEY> (e.g. KVPLUG_METRICS__ENABLED);"
                f" other KVPLUG_ variables kvplug knows: {', '.join(sorted(NON_CONFIG_ENV))}")
        set_path(root, tree, ".".join(body.lower().split("__")), _parse_scalar(raw), f"environment variable {name}")
    return tree


def cli_overrides(root: type, assignments: Iterable[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for item in assignments:
        key, sep, raw = item.partition("=")
        if not sep:
            raise KvplugConfigError(f"--set {item!r}: expected section.key=value")
        set_path(root, tree, key.strip(), _parse_scalar(raw), f"--set {item}")
    return tree


def resolve(root: type[RootT], config_path: str | None = None, sets: Iterable[str] = (),
            environ: Mapping[str, str] | None = None) -> RootT:
    """Build the effective ``root`` config from every layer; raise KvplugConfigError naming the bad key."""
    environ = os.environ if environ is None else environ
    path = config_path or environ.get(ENV_CONFIG_PATH)
    tree: dict[str, Any] = {}
    sources = []
    if path:
        tree = _merge(tree, load_yaml(path))
        sources.append(f"file {path}")
    env_tree = env_overrides(root, environ)
    if env_tree:
        tree = _merge(tree, env_tree)
        sources.append("KVPLUG_* environment")
    cli_tree = cli_overrides(root, sets)
    if cli_tree:
        tree = _merge(tree, cli_tree)
        sources.append("--set")
    return convert(root, tree, " + ".join(sources) or "defaults")


def from_process_env(root: type[RootT], environ: Mapping[str, str] | None = None) -> RootT:
    """The config inside a vLLM process: the JSON the launcher resolved, else resolve from env here."""
    environ = os.environ if environ is None else environ
    blob = environ.get(ENV_CONFIG_JSON)
    if blob:
        try:
            tree = json.loads(blob)
        except json.JSONDecodeError as exc:
            raise KvplugConfigError(f"{ENV_CONFIG_JSON} is not valid JSON: {exc}") from None
        return convert(root, tree, ENV_CONFIG_JSON)
    return resolve(root, environ=environ)


def to_json(cfg: msgspec.Struct) -> str:
    return msgspec.json.encode(cfg).decode()
