"""benchmarks/kernels/offload_load_bench.py at tiny sizes on the CPU: the host profile's phases and the device
part's load path (its equality checks and the fields the H100 run is read by), in a process without vLLM."""
from __future__ import annotations

import json
import subprocess
import sys

from benchmarks.kernels import offload_load_bench as bench


def test_host_profile_times_every_phase_of_one_follow_ups_load():
    r = bench.host_profile(blocks=32, reps=2)
    assert set(r["scheduler_us"]) == {"get_num_new_matched_tokens", "update_state_after_alloc",
                                      "build_connector_meta", "build_connector_meta_next_step", "request_finished",
                                      "build_connector_meta_idle", "total"}
    assert all(v > 0 for v in r["scheduler_us"].values())
    for policy in ("keep", "int8"):
        assert set(r["worker_us"][policy]) == {"plan_load", "start_load", "load_step", "load_step_overlapped"}
    assert set(bench.host_profile(blocks=8, reps=1, worker_part=False)) == {"blocks", "layers", "reps", "scheduler_us"}


def test_host_profiles_follow_up_misses_its_question_and_saves_it():
    """As gpu_offload's follow-ups: the context loads, the question's 2 full blocks miss (the report says why)
    and are saved."""
    side, request, blocks, step, ids = bench._scheduler(8)
    r = request("f1")
    matched, _ = side.get_num_new_matched_tokens(r, 0)
    side.update_state_after_alloc(r, blocks(ids), matched)
    meta = side.build_connector_meta(step("f1", 0, ids))
    assert matched == 8 * bench.BLOCK and len(r.block_hashes) == 10
    assert side.reqs["f1"].report["missed_blocks"] == 2 and [len(s.keys) for s in meta.saves] == [2]


def test_device_part_runs_without_vllm_and_loads_the_right_bytes(tmp_path):
    out = tmp_path / "r.json"
    code = ("import sys; sys.modules['vllm'] = None; from benchmarks.kernels.offload_load_bench import main; "
            f"sys.exit(main(['--part', 'device', '--device', 'cpu', '--blocks', '4', '--reps', '1', '--out', {str(out)!r}]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["summary"]["device"] == "cpu" and "offload_load_bench --part device" in data["summary"]["command"]
    runs = data["runs"]
    assert runs["memcpy"]["bytes"] == 2 * bench.LAYERS * 4 * bench.KV_HEADS * bench.BLOCK * bench.HEAD_DIM * 2
    for policy in ("keep", "int8"):
        assert runs[policy]["equal"] is True and runs[policy]["overlap_equal"] is True, policy
        assert runs[policy]["runs_per_layer"] == 1 and runs[policy]["load_ms"] > 0
        # the real path's overlap (inline on CPU) and the serial path beside it write the same bytes
        assert runs[policy]["load_overlap"] is True and runs[policy]["load_overlap_units_per_layer"] == 1
        assert runs[policy]["load_overlap_decodes_per_layer"] == 1
        assert runs[policy]["load_serial_equal"] is True and runs[policy]["load_serial_ms"] > 0, policy
        assert runs[policy]["load_staging_bytes"] == 16 << 20 and runs[policy]["load_overlap_speedup"] > 0
    assert runs["int8"]["stored_bytes"] < runs["keep"]["stored_bytes"] == runs["memcpy"]["bytes"]
