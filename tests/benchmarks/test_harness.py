"""benchmarks/harness.py: what a worker process that died leaves in the parent's error."""

from __future__ import annotations

import sys
import time

import pytest

from benchmarks import harness

CHILD = ("import sys; print('loading', file=sys.stderr); print('noise'); "
         "print('ImportError: libc10.so: undefined symbol: _ZN3c10X', file=sys.stderr); "
         "print('RuntimeError: Engine core initialization failed.', file=sys.stderr); "
         "print('bye', file=sys.stderr); sys.exit(3)")


def test_stderr_tail_names_the_error_of_a_dead_worker(capfd):
    with pytest.raises(SystemExit) as exc:
        harness.run_result_process([sys.executable, "-c", CHILD], {}, "x run failed", stderr_tail=8)
    assert str(exc.value).splitlines() == ["x run failed (exit 3)", "ImportError: libc10.so: undefined symbol: "
                                           "_ZN3c10X", "RuntimeError: Engine core initialization failed."]
    err = capfd.readouterr().err
    assert "loading" in err and "bye" in err and "noise" in err  # the child's output still streams through


def test_without_tail_the_error_is_only_the_exit_code():
    with pytest.raises(SystemExit) as exc:
        harness.run_result_process([sys.executable, "-c", CHILD], {}, "x run failed")
    assert str(exc.value) == "x run failed (exit 3)"


def test_stderr_tail_returns_the_result_of_a_worker_that_succeeded():
    code = "import sys; print('warn', file=sys.stderr); print('RESULT {\"a\": 1}')"
    assert harness.run_result_process([sys.executable, "-c", code], {}, "f", stderr_tail=4) == {"a": 1}


def test_error_lines_prefers_lines_that_name_an_error():
    lines = ["a", "ValueError: x", "    raise RuntimeError(", "b", "OSError: undefined symbol: y", "c"]
    assert harness.error_lines(lines, 1) == ["OSError: undefined symbol: y"]
    assert harness.error_lines(lines, 5) == ["ValueError: x", "OSError: undefined symbol: y"]
    assert harness.error_lines(["a", "b", "c"], 2) == ["b", "c"]  # nothing marked: the last lines
    assert harness.error_lines(lines, 0) == []


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # a zombie has ended
    except FileNotFoundError:
        return True


def test_timeout_ends_the_worker_and_the_processes_it_started():
    # the worker starts a grandchild (as an engine worker starts vLLM's engine core), then hangs
    code = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
            "time.sleep(120)']); print(f'grandchild {p.pid}', file=sys.stderr, flush=True); time.sleep(120)")
    with pytest.raises(SystemExit) as exc:
        harness.run_result_process([sys.executable, "-c", code], {}, "x run failed", timeout=3, stderr_tail=2)
    head, line = str(exc.value).splitlines()
    assert head == "x run failed (timed out after 3 s)"
    pid = int(line.split()[1])
    for _ in range(100):  # SIGKILL is delivered at once; the kernel may take a moment to reap
        if _gone(pid):
            break
        time.sleep(0.1)
    assert _gone(pid), "the grandchild outlived the timeout"
