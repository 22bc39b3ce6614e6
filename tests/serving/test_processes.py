"""How `kvplug serve` runs and stops vLLM's server process tree (serving/processes.py), on a stand-in server."""
from __future__ import annotations

import os
import sys
import textwrap
import time

from serving import processes

NANOBIND_REPORT = (b"nanobind: leaked 4 instances!\n - leaked instance 0x1 of type \"x\"\n"
                   b"nanobind: leaked 514 functions!\n - leaked function \"dump\"\n - ... skipped remainder\n"
                   b"nanobind: this is likely caused by a reference counting issue in the binding code.\n"
                   b"See https://nanobind.readthedocs.io/en/latest/refleaks.htmlreal warning\n")

# A stand-in API server: a child of its own (the "engine") in the same session, which it stops on SIGTERM,
# then the nanobind report on stderr as triton prints it at exit, then exit 0.
STAND_IN = textwrap.dedent("""
    import signal, subprocess, sys, time
    engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    def stop(*_):
        engine.terminate(); engine.wait()
        sys.stderr.buffer.write(REPORT); sys.stderr.flush()
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print(engine.pid, flush=True)
    time.sleep(300)
""").replace("REPORT", repr(NANOBIND_REPORT))


def test_the_nanobind_report_is_dropped_and_what_follows_it_kept():
    lines = NANOBIND_REPORT.splitlines(keepends=True)
    assert b"".join(processes.without_nanobind_report(line) for line in lines) == b"real warning\n"
    assert processes.without_nanobind_report(b"INFO a line about nanobind: leaked\n") == \
        b"INFO a line about nanobind: leaked\n"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


class _Pipe:
    """Where the launcher copies the stand-in's stdout, so a test can read it."""

    def __init__(self) -> None:
        r, w = os.pipe()
        self.source, self.sink = os.fdopen(r, "rb"), os.fdopen(w, "wb")


def _stdout_pipe() -> _Pipe:
    return _Pipe()


def test_a_stop_is_orderly_complete_and_quiet(capfd):
    out = _stdout_pipe()
    server = processes.ServerProcess([sys.executable, "-c", STAND_IN], dict(os.environ), stop_grace_s=5,
                                     stdout_sink=out.sink)
    engine_pid = int(out.source.readline())  # the stand-in's stdout, as the launcher copies it
    assert os.getsid(server.proc.pid) == server.proc.pid != os.getsid(0), "the server has a session of its own"
    server.request_stop()
    assert server.wait() == 0
    assert not _alive(engine_pid)
    err = capfd.readouterr().err
    assert "nanobind" not in err and "real warning" in err
    assert "kvplug serve: stopping" in err


def test_what_the_server_leaves_behind_is_ended():
    """A server that exits without stopping its children: the launcher ends the rest of its session."""
    out = _stdout_pipe()
    leaver = ("import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']);"
              " print(p.pid, flush=True)")
    server = processes.ServerProcess([sys.executable, "-c", leaver], dict(os.environ), stop_grace_s=5,
                                     stdout_sink=out.sink)
    orphan = int(out.source.readline())
    t0 = time.monotonic()
    assert server.wait() == 0
    assert not _alive(orphan) and time.monotonic() - t0 < 30


def test_a_second_stop_kills_at_once():
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); time.sleep(300)"
    out = _stdout_pipe()
    server = processes.ServerProcess([sys.executable, "-c", stubborn], dict(os.environ), stop_grace_s=5,
                                     stdout_sink=out.sink)
    assert out.source.readline() == b"up\n"
    server.request_stop()
    time.sleep(0.5)
    assert server.proc.poll() is None  # SIGTERM ignored
    server.request_stop()
    assert server.wait() == -9


def test_vllm_shutdown_race_traceback_is_dropped_only_during_a_requested_stop():
    from serving.processes import ShutdownRaceFilter

    record = [b"(APIServer pid=1) ERROR 12-06 20:44:52 [async_llm.py:906] AsyncLLM output_handler failed.\n",
              b"(APIServer pid=1) ERROR 12-06 20:44:52 [async_llm.py:906] Traceback (most recent call last):\n",
              b"(APIServer pid=1) ERROR 12-06 20:44:52 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError\n"]
    after = b"(APIServer pid=1) INFO 12-06 20:44:52 [launcher.py:279] [shutdown] API server: engine client stopped\n"
    other = b"(APIServer pid=1) ERROR 12-06 20:44:53 [serving.py:12] something else failed\n"
    keep = ShutdownRaceFilter()
    assert [keep(line) for line in record] == record  # while serving it is a real failure: shown
    keep.stopping = True
    assert [keep(line) for line in [*record, after, other]] == [b"", b"", b"", after, other]
