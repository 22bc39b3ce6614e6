"""Deferred free of saved blocks (CUDA): wait_for_save does not make the compute stream wait for the step's
device->host copies; vLLM keeps a finished request's blocks (request_finished -> True) until a worker's
get_finished reports the request, which happens once the copies' event has completed.

Fake lanes stand in for the CUDA side streams: the copies run inline (the bytes are right at once) while
events stay "not completed" until a test completes them, and every stream wait is logged, so the tests see
what the compute and load streams would wait for."""
from __future__ import annotations

import contextlib
import threading
from types import SimpleNamespace

import pytest
import torch

from cache_policies import registry as policy_registry
from offload import connector as conn
from offload import layerwise, metadata
from offload.layout import KvLayout
from offload.scheduler_side import SchedulerSide
from offload.tiers.planner import demote
from offload.worker_side import WorkerSide
from tests.offload.test_layerwise import (LAYERS, POLICIES, TOKENS, assert_same_payload, make_worker,
                                          reference_entries, run_step, save_meta)


class FakeEvent:
    def __init__(self, name: str) -> None:
        self.name = name
        self.completed = False
        self.host_waits: list[str] = []  # names of the threads that waited on the host
        self.hold_other_threads: threading.Event | None = None

    def query(self) -> bool:
        return self.completed

    def synchronize(self) -> None:
        if self.hold_other_threads is not None and threading.current_thread() is not threading.main_thread():
            self.hold_other_threads.wait(10)
        self.host_waits.append(threading.current_thread().name)
        self.completed = True

    def __repr__(self) -> str:
        return f"FakeEvent({self.name}, completed={self.completed})"


class FakeLane(layerwise.Lane):
    """A side stream whose work runs inline but whose events complete only when a test says so."""

    def __init__(self, name: str, log: list) -> None:
        self.device = torch.device("cpu")
        self.stream = object()  # "has a stream": the connector takes the asynchronous path
        self.name, self.log, self.events = name, log, []

    def context(self):
        return contextlib.nullcontext()

    def follow_compute(self) -> None:
        pass

    def record(self, timing: bool = False):
        ev = FakeEvent(f"{self.name}{len(self.events)}")
        self.events.append(ev)
        return ev

    def compute_waits(self, event) -> None:
        if event is not None:
            self.log.append(("compute", event))

    def waits(self, event) -> None:
        if event is not None:
            self.log.append((self.name, event))

    def to_device_index(self, ids):
        return torch.tensor(ids, dtype=torch.long)


def fake_worker(tmp_path=None):
    side = make_worker(tmp_path)
    log: list = []
    side._save_lane, side._load_lane = FakeLane("save", log), FakeLane("load", log)
    return side, log


def deferred_meta(policy, block_ids, req_id="r1", tier="cpu"):
    meta, keys = save_meta(policy, block_ids, tier=tier)
    for spec in meta.saves:
        spec.req_id, spec.deferred = req_id, True
    return meta, keys


def save_event(side, step=-1):
    return side._save_lane.events[step]


@pytest.mark.parametrize("policy", ["keep", "quant:int8", "quant:int4"])
def test_wait_for_save_does_not_make_the_compute_stream_wait_for_deferred_copies(policy):
    side, log = fake_worker()
    meta, keys = deferred_meta(policy, [3, 4, 5, 6])
    run_step(side, meta)
    assert not save_event(side).completed
    assert [w for w in log if w[0] == "compute"] == []  # the step ends while the copies run
    # Nothing lost: the entries are stored (bytes of the synchronous path) and readable once copied.
    for key, want in zip(keys, reference_entries(side, policy, [3, 4, 5, 6])):
        assert_same_payload(side.tiers["cpu"].get(key), want)
    # The host-side cost the benchmark reports (pinned allocation is part of issuing).
    assert side.stats.save_issue_s >= side.stats.save_alloc_s > 0


