"""benchmarks/peers/lmcache.py's multi-process mode (lmcache-mp-<version>) and the known_issue of its in-process
modes on vLLM >= 0.26, without a GPU or a real LMCache: mode names, the server command and vLLM's transfer config
for a budget, the server's lifecycle with a fake server script (a real subprocess listening on a real port), and
the rows of both benchmark scripts."""

from __future__ import annotations

import argparse
import os
import socket
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from benchmarks import gpu_offload, harness
from benchmarks import offload_accuracy as oa
from benchmarks.peers import lmcache

MP = "lmcache-mp-0.5.3"

# A stand-in for LMCache's MP server: writes its pid and its child's, logs lines as LMCache 0.5.3's server does
# (its format colours them, also into a file), listens on --port unless told not to, and never exits by itself
# (its child, a sleep in the same session, must go too).
FAKE_SERVER = textwrap.dedent("""
    import os, socket, subprocess, sys, time
    COLOUR = {"INFO": "32;20", "ERROR": "31;20"}
    def log(level, message):
        print(f"\\x1b[{COLOUR[level]}m[2026-12-08 02:57:56,362] LMCache {level}:\\x1b[0m {message} "
              "\\x1b[3m(server.py:433:__main__)\\x1b[0m", flush=True)
    port = int(sys.argv[sys.argv.index("--port") + 1])
    mode = sys.argv[sys.argv.index("--fake") + 1]
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    print(f"PIDS {os.getpid()} {child.pid}", flush=True)
    if mode == "exit":
        log("ERROR", "cannot allocate 16.0 GB of pinned L1 memory")
        sys.exit(3)
    if mode == "listen":
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()
        log("INFO", "LMCache cache server is running...")
        log("INFO", "Registered KV cache for GPU ID 0 with 24 layers")
        log("INFO", "Stored 8192 tokens in 0.100 seconds")
        log("INFO", "Retrieved 4096 tokens in 0.050 seconds")
        log("INFO", "Retrieved 4096 tokens in 0.040 seconds")
    else:
        log("INFO", "still pinning memory")
    while True:
        time.sleep(1)
""")


def _fake_command(tmp_path: Path, behaviour: str):
    script = tmp_path / "fake_server.py"
    script.write_text(FAKE_SERVER)
    seen: list[tuple[float, int]] = []

    def command(cpu_gib: float, port: int) -> list[str]:
        seen.append((cpu_gib, port))
        return [sys.executable, str(script), "--port", str(port), "--fake", behaviour]

    return command, seen


def _pids(log: str) -> list[int]:
    line = next(ln for ln in Path(log).read_text().splitlines() if ln.startswith("PIDS "))
    return [int(x) for x in line.split()[1:]]


