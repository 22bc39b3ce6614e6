"""Fixtures for the benchmark-suite tests (the real server is tests/conftest.py's
session fixture ``kvplug_server``)."""

from __future__ import annotations

import os

import pytest

from .fake_openai import FakeOpenAI


@pytest.fixture(scope="session")
def _fake_server():
    srv = FakeOpenAI().start()
    yield srv
    srv.stop()


@pytest.fixture
def fake_server(_fake_server):
    _fake_server.reset()
    yield _fake_server
    _fake_server.reset()


@pytest.fixture
def vllm_before_packed_kv(monkeypatch):
    """The installed vLLM reads as 0.25.1, before the packed KV layout: LMCache's in-process modes are then not
    flagged known_issue (LMCache #4463) whatever vLLM the test machine has."""
    from benchmarks.peers import lmcache

    monkeypatch.setattr(lmcache, "installed_vllm_version", lambda: "0.25.1")


@pytest.fixture(scope="session")
def smollm2_tokenizer_path():
    """The SmolLM2 HF folder (tokenizer) from kvplug.models, or skip."""
    env = os.environ.get("KVPLUG_BENCH_TOKENIZER")
    if env:
        return env
    try:
        from kvplug.models import prepare
        return str(prepare())
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"SmolLM2 tokenizer unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_counter(smollm2_tokenizer_path):
    from benchmarks.scbench.tokenizer import load_counter
    return load_counter(smollm2_tokenizer_path)[0]


@pytest.fixture
def fake_kvplug_serve(monkeypatch, tmp_path):
    """``kvplug serve`` as harness starts it replaced by fake_kvplug_serve.py; yields a function that reads the
    pids its processes wrote ({"launcher": pid, "server": pid, "core": pid}). Set $FAKE_SERVE_MODE to vary it."""
    import sys
    from pathlib import Path

    from benchmarks import harness

    pids = tmp_path / "pids"
    monkeypatch.setenv("FAKE_SERVE_PIDS", str(pids))
    monkeypatch.setattr(harness, "KVPLUG_CLI", [sys.executable, str(Path(__file__).with_name("fake_kvplug_serve.py"))])
    return lambda: dict((role, int(pid)) for role, pid in (ln.split() for ln in pids.read_text().splitlines()))
