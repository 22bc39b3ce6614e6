"""The ``offload`` section (offload/config.py): errors name the key."""
import msgspec
import pytest

from kvplug.config import KvplugConfigError
from offload.config import OffloadConfig


def test_sizes_and_tiers():
    cfg = OffloadConfig(enabled=True, cpu_size="1GiB", disk_path="/var/kv", disk_size="2GiB")
    assert cfg.cpu_bytes == 1 << 30 and cfg.disk_bytes == 2 << 30
    assert OffloadConfig(disk_size="2GiB").disk_bytes == 0  # no path: no disk tier


@pytest.mark.parametrize("fields,needle", [
    ({"cpu_size": "lots"}, r"offload\.cpu_size: 'lots' is not a size"),
    ({"disk_path": "/d", "disk_size": 0}, r"offload\.disk_size: a disk tier"),
    ({"enabled": True, "cpu_size": 0}, r"offload: enabled with no tier"),
    ({"reuse_weight": -1.0}, r"offload\.reuse_weight: must be >= 0"),
    ({"reuse_weight": float("inf")}, r"offload\.reuse_weight: must be a finite number"),
    ({"disk_path": "kv/cache"}, r"offload\.disk_path: must be an absolute path, got 'kv/cache'"),
])
def test_bad_values_name_the_key(fields, needle):
    with pytest.raises(KvplugConfigError, match=needle):
        OffloadConfig(**fields)
    with pytest.raises(msgspec.ValidationError, match=needle):  # what the loader sees when parsing
        msgspec.convert(fields, OffloadConfig, strict=False)


def test_disk_path_that_is_a_file_is_an_error(tmp_path):
    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(KvplugConfigError, match=r"offload\.disk_path: .* exists and is not a directory"):
        OffloadConfig(disk_path=str(a_file))
