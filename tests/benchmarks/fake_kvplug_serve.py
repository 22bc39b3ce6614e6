"""A stand-in for ``python -m kvplug.cli serve ... --port P`` with its process tree: the launcher starts an "API
server" in a session of its own (as serving/processes.py does), which starts an "engine core" (a child in its
group, as vLLM's is) and answers GET /health on the port. Each writes its pid to $FAKE_SERVE_PIDS.

$FAKE_SERVE_MODE: ``serve`` (default; on SIGTERM the launcher ends the server's session, then exits),
``abandon`` (the launcher dies at once on SIGTERM, leaving the server behind, as a launcher that was killed
does), ``stubborn`` (the launcher ignores SIGTERM, and so do the processes it starts), ``exit`` (prints an error
and exits 3 before serving), ``silent`` (never serves).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer


def note_pid(role: str) -> None:
    with open(os.environ["FAKE_SERVE_PIDS"], "a") as f:
        f.write(f"{role} {os.getpid()}\n")


class Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def main() -> None:
    mode = os.environ.get("FAKE_SERVE_MODE", "serve")
    if sys.argv[1] == "core":
        note_pid("core")
        time.sleep(600)
    elif sys.argv[1] == "server":
        note_pid("server")
        subprocess.Popen([sys.executable, __file__, "core"])
        HTTPServer(("127.0.0.1", int(sys.argv[2])), Health).serve_forever()
    else:  # serve ARGS --port P
        note_pid("launcher")
        if mode == "exit":
            print("RuntimeError: Engine core initialization failed.", flush=True)
            sys.exit(3)
        if mode == "silent":
            time.sleep(600)
        if mode == "stubborn":
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the server and its core
        port = sys.argv[sys.argv.index("--port") + 1]
        server = subprocess.Popen([sys.executable, __file__, "server", port], start_new_session=True)
        if mode == "serve":
            signal.signal(signal.SIGTERM, lambda *_: os.killpg(server.pid, signal.SIGTERM))
        server.wait()


if __name__ == "__main__":
    main()
