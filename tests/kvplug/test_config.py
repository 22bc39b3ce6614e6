from __future__ import annotations

import json
import subprocess
import sys

import msgspec
import pytest
import yaml

from kvplug import config as config_loader
from kvplug import settings
from kvplug.settings import KvplugConfigError
from tests.conftest import REPO


def test_defaults_work_with_nothing_set():
    cfg = settings.resolve(environ={})
    assert cfg.metrics.enabled is True and cfg.metrics.prefix == "kvplug"
    assert cfg.enabled_features() == []


def test_layers_file_then_env_then_cli(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metrics:\n  enabled: false\n  prefix: fromfile\n")
    assert settings.resolve(str(path), environ={}).metrics.prefix == "fromfile"
    env = {"KVPLUG_METRICS__PREFIX": "fromenv"}
    cfg = settings.resolve(str(path), environ=env)
    assert (cfg.metrics.enabled, cfg.metrics.prefix) == (False, "fromenv")
    cfg = settings.resolve(str(path), sets=["metrics.prefix=fromcli", "metrics.enabled=true"], environ=env)
    assert (cfg.metrics.enabled, cfg.metrics.prefix) == (True, "fromcli")


def test_config_path_from_env(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metrics: {prefix: viaenv}\n")
    assert settings.resolve(environ={"KVPLUG_CONFIG": str(path)}).metrics.prefix == "viaenv"


@pytest.mark.parametrize("text, key", [
    ("metrics:\n  enabeld: true\n", "metrics.enabeld"),
    ("metric:\n  enabled: true\n", "metric"),
    ("sparse_prefill:\n  budget: 3\n", "sparse_prefill.budget"),
])
def test_unknown_key_in_file_is_named(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(KvplugConfigError, match=f"unknown key '{key}'"):
        settings.resolve(str(path), environ={})


def test_wrong_type_is_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("metrics:\n  enabled: [1, 2]\n")
    with pytest.raises(KvplugConfigError, match=r"key 'metrics.enabled'.*bool"):
        settings.resolve(str(path), environ={})


def test_section_validation_names_the_key():
    with pytest.raises(KvplugConfigError, match=r"metrics\.prefix"):
        settings.resolve(sets=["metrics.prefix=9bad-name"], environ={})


def test_bad_env_names(tmp_path):
    with pytest.raises(KvplugConfigError, match="KVPLUG_METRICS__NOPE"):
        settings.resolve(environ={"KVPLUG_METRICS__NOPE": "1"})
    with pytest.raises(KvplugConfigError, match="KVPLUG_BOGUS"):
        settings.resolve(environ={"KVPLUG_BOGUS": "1"})
    with pytest.raises(KvplugConfigError, match="KVPLUG_NOSECTION__X: unknown config section 'nosection'"):
        settings.resolve(environ={"KVPLUG_NOSECTION__X": "1"})
    # Non-config KVPLUG_ variables are allowed.
    settings.resolve(environ={"KVPLUG_CACHE_DIR": str(tmp_path)})


def test_bad_cli_assignments():
    with pytest.raises(KvplugConfigError, match="section.key=value"):
        settings.resolve(sets=["metrics.enabled"], environ={})
    with pytest.raises(KvplugConfigError, match="must look like 'section.key'"):
        settings.resolve(sets=["enabled=true"], environ={})


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(KvplugConfigError, match="not found"):
        settings.resolve(str(tmp_path / "missing.yaml"), environ={})
    path = tmp_path / "c.yaml"
    path.write_text("- a list\n")
    with pytest.raises(KvplugConfigError, match="top level must be a mapping"):
        settings.resolve(str(path), environ={})


def test_process_env_roundtrip():
    cfg = settings.resolve(sets=["metrics.prefix=roundtrip"], environ={})
    env = {settings.ENV_CONFIG_JSON: cfg.to_json(), "KVPLUG_METRICS__PREFIX": "ignored"}
    assert settings.from_process_env(env) == cfg  # the launcher's resolved JSON wins inside vLLM processes
    with pytest.raises(KvplugConfigError, match="unknown key 'metrics.x'"):
        settings.from_process_env({settings.ENV_CONFIG_JSON: json.dumps({"metrics": {"x": 1}})})


def test_every_section_is_a_strict_struct():
    for name in settings.SECTIONS:
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"surely_not_a_key": 1}, type(getattr(settings.KvplugConfig(), name)))


def test_config_show_cli(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "kvplug.cli", "config", "show", "--set", "metrics.prefix=shown"],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0 and "prefix: shown" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "kvplug.cli", "config", "show", "--set", "metrics.nope=1"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == ["kvplug config: --set metrics.nope=1: unknown key 'metrics.nope' (keys of metrics: enabled, prefix)"]


def test_config_show_takes_serves_offload_flag():
    ok = subprocess.run([sys.executable, "-m", "kvplug.cli", "config", "show", "--offload", "cpu:2GiB"],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    offload = yaml.safe_load(ok.stdout)["offload"]
    assert (offload["enabled"], offload["cpu_size"]) == (True, "2GiB")
    bad = subprocess.run([sys.executable, "-m", "kvplug.cli", "config", "show", "--offload", "gpu:1GiB"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("kvplug config: --offload: unknown tier 'gpu'")


# --- non-config KVPLUG_ variables, sizes, non-finite floats, disk_path ---------------------------------

def test_every_kvplug_variable_the_code_reads_is_not_taken_for_config():
    """KVPLUG_PINNED_POOL=0 (README) once stopped `kvplug serve`: the env parser took it for a config key."""
    import re

    read = set()
    for path in REPO.rglob("*.py"):
        if ".venv" in path.parts or "tests" in path.parts:
            continue
        read |= set(re.findall(r"""environ(?:\.get\(|\[)\s*["'](KVPLUG_[A-Z0-9_]+)["']""", path.read_text()))
    runtime = {name for name in read if "__" not in name}
    assert "KVPLUG_PINNED_POOL" in runtime and runtime <= settings.NON_CONFIG_ENV
    settings.resolve(environ={name: "0" for name in settings.NON_CONFIG_ENV - {settings.ENV_CONFIG_PATH,
                                                                          settings.ENV_CONFIG_JSON}})


def test_pinned_pool_switch_does_not_stop_serve():
    from serving import server

    p = server.plan(["--offload", "cpu:1GiB", "--port", "18995"], environ={"KVPLUG_PINNED_POOL": "0"},
                    prepare_model=False)
    assert p.env["KVPLUG_PINNED_POOL"] == "0" and p.config.offload.enabled


@pytest.mark.parametrize("value", ["1e400", "nan", "-inf"])
def test_overflowing_size_is_an_error_naming_the_field(value):
    with pytest.raises(KvplugConfigError, match=rf"offload\.cpu_size: '{value}' is not a size"):
        settings.resolve(sets=[f"offload.cpu_size={value}"], environ={})


@pytest.mark.parametrize("key", ["offload.reuse_weight", "retrieval_decode.budget_fraction",
                                 "cache_policy.snapkv.keep_ratio"])
@pytest.mark.parametrize("value", [".nan", ".inf"])
def test_non_finite_floats_are_rejected_naming_the_field(key, value):
    with pytest.raises(KvplugConfigError, match=rf"{key.replace('.', '[.]')}: must be a finite number"):
        settings.resolve(sets=[f"{key}={value}"], environ={})


def test_disk_path_must_be_an_absolute_directory(tmp_path):
    with pytest.raises(KvplugConfigError, match=r"offload\.disk_path: must be an absolute path, got 'kv/cache'"):
        settings.resolve(sets=["offload.disk_path=kv/cache"], environ={})
    a_file = tmp_path / "f"
    a_file.write_text("")
    with pytest.raises(KvplugConfigError, match=r"offload\.disk_path: .* exists and is not a directory"):
        settings.resolve(sets=[f"offload.disk_path={a_file}"], environ={})
    assert settings.resolve(sets=[f"offload.disk_path={tmp_path}/new"], environ={}).offload.disk_bytes > 0


# --- the generic loader (kvplug/config.py): any root struct, keys at any depth ------------------------------

class _Inner(config_loader.Section):
    x: int = 1
    ratio: float = 0.5

    def validate(self, path: str) -> None:
        if self.x < 0:
            raise KvplugConfigError(f"{path}.x: must be >= 0, got {self.x}")


class _Checked(config_loader.Section):
    n: int = 0

    def __post_init__(self) -> None:
        if self.n > 9:
            raise KvplugConfigError(f"outer.checked.n: must be <= 9, got {self.n}")


class _Outer(config_loader.Section):
    inner: _Inner = msgspec.field(default_factory=_Inner)
    checked: _Checked = msgspec.field(default_factory=_Checked)
    flag: bool = False


class _Root(config_loader.Section):
    outer: _Outer = msgspec.field(default_factory=_Outer)


def test_keys_reach_any_depth_from_every_layer(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("outer:\n  inner:\n    x: 2\n    ratio: 0.25\n")
    cfg = config_loader.resolve(_Root, str(path), environ={})
    assert (cfg.outer.inner.x, cfg.outer.inner.ratio) == (2, 0.25)
    cfg = config_loader.resolve(_Root, str(path), environ={"KVPLUG_OUTER__INNER__X": "3"})
    assert (cfg.outer.inner.x, cfg.outer.inner.ratio) == (3, 0.25)
    cfg = config_loader.resolve(_Root, str(path), sets=["outer.inner.x=4", "outer.flag=true"],
                                environ={"KVPLUG_OUTER__INNER__X": "3"})
    assert (cfg.outer.inner.x, cfg.outer.inner.ratio, cfg.outer.flag) == (4, 0.25, True)
    assert config_loader.from_process_env(_Root, {config_loader.ENV_CONFIG_JSON: config_loader.to_json(cfg)}) == cfg


def test_deep_key_errors_name_the_key():
    with pytest.raises(KvplugConfigError, match=r"unknown key 'outer\.inner\.y' \(keys of outer\.inner: x, ratio\)"):
        config_loader.resolve(_Root, sets=["outer.inner.y=1"], environ={})
    with pytest.raises(KvplugConfigError, match=r"KVPLUG_OUTER__NOPE__X: unknown key 'outer\.nope'"):
        config_loader.resolve(_Root, environ={"KVPLUG_OUTER__NOPE__X": "1"})
    with pytest.raises(KvplugConfigError, match=r"'outer\.flag' is a value, not a section"):
        config_loader.resolve(_Root, sets=["outer.flag.x=1"], environ={})
    with pytest.raises(KvplugConfigError, match=r"^outer\.inner\.x: must be >= 0, got -1$"):  # validate(path) nested
        config_loader.resolve(_Root, sets=["outer.inner.x=-1"], environ={})
    with pytest.raises(KvplugConfigError, match=r"^outer\.inner\.ratio: must be a finite number"):
        config_loader.resolve(_Root, sets=["outer.inner.ratio=.nan"], environ={})
    with pytest.raises(KvplugConfigError, match=r"^outer\.checked\.n: must be <= 9, got 10$"):  # __post_init__
        config_loader.resolve(_Root, sets=["outer.checked.n=10"], environ={})


def test_recheck_after_replace():
    cfg = config_loader.resolve(_Root, environ={})
    bad = msgspec.structs.replace(cfg.outer.inner, x=-5)
    with pytest.raises(KvplugConfigError, match=r"^outer\.inner\.x: must be >= 0, got -5$"):
        config_loader.recheck(bad, "outer.inner")
    assert config_loader.recheck(cfg.outer, "outer") == cfg.outer