def test_saves_the_scheduler_does_not_defer_still_order_the_compute_stream_after_the_copies():
    side, log = fake_worker()
    meta, _ = save_meta("keep", [3, 4])  # deferred=False: its blocks may be freed right after the step
    run_step(side, meta)
    assert log == [("compute", save_event(side))]
    assert side.finished_saves({""}) == set()


def test_get_finished_reports_a_finished_request_once_after_its_copies_completed():
    side, _ = fake_worker()
    meta, _ = deferred_meta("keep", [3, 4, 5], req_id="r1")
    run_step(side, meta)
    ev = save_event(side)
    assert side.finished_saves(set()) == set()  # not finished: vLLM still holds its blocks anyway
    assert side.finished_saves({"r1", "not-ours"}) == set()  # finished, copies still running: keep blocks
    assert side.finished_saves(set()) == set()
    ev.completed = True
    # Reported in a later call although vLLM passes each finished id only once.
    assert side.finished_saves(set()) == {"r1"}
    assert side.finished_saves({"r1"}) == set()  # never twice (vLLM would free the blocks twice)
    assert side.stats.deferred_frees == 1
    get_finished = conn.KvplugConnector.get_finished
    assert get_finished(SimpleNamespace(worker_side=side), {"r1"}) == (None, None)


def test_a_request_that_finishes_after_its_copies_completed_is_reported_in_the_same_call():
    side, _ = fake_worker()
    run_step(side, deferred_meta("quant:int8", [7, 8], req_id="r2")[0])
    save_event(side).completed = True
    get_finished = conn.KvplugConnector.get_finished
    assert get_finished(SimpleNamespace(worker_side=side), {"r2"}) == ({"r2"}, None)


def test_each_request_of_a_step_is_reported_and_none_is_lost_when_the_save_fails(monkeypatch):
    side, _ = fake_worker()
    meta, _ = deferred_meta("keep", [1, 2], req_id="a")
    meta_b, _ = deferred_meta("quant:int8", [9, 10], req_id="b")
    meta.saves += meta_b.saves
    meta.tier_ops += meta_b.tier_ops
    monkeypatch.setattr(layerwise.Segment, "allocate",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("pinned memory exhausted")))
    run_step(side, meta)  # must not raise; the entries are future misses
    assert side.finished_saves({"a", "b"}) == set()  # copies of earlier layers may still be queued
    save_event(side).completed = True
    assert side.finished_saves(set()) == {"a", "b"}


def test_a_deferred_save_without_registered_layers_is_reported_at_once():
    side = WorkerSide(SimpleNamespace(tp_rank=0), make_worker().cfg, POLICIES)  # no register_views
    meta, _ = deferred_meta("keep", [1, 2], req_id="r")
    side.save(meta)
    assert side.finished_saves({"r"}) == {"r"}


def test_a_load_of_an_entry_whose_save_is_in_flight_waits_for_that_save_on_the_load_stream():
    side, log = fake_worker()
    meta, keys = deferred_meta("keep", [1, 2, 3])
    run_step(side, meta)
    ev = save_event(side)
    log.clear()
    load = metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("keep", keys, [20, 21, 22])])
    run_step(side, load)
    assert ("load", ev) in log and ("compute", ev) not in log
    assert log.index(("load", ev)) == 0  # before the load stream's first copy
    ev.completed = True
    log.clear()
    run_step(side, metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("keep", keys, [30, 31, 32])]))
    assert [w for w in log if w[1] is ev] == []  # done: no stream waits on it any more


