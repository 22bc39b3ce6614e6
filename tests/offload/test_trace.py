"""offload/trace.py: the host-side events and profiler ranges benchmarks/gpu_offload.py --profile reads."""
from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.kernels import offload_load_bench as bench
from offload import metadata, trace
from tests.offload.test_layerwise import LAYERS, make_worker, run_step, save_meta


@pytest.fixture
def tracing():
    trace.enable()
    yield
    trace.enable(False)


def test_nothing_is_recorded_unless_enabled():
    trace.enable(False)
    with trace.span("kvplug.offload.x", a=1) as fields:
        fields["b"] = 2
    trace.mark("kvplug.offload.y")
    assert trace.take() == []


def test_scheduler_events_say_lookup_result_step_and_finish(tracing):
    side, request, blocks, step, ids = bench._scheduler(8)
    trace.take()
    r = request("f1")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        matched, _ = side.get_num_new_matched_tokens(r, 0)
        side.update_state_after_alloc(r, blocks(ids), matched)
        side.build_connector_meta(step("f1", 0, ids))
    side.request_finished(r, (ids,))
    names = {e.name for e in prof.events()}
    assert {"kvplug.offload.scheduler.lookup", "kvplug.offload.scheduler.after_alloc",
            "kvplug.offload.scheduler.build_meta"} <= names
    ev = {e["name"].rsplit(".", 1)[1]: e for e in trace.take()}
    assert ev["lookup"]["req"] == "f1" and ev["lookup"]["matched_tokens"] == 8 * bench.BLOCK == matched
    assert ev["lookup"]["load_async"] is False and ev["lookup"]["t1"] >= ev["lookup"]["t0"]
    assert ev["load_planned"] == {**ev["load_planned"], "req": "f1", "blocks": 8, "step": ev["lookup"]["step"]}
    assert ev["build_meta"]["load_blocks"] == 8 and ev["build_meta"]["scheduled"] == ["f1"]
    assert ev["after_alloc"]["req"] == "f1" and ev["lookup"]["t1"] <= ev["after_alloc"]["t0"] <= ev["build_meta"]["t0"]
    assert ev["finished"]["step"] == ev["build_meta"]["step"] + 1


def test_worker_events_and_profiler_ranges_of_a_load_and_a_save(tracing):
    side = make_worker()
    meta, keys = save_meta("quant:int8", [1, 2, 3])
    load = metadata.KvplugConnectorMetadata(loads=[metadata.LoadSpec("quant:int8", keys, [10, 11, 12])])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_step(side, meta)
        run_step(side, load)
    names = [e.name for e in prof.events()]
    assert names.count("kvplug.offload.worker.issue_layer") == LAYERS
    assert names.count("kvplug.offload.worker.save_layer") == LAYERS
    assert "kvplug.offload.worker.plan_load" in names
    issued = [e for e in trace.take() if e["name"] == "kvplug.offload.worker.load_issued"]
    assert len(issued) == 1 and issued[0]["layers"] == LAYERS and issued[0]["overlapped"] is False
    assert side.stats.load_issue_s >= issued[0]["issue_s"] > 0 and side.stats.load_plan_s > 0


def test_no_range_outside_a_profile():
    assert not torch.autograd._profiler_enabled()
    assert not isinstance(trace.profiled("kvplug.offload.z"), torch.profiler.record_function)
