"""runner.flush_pending: the per-layer device counts left by sparse chunks reach the counters and the cost
model's density feedback, all of them, each with its own causal and predicted pairs; the builder's flush never
waits for the device (a copy not done yet is recorded by a later flush), stats_snapshot waits for all."""
from __future__ import annotations

import pytest
import torch

from attention_backends.sparse_prefill import cost_model, runner


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(runner, "STATS", dict(runner.STATS, sparse_layer_calls=0, computed_pairs=0, causal_pairs=0))
    feedback = cost_model.DensityFeedback()
    monkeypatch.setattr(cost_model, "FEEDBACK", feedback)
    monkeypatch.setattr(runner, "_PENDING_PAIRS", [])
    monkeypatch.setattr(runner, "_IN_FLIGHT", [])
    return feedback


def test_flush_pending_records_every_layer_count(monkeypatch, fresh):
    monkeypatch.setattr(runner, "_PENDING_PAIRS", [
        (torch.tensor(30), 100, 40.0, None),             # a device scalar, as the Triton path leaves it
        (torch.tensor([50], dtype=torch.int32), 200, None, None),  # no prediction (threshold rule): not fed back
        (torch.tensor(7), 10, 5.0, None),
    ])
    runner.flush_pending()
    assert runner.STATS["sparse_layer_calls"] == 3
    assert runner.STATS["computed_pairs"] == 87 and runner.STATS["causal_pairs"] == 310
    d = cost_model.DensityFeedback.DECAY
    assert abs(fresh.measured - (30 * d + 7)) < 1e-9 and abs(fresh.predicted - (40.0 * d + 5.0)) < 1e-9
    assert runner._PENDING_PAIRS == [] and runner._IN_FLIGHT == []
    runner.flush_pending()  # nothing pending: nothing changes
    assert runner.STATS["sparse_layer_calls"] == 3


class _Event:
    """A CUDA event whose copy completes when the test says so; synchronize() is the blocking wait."""

    def __init__(self) -> None:
        self.done = False
        self.waited = False

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited = True
        self.done = True


def test_builder_flush_never_waits_and_keeps_step_order(fresh):
    slow, fast = _Event(), _Event()
    runner._IN_FLIGHT.extend([runner._CountsCopy(torch.tensor([11]), slow, [(100, None)]),
                              runner._CountsCopy(torch.tensor([22]), fast, [(100, None)])])
    fast.done = True  # the later step's copy is done, the earlier one's not: neither is recorded out of order
    runner.flush_pending()
    assert runner.STATS["sparse_layer_calls"] == 0 and len(runner._IN_FLIGHT) == 2 and not slow.waited
    slow.done = True
    runner.flush_pending()
    assert runner.STATS["computed_pairs"] == 33 and runner._IN_FLIGHT == [] and not slow.waited


def test_stats_snapshot_waits_for_every_count(fresh):
    """A snapshot taken after a request finished counts that request's last step (whose counts no later builder
    flushed yet): the benchmark's second-turn density must not inherit the first turn's last chunk."""
    pending = _Event()
    runner._IN_FLIGHT.append(runner._CountsCopy(torch.tensor([5]), pending, [(10, None)]))
    runner._PENDING_PAIRS.append((torch.tensor(7), 20, None, None))
    snap = runner.stats_snapshot()
    assert pending.waited and snap["computed_pairs"] == 12 and snap["causal_pairs"] == 30
    assert runner._PENDING_PAIRS == [] and runner._IN_FLIGHT == []