def _dead(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # a zombie: a killed grandchild whose new parent has not reaped it yet


def _gone(pid: int) -> bool:
    """No such process, or a zombie; a signal is delivered asynchronously, so give it a moment to act."""
    for _ in range(100):
        if _dead(pid):
            return True
        time.sleep(0.1)
    return False


def _listens(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_mp_mode_names():
    assert lmcache.lmcache_version(MP) == "0.5.3" and lmcache.lmcache_version("lmcache-mp") is None
    assert lmcache.is_mp(MP) and lmcache.is_mp("lmcache-mp") and lmcache.is_lmcache(MP)
    assert not lmcache.is_mp("lmcache-0.5.3") and not lmcache.is_mp("lmcache") and not lmcache.is_mp("native")
    for bad in ("lmcache-mp-", "lmcache-mpx", "lmcache-mp-latest", "lmcache-0.5.3-mp"):
        assert not lmcache.is_lmcache(bad)
    assert lmcache.lmcache_paths(MP, "/stage") == [Path("/stage/lmcache-0.5.3"), Path("/stage/lmcache-deps")]
    gpu_offload.check_mode(MP)
    assert oa.peer_names(oa._parse(["--peers", f"native,{MP}"])) == ["native", MP]


def test_server_command_and_transfer_config_for_a_budget(monkeypatch):
    assert lmcache.mp_server_command(16.0, 5601, python="py") == [
        "py", "-m", "lmcache.v1.multiprocess.server", "--host", "127.0.0.1", "--port", "5601", "--chunk-size", "256",
        "--l1-size-gb", "16.0", "--eviction-policy", "LRU", "--disable-metrics"]
    extra = {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": 5601}
    assert lmcache.lmcache_transfer_config(MP, port=5601) == {
        "kv_connector": "LMCacheMPConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra,
        "kv_connector_module_path": "lmcache.integration.vllm.lmcache_mp_connector"}
    # vLLM's in-tree class (where LMCache's own does not import) needs no module path
    in_tree = lmcache.lmcache_transfer_config(MP, port=5601, connector_module=lmcache.MP_CONNECTOR_MODULES[1])
    assert "kv_connector_module_path" not in in_tree and in_tree["kv_connector_extra_config"] == extra
    # the worker's side: what serve() put in its environment
    monkeypatch.setenv(lmcache.MP_PORT_ENV, "5702")
    monkeypatch.setenv(lmcache.MP_CONNECTOR_MODULE_ENV, lmcache.MP_CONNECTOR_MODULES[1])
    worker = lmcache.lmcache_transfer_config(MP)
    assert worker["kv_connector_extra_config"]["lmcache.mp.port"] == 5702 and "kv_connector_module_path" not in worker
    assert lmcache.lmcache_transfer_config("lmcache-0.5.3") == {"kv_connector": "LMCacheConnectorV1",
                                                                 "kv_role": "kv_both"}


def test_server_starts_listens_serves_the_run_and_is_stopped_with_its_group(tmp_path):
    command, seen = _fake_command(tmp_path, "listen")
    during = {}

    def run(env):
        port = int(env[lmcache.MP_PORT_ENV])
        during.update(port=port, listening=_listens(port), module=env.get(lmcache.MP_CONNECTOR_MODULE_ENV))
        return {"follow_up_p50_s": 0.2}

    r = lmcache.serve(MP, 16.0, dict(os.environ), run, {"mp_connector_module": "lmcache.x"}, command=command,
                      timeout=30)
    assert seen == [(16.0, during["port"])] and during["listening"] and during["module"] == "lmcache.x"
    server = r["lmcache_server"]
    assert r["follow_up_p50_s"] == 0.2 and server["command"][-1] == "listen"
    assert (server["registered"], server["stored_tokens"], server["retrieves"], server["retrieved_tokens"],
            server["errors"]) == (1, 8192, 2, 8192, 0)
    assert all(_gone(pid) for pid in _pids(server["log"])) and not _listens(during["port"])


def test_server_is_stopped_when_the_run_fails(tmp_path):
    command, _ = _fake_command(tmp_path, "listen")
    def run(env):
        raise RuntimeError("the engine died")

    before = set(Path(lmcache.tempfile.gettempdir()).glob(f"{MP}-*"))
    with pytest.raises(RuntimeError, match="the engine died"):
        lmcache.serve(MP, 4.0, dict(os.environ), run, command=command, timeout=30)
    (new,) = set(Path(lmcache.tempfile.gettempdir()).glob(f"{MP}-*")) - before
    assert all(_gone(pid) for pid in _pids(str(new / "server.log")))


@pytest.mark.parametrize("behaviour, why", [("silent", "did not listen on 127.0.0.1:"), ("exit", "exited with 3")])
def test_a_server_that_does_not_listen_is_one_error_line_with_its_log_tail(tmp_path, behaviour, why):
    command, _ = _fake_command(tmp_path, behaviour)

    def run(env):
        raise AssertionError("the engine ran without its server")

    r = lmcache.serve(MP, 16.0, dict(os.environ), run, command=command, timeout=2)
    err = r["error"]
    assert "\n" not in err and err.startswith(f"LMCache server {why}")
    tail = "LMCache ERROR: cannot allocate" if behaviour == "exit" else "LMCache INFO: still pinning memory"
    last = r["lmcache_server"]["log_tail"][-1]
    assert tail in err and tail in last and "\x1b" not in err + last  # the log's colour codes are dropped
    assert all(_gone(pid) for pid in _pids(r["lmcache_server"]["log"]))


def test_in_process_rows_carry_the_known_issue_on_vllm_026(tmp_path, monkeypatch):
    monkeypatch.setattr(lmcache, "installed_vllm_version", lambda: "0.26.0")
    args = argparse.Namespace(cpu_gib=48.0, lmcache_root=str(tmp_path), contexts=10)
    row = gpu_offload.run_mode("lmcache-0.5.3", args, [], {})  # not staged: a could-not-run row, still flagged
    assert "#4463" in row["known_issue"] and "vLLM 0.26.0" in row["known_issue"] and "not found" in row["error"]
    assert "known_issue" not in gpu_offload.run_mode(MP, args, [], {})
    assert lmcache.known_issue("lmcache-0.5.3", "0.25.1") is None and lmcache.known_issue("native", "0.26.0") is None
    assert lmcache.known_issue("lmcache", "0.32.0").startswith("vLLM 0.32.0: LMCache's in-process connector")

    def ok(mode, p50, **kw):
        return {"mode": mode, "follow_up_p50_s": p50, "follow_up_p99_s": p50, "follow_up_cached_fraction": 1.0,
                "first_turn_p50_s": 1.0, **kw}

    issue = lmcache.known_issue("lmcache-0.5.3")
    table = gpu_offload._table([ok("int8", 0.2), ok("lmcache-0.5.3", 0.1, known_issue=issue), ok(MP, 0.4)])
    rows = {ln.split(" | ")[0][2:]: ln for ln in table.splitlines()[2:] if ln.startswith("| ")}
    assert "lmcache-0.5.3 (KNOWN ISSUE)" in rows and rows["int8"].endswith("| 2.00x |")  # vs the MP peer, not it
    assert f"KNOWN ISSUE lmcache-0.5.3: {issue}" in table.splitlines()

    oa_args = oa._parse(["--peers", "lmcache-0.5.3", "--lmcache-root", str(tmp_path), "--turns", "2"])
    peer_row = oa.run_peer("lmcache-0.5.3", oa_args, [], [])
    assert peer_row["known_issue"] == issue
    md = oa.markdown({"model": "m", "device": "d", "date": "t", "runs": [peer_row],
                      "args": {"turns": 2, "tasks": "kv", "contexts": 8192, "cases": 1, "block_size": 16}})
    assert f"KNOWN ISSUE lmcache-0.5.3: {issue}" in md.splitlines()


def test_gpu_offload_mp_mode_runs_its_worker_against_its_server(tmp_path, monkeypatch):
    command, seen = _fake_command(tmp_path, "listen")
    monkeypatch.setattr(lmcache, "mp_server_command", command)
    monkeypatch.setattr(lmcache, "lmcache_preflight", lambda mode, root, env: (
        {"version": "0.5.3", "mp_connector_module": lmcache.MP_CONNECTOR_MODULES[0]}, None))

    def worker(module, mode, argv, env, stderr_tail=0, timeout=None, on_line=None):
        assert on_line is None and _listens(int(env[lmcache.MP_PORT_ENV]))
        return {"mode": mode, "follow_up_p50_s": 0.3, "follow_up_cached_fraction": 1.0, "no_op": False,
                "follow_up_ttft_s": [0.3, 0.3], "follow_up_cached_tokens": [4096, 4096], "context_tokens": 4096,
                "follow_up_loaded_tokens": [4096, 4096], "follow_up_gpu_hit_tokens": [0, 0]}

    monkeypatch.setattr(harness, "run_worker", worker)
    r = gpu_offload.run_mode(MP, argparse.Namespace(cpu_gib=48.0, lmcache_root=str(tmp_path), contexts=2), [], {})
    assert seen[0][0] == 48.0 and r["lmcache"]["version"] == "0.5.3" and "known_issue" not in r
    assert r["lmcache_server"]["retrieved_tokens"] == 8192 and r["follow_up_sources"] == ["load", "load"]
    assert r["no_op_reason"] is None


def _fake_staged(root: Path, version: str, server: str = "", connector: str = "") -> None:
    """A staged-layout fake LMCache with the MP server's and the MP connector's modules."""
    pkg = root / f"lmcache-{version}" / "lmcache"
    for sub in ("", "integration", "integration/vllm", "v1", "v1/multiprocess"):
        (pkg / sub).mkdir(parents=True, exist_ok=True)
        (pkg / sub / "__init__.py").write_text(f"__version__ = {version!r}\n" if not sub else "")
    (root / "lmcache-deps").mkdir(exist_ok=True)
    (pkg / "cuda_ops.py").write_text("")
    (pkg / "v1" / "multiprocess" / "server.py").write_text(server)
    (pkg / "integration" / "vllm" / "lmcache_mp_connector.py").write_text(
        connector or "class LMCacheMPConnector: pass\n")


def test_mp_preflight_finds_lmcaches_own_connector_and_stops_on_a_server_that_does_not_import(tmp_path):
    _fake_staged(tmp_path, "9.8.1")
    env = gpu_offload.mode_env("lmcache-mp-9.8.1", argparse.Namespace(cpu_gib=8.0, lmcache_root=str(tmp_path)),
                               harness.engine_env(clear_config=True))
    probe, failed = lmcache.lmcache_preflight("lmcache-mp-9.8.1", str(tmp_path), env)
    assert failed is None and probe["version"] == "9.8.1"
    assert probe["mp_connector_module"] == "lmcache.integration.vllm.lmcache_mp_connector"
    assert "adapter_error" in probe  # the in-process adapter is not the MP mode's business

    _fake_staged(tmp_path, "9.8.2", server="import sortedcontainers_absent\n")
    env = gpu_offload.mode_env("lmcache-mp-9.8.2", argparse.Namespace(cpu_gib=8.0, lmcache_root=str(tmp_path)),
                               harness.engine_env(clear_config=True))
    _, failed = lmcache.lmcache_preflight("lmcache-mp-9.8.2", str(tmp_path), env)
    assert failed == ("lmcache.v1.multiprocess.server does not import: ModuleNotFoundError: "
                      "No module named 'sortedcontainers_absent'")


def test_offload_accuracy_mp_peer_runs_against_its_server_with_the_cpu_tier_budget(tmp_path, monkeypatch):
    command, seen = _fake_command(tmp_path, "listen")
    monkeypatch.setattr(lmcache, "mp_server_command", command)
    monkeypatch.setattr(lmcache, "lmcache_preflight", lambda mode, root, env: ({"version": "0.5.3"}, None))
    case = SimpleNamespace(id="c0", task="passkey", context="ctx", multi_turns=[
        SimpleNamespace(input=f"q{t}?", answer="42", scorer="substring") for t in range(2)])
    ev = [{"external_hit_tokens": 0, "cached_tokens": 0, "prompt_tokens": 900},
          {"external_hit_tokens": 768, "cached_tokens": 768, "prompt_tokens": 950}]

    def engine(cmd, env, failure, timeout=None, stderr_tail=0, on_line=None):
        assert on_line is None and _listens(int(env[lmcache.MP_PORT_ENV])) and cmd[-1] == MP
        return {"texts": [["42", "42"]], "evidence": ev, "startup_s": 1.0, "seconds": 2.0}

    monkeypatch.setattr(oa.harness, "run_result_process", engine)
    args = oa._parse(["--peers", MP, "--turns", "2", "--cpu-tier", "6GiB", "--lmcache-root", str(tmp_path)])
    row = oa.run_peer(MP, args, [case], [["42", "42"]])
    assert seen[0][0] == 6.0 and row["agreement"] == 1.0 and not row["offload_no_op"]
    assert row["lmcache_server"]["stored_tokens"] == 8192 and "known_issue" not in row
    assert oa.loaded_cell(row) == "768 tokens (vLLM external hits)"
