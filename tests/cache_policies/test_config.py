"""The ``cache_policy`` section: each policy's parameters nested under it, built by the registry."""
import inspect

import msgspec
import pytest

from cache_policies import registry
from cache_policies.config import REMOVED_KEYS, RENAMED_KEYS, CachePolicyConfig
from cache_policies.provider import RegistryPolicyProvider
from kvplug.config import KvplugConfigError


@pytest.mark.parametrize("name", registry.POLICY_NAMES)
def test_each_policys_params_are_its_constructor_arguments_under_its_own_key(name):
    cls = registry.policy_class(name)
    args = list(inspect.signature(cls).parameters)
    if cls.params_type is None:
        assert args == [] and cls.params_key is None
        return
    assert type(getattr(CachePolicyConfig(), cls.params_key)) is cls.params_type
    assert list(cls.params_type.__struct_fields__) == args
    defaults = cls.params_type()
    built = registry.create(name)
    assert all(getattr(built, f) == getattr(defaults, f) for f in args)  # the struct's defaults are used


def test_nested_parameters_reach_the_policy():
    cfg = msgspec.convert({"snapkv": {"keep_ratio": 0.25, "window_tokens": 8}, "int4": {"group_size": 16},
                           "streaming": {"sink_tokens": 2}}, CachePolicyConfig)
    snap, int4, stream = (registry.create(n, cfg) for n in ("drop:snapkv", "quant:int4", "drop:streaming"))
    assert (snap.keep_ratio, snap.window_tokens, snap.pool_kernel) == (0.25, 8, 5)
    assert (int4.group_size, int4.residual_tokens) == (16, 32)
    assert (stream.sink_tokens, stream.window_tokens) == (2, 1024)
    assert b"snapkv_keep_ratio" not in msgspec.json.encode(cfg)  # the renamed keys are never written


@pytest.mark.parametrize("old,new", sorted(RENAMED_KEYS.items()))
def test_a_flat_legacy_key_fails_naming_the_new_key(old, new):
    with pytest.raises(msgspec.ValidationError, match=rf"cache_policy\.{old} was renamed: use cache_policy\.{new}"):
        msgspec.convert({old: 1}, CachePolicyConfig)


@pytest.mark.parametrize("old", sorted(REMOVED_KEYS))
def test_a_removed_key_fails_naming_it(old):
    with pytest.raises(msgspec.ValidationError, match=rf"cache_policy\.{old} was removed: "):
        msgspec.convert({old: True}, CachePolicyConfig)
    assert old not in msgspec.to_builtins(CachePolicyConfig())  # never written, so never sent to vLLM


def test_cache_policy_enabled_set_anywhere_fails_naming_the_key(tmp_path):
    """`cache_policy.enabled` changed nothing but a metrics label; every layer that still sets it is told."""
    from kvplug import settings

    path = tmp_path / "old.yaml"
    path.write_text("cache_policy:\n  enabled: true\n")
    for kwargs in ({"config_path": str(path)}, {"sets": ["cache_policy.enabled=true"]},
                   {"environ": {"KVPLUG_CACHE_POLICY__ENABLED": "false"}}):
        with pytest.raises(KvplugConfigError, match=r"cache_policy\.enabled was removed: .*offload"):
            settings.resolve(**{"environ": {}, **kwargs})
    assert "cache_policy" not in settings.resolve(environ={}).enabled_features()
    with pytest.raises(KvplugConfigError, match=r"\(keys of cache_policy: default, rules, int4, streaming, snapkv\)"):
        settings.resolve(sets=["cache_policy.nope=1"], environ={})  # the removed/renamed keys are not offered


@pytest.mark.parametrize("tree,needle", [
    ({"default": "zip"}, r"cache_policy\.default: unknown policy 'zip'"),
    ({"rules": [{"policy": "keep"}, {"policy": "nope"}]}, r"cache_policy\.rules\[1\]\.policy"),
    ({"snapkv": {"keep_ratio": 0}}, r"cache_policy\.snapkv\.keep_ratio: must be in \(0, 1\]"),
    ({"snapkv": {"keep_ratio": float("nan")}}, r"cache_policy\.snapkv\.keep_ratio: must be a finite number"),
    ({"snapkv": {"pool_kernel": 0}}, r"cache_policy\.snapkv\.pool_kernel: must be >= 1"),
    ({"streaming": {"window_tokens": 0}}, r"cache_policy\.streaming\.window_tokens: must be >= 1"),
    ({"streaming": {"sink_tokens": -1}}, r"cache_policy\.streaming\.sink_tokens: must be >= 0"),
    ({"int4": {"group_size": 0}}, r"cache_policy\.int4\.group_size: must be >= 1"),
    ({"int4": {"residual_tokens": -1}}, r"cache_policy\.int4\.residual_tokens: must be >= 0"),
    ({"snapkv": {"keep_ratio": 0.5, "window": 3}}, r"unknown field `window`"),
])
def test_bad_values_name_the_key(tree, needle):
    with pytest.raises(msgspec.ValidationError, match=needle):
        msgspec.convert(tree, CachePolicyConfig)


def test_direct_construction_raises_the_config_error():
    with pytest.raises(KvplugConfigError, match=r"cache_policy\.default"):
        CachePolicyConfig(default="zip")


def test_provider_chooses_and_falls_back_to_the_default_for_unknown_names(caplog):
    provider = RegistryPolicyProvider(CachePolicyConfig(default="quant:int8"))
    assert provider.names() == registry.POLICY_NAMES
    assert (provider.policy_key, provider.offload_key) == ("kvplug_policy", "kvplug_offload")
    assert provider.choose(10, {"kvplug_policy": "keep"}) == "keep"
    with caplog.at_level("WARNING", logger="vllm.kvplug.offload"):
        assert provider.choose(10, {"kvplug_policy": "zip"}) == "quant:int8"
    assert "'zip'" in caplog.text
    assert provider.create("drop:snapkv").observation_window_tokens(100) == 32
    assert provider.create("drop:snapkv").observation_window_tokens(10) == 10
    assert all(provider.create(n).observation_window_tokens(100) == 0 for n in registry.POLICY_NAMES
               if n != "drop:snapkv")
