"""Tensor parallel on Ray with the plugin on, on CPU: `kvplug serve --tensor-parallel-size 2
--distributed-executor-backend ray` on a tiny random Llama (heads divisible by 2; SmolLM2's 9 heads are not).

The config reaches both Ray workers: a non-default metrics prefix set on the command line names the
samples that *each rank* writes, so both ranks' attention layers must show up under it on /metrics.
"""
from __future__ import annotations

import os

import httpx
import pytest

from tests.conftest import start_server, stop_server

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tp2_server(tmp_path_factory):
    pytest.importorskip("ray")
    from benchmarks.gpu_tp2 import write_random_model

    model = write_random_model("llama-tiny", tmp_path_factory.mktemp("tiny") / "llama-tiny")
    env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="0|1")  # one core per rank (auto binds by NUMA node)
    server = start_server([str(model), "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray",
                           "--max-model-len", "1024", "--served-model-name", "tiny", "--set", "metrics.prefix=kvtp"],
                          tmp_path_factory.mktemp("tp2") / "kvplug-serve-tp2.log", env=env)
    yield server, 4  # num_hidden_layers of llama-tiny
    stop_server(server)


def total(text: str, name: str) -> tuple[float, list[dict]]:
    from prometheus_client.parser import text_string_to_metric_families

    found = [s for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name]
    return sum(s.value for s in found), [s.labels for s in found]


def test_plugin_active_in_both_ray_workers(tp2_server):
    server, layers = tp2_server
    for prompt in ([5, 17, 300, 42] * 8, [7] * 40):
        r = httpx.post(f"{server.base_url}/v1/completions", timeout=300,
                       json={"model": "tiny", "prompt": prompt, "max_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    text = server.metrics_text()
    built, labels = total(text, "kvtp_backend_layers_total")
    assert built == 2 * layers, (built, labels, server.log_tail())  # every layer on both ranks, with our config
    calls, _ = total(text, "kvtp_attention_calls_total")
    assert calls >= 2 * layers * 2  # both ranks ran prefill and decode through kvplug's backend
    assert total(text, "kvplug_backend_layers_total")[0] == 0  # no process fell back to the default config
    assert "RayWorkerWrapper" in server.log_tail(400) or "ray" in server.log_tail(400).lower()
