"""Stopping `kvplug serve` (SIGTERM, Ctrl-C) and starting it again right away on the same port.

One test, two engine starts: the first is stopped with SIGTERM, the second, on the same port at once, with a
terminal's Ctrl-C (SIGINT to the launcher's process group). Each stop must be quiet (no traceback, no leak
report), complete (no process of the server's session left, metrics directory gone) and exit 0; the restart
must reuse the first start's compiled model instead of compiling again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO, SERVER_START_TIMEOUT_S, free_port, wait_healthy

pytestmark = pytest.mark.engine

NOISE = ("Traceback", "EngineDeadError", "nanobind", "leaked shared_memory", "leaked semaphore")
COMPILED_AGAIN = "Compiling model again"


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _start(port: int, env: dict[str, str], out: Path, err: Path) -> subprocess.Popen:
    # A session of its own, like a terminal's foreground job: killpg(SIGINT) is the terminal's Ctrl-C.
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "kvplug.cli", "serve", "--port", str(port)], cwd=REPO,
                                env=env, stdout=o, stderr=e, start_new_session=True)
    if not wait_healthy(f"http://127.0.0.1:{port}", proc, lambda: err.read_text()[-3000:]):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"kvplug serve not ready in {SERVER_START_TIMEOUT_S}s:\n{err.read_text()[-3000:]}")
    return proc


def _stop_and_check(proc: subprocess.Popen, stop, out: Path, err: Path, tmp: Path) -> None:
    # A client still connected when the server stops: the server closes it, so the port is left in TIME-WAIT.
    with httpx.Client(base_url=f"http://127.0.0.1:{proc.args[-1]}") as client:
        assert client.post("/v1/completions", json={"model": "smollm2-135m-instruct", "prompt": "Hello",
                                                     "max_tokens": 4}).status_code == 200
        children = [int(pid) for pid in
                    subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()]
        assert len(children) == 1 and os.getsid(children[0]) == children[0], \
            "the launcher runs vLLM's API server in a session of its own"
        server_session = children[0]
        stop(proc)
        try:
            code = proc.wait(120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"kvplug serve did not stop in 120 s:\n{err.read_text()[-3000:]}")
    text = out.read_text(errors="replace") + err.read_text(errors="replace")
    assert code == 0, text[-3000:]
    assert [n for n in NOISE if n in text] == [], text[-5000:]
    assert not _session_alive(proc.pid) and not _session_alive(server_session), "a server process outlived the stop"
    assert list(tmp.glob("kvplug-prom-*")) == [], "the metrics directory outlived the stop"


def test_stop_is_quiet_and_complete_and_a_restart_reuses_port_and_compiled_model(tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = dict(os.environ, TMPDIR=str(tmp))  # the launcher's metrics directory is created under TMPDIR
    port = free_port()

    out1, err1 = tmp_path / "first.out", tmp_path / "first.err"
    first = _start(port, env, out1, err1)
    _stop_and_check(first, lambda p: p.send_signal(signal.SIGTERM), out1, err1, tmp)

    out2, err2 = tmp_path / "second.out", tmp_path / "second.err"
    second = _start(port, env, out2, err2)  # at once, on the same port
    _stop_and_check(second, lambda p: os.killpg(p.pid, signal.SIGINT), out2, err2, tmp)
    second_log = out2.read_text(errors="replace") + err2.read_text(errors="replace")
    assert COMPILED_AGAIN not in second_log, [ln for ln in second_log.splitlines() if COMPILED_AGAIN in ln]
