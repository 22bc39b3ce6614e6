"""runner.flush_pending: the per-layer device counts left by sparse chunks reach the counters and the cost
model's density feedback, all of them, each with its own causal and predicted pairs."""
from __future__ import annotations

import torch

from attention_backends.sparse_prefill import cost_model, runner


def test_flush_pending_records_every_layer_count(monkeypatch):
    monkeypatch.setattr(runner, "STATS", dict(runner.STATS, sparse_layer_calls=0, computed_pairs=0, causal_pairs=0))
    feedback = cost_model.DensityFeedback()
    monkeypatch.setattr(cost_model, "FEEDBACK", feedback)
    monkeypatch.setattr(runner, "_PENDING_PAIRS", [
        (torch.tensor(30), 100, 40.0),             # a device scalar, as the Triton path leaves it
        (torch.tensor([50], dtype=torch.int32), 200, None),  # no prediction (threshold rule): not fed back
        (torch.tensor(7), 10, 5.0),
    ])
    runner.flush_pending()
    assert runner.STATS["sparse_layer_calls"] == 3
    assert runner.STATS["computed_pairs"] == 87 and runner.STATS["causal_pairs"] == 310
    d = cost_model.DensityFeedback.DECAY
    assert abs(feedback.measured - (30 * d + 7)) < 1e-9 and abs(feedback.predicted - (40.0 * d + 5.0)) < 1e-9
    assert runner._PENDING_PAIRS == []
    runner.flush_pending()  # nothing pending: nothing changes
    assert runner.STATS["sparse_layer_calls"] == 3
