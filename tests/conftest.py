"""Shared fixtures. Engines are slow to start (~75 s on our CPUs), so one server serves the whole session."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
SERVER_START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    base_url: str
    model: str
    model_path: str
    log_path: Path
    process: subprocess.Popen

    def metrics_text(self) -> str:
        return httpx.get(f"{self.base_url}/metrics", timeout=30).text

    def log_tail(self, n: int = 60) -> str:
        return "".join(self.log_path.read_text(errors="replace").splitlines(True)[-n:])


def start_server(args: list[str], log_path: Path, env: dict[str, str] | None = None) -> Server:
    """Start `kvplug serve ARGS --port P` and wait until /health answers; fail with the log tail if it dies."""
    from kvplug import models

    port = free_port()
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "kvplug.cli", "serve", *args, "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env or dict(os.environ), cwd=REPO)
    server = Server(f"http://127.0.0.1:{port}", models.DEFAULT_MODEL,
                    str(models.model_dir(models.DEFAULT_MODEL)), log_path, proc)
    if not wait_healthy(server.base_url, proc, server.log_tail):
        stop_server(server)
        raise RuntimeError(f"kvplug serve did not become ready in {SERVER_START_TIMEOUT_S}s:\n{server.log_tail()}")
    return server


def wait_healthy(base_url: str, proc: subprocess.Popen, log_tail) -> bool:
    """Until ``base_url``/health answers 200 (True) or SERVER_START_TIMEOUT_S passed (False); RuntimeError
    with ``log_tail()`` if the process exits first."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kvplug serve exited with {proc.returncode}:\n{log_tail()}")
        try:
            if httpx.get(f"{base_url}/health", timeout=5).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(2)
    return False


def stop_server(server: Server) -> None:
    if server.process.poll() is None:
        server.process.terminate()
        try:
            server.process.wait(60)
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def run_tests_in_fresh_interpreter(test_file: Path, env: dict[str, str], timeout: int = 900) -> None:
    """Run ``test_file`` with pytest in a new Python process (e.g. so TRITON_INTERPRET=1 takes effect before
    triton is imported); fail with its output unless it passed."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and " passed" in summary, summary


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The default embedded model, prepared once (downloads and converts on a fresh machine)."""
    from kvplug import models

    return models.prepare(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def kvplug_server(smollm2_path, tmp_path_factory) -> Server:
    """`kvplug serve` with no MODEL (the default), plugin on, every feature off."""
    server = start_server([], tmp_path_factory.mktemp("server") / "kvplug-serve.log")
    yield server
    stop_server(server)
