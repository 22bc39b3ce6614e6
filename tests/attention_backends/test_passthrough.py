"""With every feature off, kvplug's backend is a passthrough: greedy token ids equal vanilla vLLM's."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.engine


def _greedy(tmp_path, name: str, plugins: str | None) -> dict:
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # collective_rpc of a function
    env.pop("VLLM_PLUGINS", None)
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins
    out = tmp_path / f"{name}.json"
    proc = subprocess.run([sys.executable, "-m", "tests.attention_backends.greedy_ids", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(smollm2_path, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("greedy")
    return _greedy(tmp, "vanilla", "none"), _greedy(tmp, "kvplug", None)


def test_kvplug_backend_really_ran(runs):
    vanilla, kvplug = runs
    assert vanilla["attention_impls"] == ["vllm.v1.attention.backends.cpu_attn.CPUAttentionBackendImpl"]
    assert kvplug["attention_impls"] == ["attention_backends.kvplug_backend.KvplugAttentionImpl"]


def test_greedy_token_ids_identical_to_vanilla(runs):
    vanilla, kvplug = runs
    assert max(vanilla["prompt_tokens"]) > 2048  # the long prompt was prefilled in chunks
    assert all(len(ids) == 24 for ids in vanilla["token_ids"])
    assert kvplug["token_ids"] == vanilla["token_ids"]