def test_a_disk_entry_still_being_copied_is_host_synchronized_before_the_host_reads_it(tmp_path):
    side, _ = fake_worker(tmp_path)
    gate = threading.Event()
    record = side._save_lane.record

    def held_record(timing=False):
        ev = record(timing)
        ev.hold_other_threads = gate  # the disk writer thread waits for this copy until the test is done
        return ev

    side._save_lane.record = held_record
    meta, keys = deferred_meta("quant:int8", [2, 3], tier="disk")
    run_step(side, meta)
    ev = save_event(side)
    assert side.tiers["disk"].writer.pending(keys[0]) is not None and ev.host_waits == []
    # The pending disk entry is stacked on the host by the load (loose entries): the host must wait first.
    run_step(side, metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("quant:int8", keys, [40, 41])]))
    assert ev.host_waits and set(ev.host_waits) == {threading.main_thread().name}
    assert side.stats.loaded_blocks["disk"] == 2 and not side.take_load_errors()
    gate.set()
    side.close()
    assert all(side.tiers["disk"].disk.path(k).exists() for k in keys)


def test_demoting_an_entry_whose_copy_is_in_flight_makes_the_disk_writer_wait_for_that_copy(tmp_path):
    side, _ = fake_worker(tmp_path)
    meta, keys = deferred_meta("keep", [5, 6])
    run_step(side, meta)
    ev = save_event(side)
    writes = []
    side.tiers["disk"].writer.write = lambda key, payload, ready=None, label="": writes.append((key, ready))
    run_step(side, metadata.KvplugConnectorMetadata(tier_ops=[demote(k, "cpu", "disk") for k in keys]))
    assert writes == [(k, ev) for k in keys]


def test_a_reallocated_block_whose_save_is_in_flight_fences_the_compute_stream():
    """After a preemption vLLM frees the blocks at once; if one comes back while its copy runs, the step that
    writes it must not start before the copy read it."""
    side, log = fake_worker()
    run_step(side, deferred_meta("keep", [1, 2, 3])[0])
    ev = save_event(side)
    log.clear()
    side.start_load(metadata.KvplugConnectorMetadata(fresh_block_ids=[10, 11]))  # other blocks: no wait
    assert log == []
    side.start_load(metadata.KvplugConnectorMetadata(fresh_block_ids=[11, 2]))
    assert log == [("compute", ev)] and side.stats.reuse_fences == 1
    log.clear()
    ev.completed = True
    side.start_load(metadata.KvplugConnectorMetadata(fresh_block_ids=[2]))
    assert log == []


# --- scheduler side ------------------------------------------------------------------------------------

def scheduler(monkeypatch, defer_free=True):
    layout = KvLayout(model="m", dtype="float32", num_layers=LAYERS, kv_heads=2, head_dim=32,
                      block_size=TOKENS, kv_cache_dtype="auto", tp_rank=0, tp_size=1)
    cfg = make_worker().cfg
    return SchedulerSide(layout, cfg, POLICIES, defer_free=defer_free)


def request(req_id, blocks, policy=None, extra_tokens=3):
    prompt = list(range(blocks * TOKENS + extra_tokens))
    params = {policy_registry.REQUEST_POLICY_KEY: policy} if policy else {}
    return SimpleNamespace(request_id=req_id, prompt_token_ids=prompt, num_tokens=len(prompt),
                           block_hashes=[f"{req_id}-h{i}".encode() for i in range(blocks)], kv_transfer_params=params)


def schedule_whole_prompt(side, req, block_ids):
    """The scheduler output of the step that prefills ``req``'s whole prompt."""
    side.get_num_new_matched_tokens(req, 0)
    new = SimpleNamespace(req_id=req.request_id, block_ids=(list(block_ids),), num_computed_tokens=0)
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    so = SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=cached,
                         num_scheduled_tokens={req.request_id: len(req.prompt_token_ids)})
    return side.build_connector_meta(so)


