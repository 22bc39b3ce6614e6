"""benchmarks/harness.py: what a worker process that died leaves in the parent's error."""

from __future__ import annotations

import sys

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
    lines = ["a", "ValueError: x", "b", "OSError: undefined symbol: y", "c"]
    assert harness.error_lines(lines, 1) == ["OSError: undefined symbol: y"]
    assert harness.error_lines(lines, 5) == ["ValueError: x", "OSError: undefined symbol: y"]
    assert harness.error_lines(["a", "b", "c"], 2) == ["b", "c"]  # nothing marked: the last lines
    assert harness.error_lines(lines, 0) == []
