"""What the scheduler side counts when a worker could not read an entry it planned as a hit."""
from __future__ import annotations

from types import SimpleNamespace

from offload import metadata
from tests.offload.test_deferred_save import request, scheduler


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self, n: int = 1) -> None:
        self.value += n


def test_an_unreadable_entry_is_a_counted_miss_and_forgotten(monkeypatch):
    side = scheduler(monkeypatch)
    side.m = SimpleNamespace(misses=Counter())
    req = request("r", 2)
    side.get_num_new_matched_tokens(req, 0)
    key = side.key("keep", req.block_hashes[0])
    side.planner.plan_store(key, 100)
    assert side.planner.where(key) == "cpu"
    side.update_connector_output(SimpleNamespace(finished_sending=None,
                                                 kv_connector_worker_meta=metadata.KvplugWorkerMetadata({key})))
    assert side.m.misses.value == 1 and side.planner.where(key) is None
