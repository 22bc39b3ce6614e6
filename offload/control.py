"""The control channel from the API server process to the connector's scheduler side (engine core).

vLLM's API server starts the engine core as its child process; the scheduler side listens on a Unix socket
named after its parent's pid, in a directory only this user can enter (0700), and checks each peer's uid
(SO_PEERCRED), so only the same user's processes on this host reach it. Requests and answers are one JSON
object per line: ``{"op": "events" | "inventory" | "report" | "pin" | "unpin" | "delete", ...}`` ->
``{"ok": true, ...}`` or ``{"ok": false, "error": "...", "status": 400}``. The API server side
(serving/cache_api.py) serves it as HTTP: GET /kvplug/cache, /kvplug/cache/events, pins.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import socketserver
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger("vllm.kvplug.offload")

MAX_LINE = 64 << 20  # an answer (a reset of the events feed) may be large


class ControlUnavailable(RuntimeError):
    """No engine answers on the control socket (offload off, engine starting or gone)."""


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    d = Path(base) / f"kvplug-{os.getuid()}"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"kvplug control directory {d} must belong to uid {os.getuid()} with mode 0700")
    return d


def socket_path(api_server_pid: int) -> Path:
    """The control socket of the engine whose API server process is ``api_server_pid``."""
    return runtime_dir() / f"engine-{api_server_pid}.sock"


def _peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        if _peer_uid(self.request) != os.getuid():
            return
        for line in self.rfile:
            try:
                msg = json.loads(line)
                answer = self.server.answer(msg)  # type: ignore[attr-defined]
            except Exception as exc:  # a bad request or a bug must not end the channel
                logger.exception("kvplug control: request failed")
                answer = {"ok": False, "status": 500, "error": f"{type(exc).__name__}: {exc}"}
            self.wfile.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")
            self.wfile.flush()


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    allow_reuse_address = False


class ControlServer:
    """Serves ``answer(request) -> dict`` on the control socket from a daemon thread (the engine core's
    main thread keeps scheduling; ``answer`` takes the scheduler side's lock)."""

    def __init__(self, answer: Callable[[dict], dict], path: Path) -> None:
        self.path = path
        if path.exists():
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(str(path))
                raise RuntimeError(f"kvplug control socket {path} is served by another engine of this API server")
            except (ConnectionRefusedError, FileNotFoundError):
                path.unlink(missing_ok=True)  # left by an engine that died
        old = os.umask(0o177)
        try:
            self._server = _Server(str(path), _Handler)
        finally:
            os.umask(old)
        self._server.answer = answer  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, name="kvplug-control", daemon=True)
        self._thread.start()

    @classmethod
    def for_parent(cls, answer: Callable[[dict], dict]) -> "ControlServer | None":
        """The engine core's server for its API server (the parent process); None when it cannot start."""
        try:
            return cls(answer, socket_path(os.getppid()))
        except (OSError, RuntimeError) as exc:
            logger.warning("kvplug offload: no control channel for the API server (%s); /kvplug/cache will "
                           "answer 503", exc)
            return None

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self.path.unlink(missing_ok=True)


async def call(msg: dict, path: Path | None = None, timeout: float = 10.0) -> dict:
    """Ask this API server's engine (``path``: default, the socket of this process's engine)."""
    path = path or socket_path(os.getpid())
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path), limit=MAX_LINE), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise ControlUnavailable(f"the engine's control socket {path} does not answer ({exc or 'timeout'}): "
                                 "is offload on (kvplug serve --offload) and the engine up?") from None
    try:
        writer.write(json.dumps(msg).encode() + b"\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        raise ControlUnavailable(f"the engine's control socket {path} did not answer ({exc or 'timeout'})") from None
    finally:
        writer.close()
    if not line:
        raise ControlUnavailable(f"the engine closed the control socket {path} without an answer")
    return json.loads(line)


def call_sync(msg: dict, path: Path, timeout: float = 10.0) -> dict:
    """Blocking variant (tests, tools)."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(json.dumps(msg).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(1 << 16)
            if not chunk:
                break
            buf += chunk
    return json.loads(buf)


def answer_error(status: int, message: str) -> dict:
    return {"ok": False, "status": status, "error": message}


Answer = dict[str, Any]
