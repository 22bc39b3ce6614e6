"""One small load run against a real vLLM CPU server on SmolLM2."""

from __future__ import annotations

import json

import pytest

from benchmarks.cli import main


@pytest.mark.engine
def test_kv_multi_turn_against_real_server(kvplug_server, tmp_path):
    out = tmp_path / "bench"
    rc = main(["run", "--endpoint", kvplug_server.base_url, "--tokenizer", str(kvplug_server.model_path),
               "--task", "kv", "--mode", "multi-turn", "--context-tokens", "1000", "--turns", "2",
               "--sessions", "2", "--concurrency", "2", "--max-tokens", "24", "--seed", "0",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    s = data["summary"]
    assert s["requests"] == 4 and s["errors"] == 0 and s["completed"] == 4
    assert s["accuracy"] is not None and 0.0 <= s["accuracy"] <= 1.0
    for r in data["requests"]:
        assert r["ttft"] > 0 and r["e2e"] >= r["ttft"] and r["output_tokens"] >= 1
        assert isinstance(r["prediction"], str) and r["prediction"]
    by_turn = {t: [r for r in data["requests"] if r["turn"] == t] for t in (1, 2)}
    # turn 2 re-sends the whole turn-1 conversation: longer prompt, and the server reuses its prefix
    assert min(r["prompt_tokens"] for r in by_turn[2]) > max(r["prompt_tokens"] for r in by_turn[1])
    assert min(r["prompt_tokens"] for r in by_turn[1]) >= 1000
    assert s["metrics"]["available"] is True
    assert s["prefix_cache_hit_rate"] is not None and s["prefix_cache_hit_rate"] > 0.2
    for p in ("ttft_per_turn.png", "accuracy_per_turn.png", "latency_cdf.png"):
        assert (out / p).read_bytes()[:4] == b"\x89PNG"
    assert "| accuracy (ok requests) |" in (out / "summary.md").read_text()


@pytest.mark.engine
def test_multi_request_stops_at_max_requests_on_real_server(kvplug_server, tmp_path):
    out = tmp_path / "mr"
    rc = main(["run", "--endpoint", kvplug_server.base_url, "--tokenizer", str(kvplug_server.model_path),
               "--task", "passkey", "--mode", "multi-request", "--context-tokens", "300",
               "--turns", "2", "--sessions", "2", "--concurrency", "4", "--max-tokens", "8",
               "--max-requests", "3", "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    assert data["stop_reason"] == "max-requests"
    assert len(data["requests"]) == 3 and data["summary"]["errors"] == 0
    assert all(r["score"] in (0.0, 1.0) for r in data["requests"])