@pytest.mark.parametrize("vllm_line", ["0.32", "0.34"])
def test_a_request_resumed_after_preemption_loads_into_its_new_blocks_and_is_not_saved_again(monkeypatch, vllm_line):
    """vLLM 0.32 sends a resumed request in scheduled_cached_reqs (named in resumed_req_ids); 0.34 has no
    resumed_req_ids and sends it again in scheduled_new_reqs. Either way its block table is the new blocks, its
    saved prefix loads into them, and the block past the prompt's full blocks is fresh."""
    side = scheduler(monkeypatch)
    req = request("r", 4)
    assert [s.block_ids for s in schedule_whole_prompt(side, req, [0, 1, 2, 3, 4]).saves] == [[0, 1, 2, 3]]
    matched, _ = side.get_num_new_matched_tokens(req, 0)  # preempted: back through the waiting queue
    new_ids = [7, 8, 9, 10, 11]
    side.update_state_after_alloc(req, SimpleNamespace(get_block_ids=lambda: (new_ids,)), matched)
    left = {"r": len(req.prompt_token_ids) - matched}
    if vllm_line == "0.34":
        so = SimpleNamespace(scheduled_new_reqs=[SimpleNamespace(req_id="r", block_ids=(new_ids,),
                                                                 num_computed_tokens=matched)],
                             scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[],
                                                                   num_computed_tokens=[]),
                             num_scheduled_tokens=left)
    else:
        so = SimpleNamespace(scheduled_new_reqs=[], num_scheduled_tokens=left,
                             scheduled_cached_reqs=SimpleNamespace(req_ids=["r"], new_block_ids=[(new_ids,)],
                                                                   num_computed_tokens=[matched],
                                                                   resumed_req_ids={"r"}))
    meta = side.build_connector_meta(so)
    assert matched == 4 * TOKENS and [lo.block_ids for lo in meta.loads] == [[7, 8, 9, 10]]
    assert side.reqs["r"].block_ids == new_ids and 11 in meta.fresh_block_ids and meta.saves == []


def test_request_finished_delays_the_free_only_while_a_deferred_save_is_planned(monkeypatch):
    side = scheduler(monkeypatch)
    finished = conn.KvplugConnector.request_finished
    saved, unsaved = request("saved", 4), request("prefilling", 4)
    meta = schedule_whole_prompt(side, saved, range(5))
    assert [(s.req_id, s.deferred) for s in meta.saves] == [("saved", True)]
    side.get_num_new_matched_tokens(unsaved, 0)  # never scheduled to the end of its prompt: nothing to save
    assert finished(SimpleNamespace(scheduler_side=side), unsaved, [7]) == (False, None)
    assert finished(SimpleNamespace(scheduler_side=side), saved, list(range(5))) == (True, None)
    assert side.delayed_frees == {"saved"}
    side.update_connector_output(SimpleNamespace(finished_sending={"saved"}, kv_connector_worker_meta=None))
    assert side.delayed_frees == set()


@pytest.mark.parametrize("why", ["cpu-engine", "whole-block-policy", "opted-out", "short-prompt"])
def test_request_finished_frees_at_once_when_no_save_outlives_the_step(monkeypatch, why):
    side = scheduler(monkeypatch, defer_free=why != "cpu-engine")
    if why == "whole-block-policy":
        req = request("r", 4, policy="drop:snapkv")
    elif why == "opted-out":
        req = request("r", 4)
        req.kv_transfer_params = {policy_registry.REQUEST_OFFLOAD_KEY: False}
    elif why == "short-prompt":
        req = request("r", 0, extra_tokens=TOKENS - 1)  # no full block
    else:
        req = request("r", 4)
    meta = schedule_whole_prompt(side, req, range(5))
    assert not any(s.deferred for s in meta.saves)
    assert side.request_finished(req) is False and side.delayed_frees == set()


def test_scheduler_and_worker_agree_a_finished_request_is_freed_once_after_its_save(monkeypatch):
    sched = scheduler(monkeypatch)
    worker, log = fake_worker()
    req = request("r", 4)
    meta = schedule_whole_prompt(sched, req, [8, 9, 10, 11, 12])
    run_step(worker, meta)
    assert [w for w in log if w[0] == "compute"] == []
    assert sched.request_finished(req) is True  # finished in the same step, copies still running
    assert worker.finished_saves({"r"}) == set()
    save_event(worker).completed = True
    done = worker.finished_saves(set())
    sched.update_connector_output(SimpleNamespace(finished_sending=done, kv_connector_worker_meta=None))
    assert done == {"r"} and sched.delayed_frees == set()
    assert all(worker.tiers["cpu"].get(k) is not None for s in meta.saves for k in s.keys)
    assert worker.finished_saves({"r"}) == set()


