"""The vLLM server processes `kvplug serve` starts, and how they stop: completely and without noise.

A server is vLLM's API server plus its engine core and worker processes. It runs in a session of its own,
so a terminal's Ctrl-C (SIGINT to the whole foreground process group) reaches only the launcher: were the
engine core and workers to get it as well, they would die under the API server, which then logs
EngineDeadError tracebacks and leaves their shared memory behind. The launcher asks the API server alone to
stop (SIGTERM, vLLM's own orderly shutdown of the engine and its workers), kills whatever is left of its
session after that, and the child dies with the launcher if the launcher is killed.
"""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO, Callable

# What triton's bindings (nanobind) print at interpreter exit of every process that imported triton, vanilla
# vLLM's too: a report of objects the bindings still hold then, not a leak a user can act on.
NANOBIND_REPORT_LINES = (b"nanobind: leaked ", b" - leaked ", b" - ... skipped remainder",
                         b"nanobind: this is likely caused by")
NANOBIND_REPORT_LAST = b"See https://nanobind.readthedocs.io/en/latest/refleaks.html"


def die_with_parent() -> None:
    """In a child before exec (Linux): SIGTERM when the parent dies, so a killed launcher leaves no server."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def without_nanobind_report(line: bytes) -> bytes:
    """``line`` less the nanobind report's lines. The report's last line has no newline of its own, so the
    next writer's output (often Python's resource-tracker warning) continues it: that part is kept."""
    if line.startswith(NANOBIND_REPORT_LAST):
        return line[len(NANOBIND_REPORT_LAST):]
    if line.startswith(NANOBIND_REPORT_LINES):
        return b""
    return line


class ShutdownRaceFilter:
    """Drops one traceback vLLM 0.32 logs on every orderly stop that takes a moment: ``AsyncLLM.shutdown()`` stops
    the engine core before it cancels the output handler, so the handler, still waiting for outputs, reports
    the stopped engine as ``EngineDeadError`` ("AsyncLLM output_handler failed."). Only after the launcher asked
    the server to stop; the same message at any other time is a real failure and passes."""

    MARK = b"AsyncLLM output_handler failed."

    def __init__(self) -> None:
        self.stopping = False
        self._tag: bytes | None = None  # the "[async_llm.py:NNN]" location every line of that record carries

    def __call__(self, line: bytes) -> bytes:
        if not self.stopping:
            return line
        if self.MARK in line:
            start = line.rfind(b"[", 0, line.find(self.MARK))
            self._tag = line[start:line.find(b"]", start) + 1] if start >= 0 else None
            return b""
        if self._tag is not None and self._tag in line and b" ERROR " in line:
            return b""
        self._tag = None
        return line


def copy_filtered(src: IO[bytes], dst: IO[bytes], keep: Callable[[bytes], bytes]) -> threading.Thread:
    """A daemon thread copying ``src`` to ``dst`` line by line through ``keep`` until ``src`` closes."""
    def pump() -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in iter(src.readline, b""):
                if out := keep(line):
                    dst.write(out)
                    dst.flush()

    thread = threading.Thread(target=pump, name="kvplug-stderr", daemon=True)
    thread.start()
    return thread


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def end_session(pgid: int, grace_s: float) -> None:
    """SIGTERM, then after ``grace_s`` SIGKILL, whatever is left of process group ``pgid``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not _session_alive(pgid):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline and _session_alive(pgid):
            time.sleep(0.1)


class ServerProcess:
    """vLLM's API server in a session of its own; stderr through the launcher, less nanobind's report."""

    def __init__(self, command: list[str], env: dict[str, str], stop_grace_s: float = 30.0,
                 stdout_sink: IO[bytes] | None = None) -> None:
        self.stop_grace_s = stop_grace_s
        self.proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     start_new_session=True, preexec_fn=die_with_parent)
        self._shutdown_race = ShutdownRaceFilter()  # vLLM logs to stdout
        self._stdout = copy_filtered(self.proc.stdout, stdout_sink or sys.stdout.buffer, self._shutdown_race)
        self._stderr = copy_filtered(self.proc.stderr, sys.stderr.buffer, without_nanobind_report)
        self._stops = 0

    def request_stop(self) -> None:
        """First call: SIGTERM to the API server (it stops its engine and workers). Later calls: kill all."""
        self._stops += 1
        if self.proc.poll() is not None:
            return
        if self._stops == 1:
            self._shutdown_race.stopping = True
            print("kvplug serve: stopping (Ctrl-C again to kill it at once)", file=sys.stderr, flush=True)
            self.proc.send_signal(signal.SIGTERM)
        else:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self) -> int:
        """Until the API server exits; then ends what is left of its session and drains its stderr."""
        try:
            while True:
                try:
                    code = self.proc.wait()
                    break
                except KeyboardInterrupt:  # a signal handler that raised; stop and keep waiting
                    self.request_stop()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            end_session(self.proc.pid, self.stop_grace_s)
            self._stdout.join(timeout=10)
            self._stderr.join(timeout=10)
        return code