def test_chunked_prefill_saves_once_after_the_last_chunk_and_an_abort_before_it_frees_at_once(monkeypatch):
    """The save is planned in the step that computes the prompt's last chunk (earlier chunks' blocks are
    final by then; later steps only write blocks past the prompt's full blocks), so a request aborted in
    the middle of its prefill has nothing in flight and its blocks are freed at once."""
    side = scheduler(monkeypatch)
    req = request("r", 4)
    side.get_num_new_matched_tokens(req, 0)
    half = 2 * TOKENS
    new = SimpleNamespace(req_id="r", block_ids=([0, 1],), num_computed_tokens=0)
    none_cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    first = side.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=none_cached,
                                                      num_scheduled_tokens={"r": half}))
    assert first.saves == []
    cached = SimpleNamespace(req_ids=["r"], new_block_ids=[([2, 3, 4],)], num_computed_tokens=[half],
                             resumed_req_ids=set())
    rest = len(req.prompt_token_ids) - half
    last = side.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[], scheduled_cached_reqs=cached,
                                                     num_scheduled_tokens={"r": rest}))
    assert [(s.block_ids, s.deferred) for s in last.saves] == [([0, 1, 2, 3], True)]
    again = side.build_connector_meta(SimpleNamespace(
        scheduled_new_reqs=[], num_scheduled_tokens={"r": 1},
        scheduled_cached_reqs=SimpleNamespace(req_ids=["r"], new_block_ids=[None],
                                              num_computed_tokens=[len(req.prompt_token_ids)], resumed_req_ids=set())))
    assert again.saves == []  # decode steps: no second save
    assert side.request_finished(req) is True

    aborted = request("a", 4)
    side.get_num_new_matched_tokens(aborted, 0)
    new = SimpleNamespace(req_id="a", block_ids=([5, 6],), num_computed_tokens=0)
    side.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=none_cached,
                                              num_scheduled_tokens={"a": half}))
    assert side.request_finished(aborted) is False


def test_blocks_of_a_preempted_request_reallocated_while_its_save_runs_fence_the_next_step(monkeypatch):
    """Scheduler to worker: A's save is in flight when vLLM preempts A (its blocks are freed at once, no
    request_finished) and gives two of them to B, after a prefix-cache hit of one block. The step computing
    B waits for A's save; vLLM's own prefix-cache hits (shared, only read) do not make it wait."""
    sched = scheduler(monkeypatch)
    worker, log = fake_worker()
    a = request("a", 4)
    run_step(worker, schedule_whole_prompt(sched, a, [1, 2, 3, 4, 5]))
    ev = save_event(worker)
    log.clear()
    b = request("b", 4)
    sched.get_num_new_matched_tokens(b, TOKENS)  # vLLM's prefix cache supplies B's first block: block 1
    new = SimpleNamespace(req_id="b", block_ids=([1, 3, 4, 20, 21],), num_computed_tokens=TOKENS)
    cached = SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[], resumed_req_ids=set())
    meta = sched.build_connector_meta(SimpleNamespace(scheduled_new_reqs=[new], scheduled_cached_reqs=cached,
                                                      num_scheduled_tokens={"b": len(b.prompt_token_ids) - TOKENS}))
    assert meta.allocated_block_ids == [3, 4, 20, 21]
    worker.start_load(meta)
    assert log == [("compute", ev)] and worker.stats.reuse_fences == 1
    log.clear()
    hit_only = metadata.KvplugConnectorMetadata(allocated_block_ids=[20, 21])  # block 1 read from the cache only
    worker.start_load(hit_only)
    assert log == []
