"""The LMCache peer (and vLLM's native offloading beside it) for the offload benchmarks: the library both
benchmarks/gpu_offload.py (its lmcache modes) and benchmarks/offload_accuracy.py (its --peers) use.

Mode names (``lmcache``: whatever ``import lmcache`` finds; ``lmcache-<version>``: a copy staged under
--lmcache-root by benchmarks/gpu/stage-lmcache.sh's receive.sh), LMCache's configuration as environment variables
and vLLM's transfer config for it, the probe of its import and compiled ops (run in its own process before an
engine: ``lmcache_preflight``), and the evidence of what it did: its own INFO log lines counted per phase
(``LMCacheLog``, fed the engine process's stderr, with the phase and follow-up marks the worker prints) and
why a run got nothing from it (``no_op_reason``).

``lmcache-mp`` / ``lmcache-mp-<version>``: LMCache's multi-process mode instead of its in-process connector. A
standalone LMCache server (``python -m lmcache.v1.multiprocess.server``: ZMQ on 127.0.0.1, its L1 CPU tier sized
to the run's budget, LRU eviction) runs beside the engine for the mode (``serve``: started in its own session,
waited for until it listens, stopped with its whole process group, also on errors), and vLLM connects with
``LMCacheMPConnector``. Why: on vLLM >= 0.26 the packed KV layout ``[blocks, block_size, heads, 2*head_size]``
(vLLM PR #44455) makes the in-process connector copy only the K half with a wrong slot stride (LMCache #4463,
fix PR #4467 open); the MP connector is not affected for non-hybrid models. The in-process modes' rows then
carry ``known_issue`` so nobody reads their numbers as the peer's. The MP mode's load evidence is vLLM's
``vllm:external_prefix_cache_hits`` (tokens the connector supplied) and the server's own log (``server_log_counts``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks import harness

LMCACHE = "lmcache"  # the peer's modes: "lmcache" (as importable) or "lmcache-<version>" (a staged copy)
LMCACHE_MP = "lmcache-mp"  # ... and in LMCache's multi-process mode: "lmcache-mp" or "lmcache-mp-<version>"
LMCACHE_ROOT = "/tmp/kvstage"  # where benchmarks/gpu/stage-lmcache.sh's receive.sh installs LMCache
LMCACHE_CHUNK_TOKENS = 256
LMCACHE_OPS_MODULES = ("lmcache.cuda_ops", "lmcache.c_ops")  # >= 0.5.4 / <= 0.5.3
# The probe's process: gpu_offload's CLI runs lmcache_probe() and prints its result (--probe-lmcache).
PROBE_COMMAND = ("-m", "benchmarks.gpu_offload", "--probe-lmcache")
PROBE_TIMEOUT_S = 300
PROBE_STDERR_TAIL = 8  # error lines of a probe that died, kept in its reason
_MODE = re.compile(r"lmcache(?P<mp>-mp)?(?:-(?P<version>\d+(?:\.\d+)*(?:\.post\d+)?))?")

# LMCache's multi-process mode (0.5.3: lmcache/v1/multiprocess/server.py; its flags in
# lmcache/v1/multiprocess/config.py and lmcache/v1/distributed/config.py, --l1-size-gb in GiB: * (1 << 30)).
MP_SERVER_MODULE = "lmcache.v1.multiprocess.server"  # ZMQ only (`lmcache server` adds an HTTP frontend on :8080)
MP_HOST = "127.0.0.1"
EXTERNAL_HITS = "vllm:external_prefix_cache_hits"  # prompt tokens a connector supplied (vLLM's metrics)
MP_CONNECTOR = "LMCacheMPConnector"
# Where vLLM finds the connector class, first that imports: LMCache's own (the same version as its server,
# through kv_connector_module_path; LMCache PR #3235), else vLLM's in-tree one (its registry's default).
MP_CONNECTOR_MODULES = ("lmcache.integration.vllm.lmcache_mp_connector",
                        "vllm.distributed.kv_transfer.kv_connector.v1.lmcache_mp_connector")
MP_PORT_ENV = "KVBENCH_LMCACHE_MP_PORT"  # the engine's worker reads the server's port and connector from these
MP_CONNECTOR_MODULE_ENV = "KVBENCH_LMCACHE_MP_CONNECTOR_MODULE"
MP_START_TIMEOUT_S = 180.0  # import, pinned L1 allocation and CUDA init before it binds
MP_STOP_TIMEOUT_S = 15.0
MP_LOG_TAIL = 8  # server log lines kept in a row (and in the error of a server that did not listen)
# LMCache's log format colours every line, also into a file: "\x1b[32;20m[time] LMCache INFO:\x1b[0m ..."
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# vLLM >= 0.26's packed KV layout breaks the in-process connector (LMCache #4463; fix PR #4467 still open).
INPROCESS_BROKEN_FROM_VLLM = (0, 26)
INPROCESS_KNOWN_ISSUE = ("vLLM {vllm}: LMCache's in-process connector is known to corrupt KV on its packed layout "
                         "(LMCache #4463, fix PR #4467 open): not a peer's numbers; lmcache-mp-<version> is the peer")


def _mode_match(mode: str) -> re.Match:
    m = _MODE.fullmatch(mode)
    if not m:
        raise ValueError(f"not an LMCache mode: {mode!r} (lmcache[-mp] or lmcache[-mp]-<version>, e.g. "
                         "lmcache-0.5.6, lmcache-mp-0.5.3)")
    return m


def lmcache_version(mode: str) -> str | None:
    """The staged LMCache version a mode names ("lmcache-0.5.3", "lmcache-mp-0.5.3" -> "0.5.3"; "lmcache",
    "lmcache-mp" -> None: as importable). ValueError for anything else."""
    return _mode_match(mode).group("version")


def is_lmcache(mode: str) -> bool:
    """An LMCache mode, in-process or multi-process."""
    try:
        lmcache_version(mode)
    except ValueError:
        return False
    return True


def is_mp(mode: str) -> bool:
    """An LMCache mode in multi-process mode (its own server; vLLM's LMCacheMPConnector)."""
    return is_lmcache(mode) and _mode_match(mode).group("mp") is not None


def lmcache_paths(mode: str, root: str | Path = LMCACHE_ROOT) -> list[Path]:
    """Folders an LMCache mode puts first on the worker's PYTHONPATH (none for plain "lmcache")."""
    version = lmcache_version(mode)
    return [] if version is None else [Path(root) / f"lmcache-{version}", Path(root) / "lmcache-deps"]


def lmcache_env(cpu_gib: float, base: dict[str, str] | None = None) -> dict[str, str]:
    """LMCache's configuration as its LMCACHE_* variables (read by its LMCacheEngineConfig.from_env): the local
    CPU backend holding ``cpu_gib`` GiB (LMCache sizes it as GiB: max_local_cpu_size * 1024**3), 256-token
    chunks, no disk or remote tier, no usage telemetry (the GPU host has no network). Inherited LMCACHE_*
    variables and LMCACHE_CONFIG_FILE are dropped from ``base``: this mode's configuration is exactly this."""
    env = {k: v for k, v in (base or {}).items() if not k.startswith("LMCACHE_")}
    env.update(LMCACHE_CHUNK_SIZE=str(LMCACHE_CHUNK_TOKENS), LMCACHE_LOCAL_CPU="True",
               LMCACHE_MAX_LOCAL_CPU_SIZE=str(float(cpu_gib)), LMCACHE_MAX_LOCAL_DISK_SIZE="0",
               LMCACHE_USE_LAYERWISE="False", LMCACHE_SAVE_DECODE_CACHE="False",
               LMCACHE_TRACK_USAGE="false", DO_NOT_TRACK="1",
               LMCACHE_LOG_LEVEL="INFO")  # its per-request lookup/store/retrieve lines are the evidence (LMCacheLog)
    return env


def lmcache_transfer_config(mode: str = LMCACHE, port: int | None = None, connector_module: str | None = None) -> dict:
    """vLLM's KVTransferConfig fields for an LMCache mode: in-process, LMCacheConnectorV1 (it loads lmcache's own
    vllm_v1_adapter); multi-process, LMCacheMPConnector to the mode's server on MP_HOST:``port`` from
    ``connector_module`` (both default to what ``serve`` put in the worker's environment)."""
    if not is_mp(mode):
        return {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}
    port = int(os.environ[MP_PORT_ENV]) if port is None else port
    module = connector_module or os.environ.get(MP_CONNECTOR_MODULE_ENV) or MP_CONNECTOR_MODULES[0]
    cfg = {"kv_connector": MP_CONNECTOR, "kv_role": "kv_both",
           "kv_connector_extra_config": {"lmcache.mp.host": f"tcp://{MP_HOST}", "lmcache.mp.port": port}}
    if not module.startswith("vllm."):  # vLLM's own registry names its in-tree class; LMCache's needs the path
        cfg["kv_connector_module_path"] = module
    return cfg


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", version)[:3])


def installed_vllm_version() -> str | None:
    """vLLM's version as installed, without importing it: its distribution's metadata, else its _version.py (a
    staged copy on PYTHONPATH); None where there is no vLLM."""
    import importlib.metadata as md
    import importlib.util

    for dist in md.packages_distributions().get("vllm", []) or ["vllm"]:
        with contextlib.suppress(md.PackageNotFoundError):
            return md.version(dist)
    with contextlib.suppress(Exception):
        spec = importlib.util.find_spec("vllm")
        text = (Path(spec.origin).parent / "_version.py").read_text()
        return re.search(r"__version__\s*=\s*(?:version\s*=\s*)?['\"]([^'\"]+)", text).group(1)
    return None


def known_issue(mode: str, vllm_version: str | None = None) -> str | None:
    """One line where a mode's numbers are known to be wrong: the in-process LMCache modes on vLLM >= 0.26
    (``vllm_version``: the installed one where not given). None otherwise, or where vLLM's version is unknown."""
    if not is_lmcache(mode) or is_mp(mode):
        return None
    vllm = vllm_version or installed_vllm_version()
    if vllm is None or _version_tuple(vllm) < INPROCESS_BROKEN_FROM_VLLM:
        return None
    return INPROCESS_KNOWN_ISSUE.format(vllm=vllm)


# What LMCache (0.5.x; vllm_v1_adapter.py and v1/cache_engine.py) logs at INFO per request: the scheduler's
# lookup, the worker's store and retrieve. Counting these lines is the evidence of what LMCache did.
LMCACHE_LOG = {
    "lookup": re.compile(r"LMCache hit tokens: (\d+), (?:but )?need to load: (-?\d+)"),
    "stored": re.compile(r"Stored (\d+) out of total (\d+) tokens"),
    "retrieved": re.compile(r"Retrieved (\d+) out of (\d+) (?:required|out of total)"),
    "memory_pressure": re.compile(r"Local cpu memory (?:is )?under pressure"),
    "load_failed": re.compile(r"failed to load \d+ tokens|retrieved tokens is less than the expected"),
    "error": re.compile(r"LMCache ERROR"),
}
# The worker marks where its phases start on stderr; LMCache's lines after a mark count for that phase.
PHASE_MARK = "[gpu_offload] phase: "
PHASES = ("startup", "turn1", "follow_ups")
# ... and where each follow-up starts (LMCache's retrieved tokens per follow-up: what its connector loaded).
FOLLOW_UP_MARK = "[gpu_offload] follow-up: "


class LMCacheLog:
    """Counts LMCache's log lines per phase of a worker (fed its stderr line by line): lookups and the tokens
    they hit, stores and stored tokens, retrieves and retrieved tokens, memory-pressure warnings, load failures
    and errors."""

    def __init__(self) -> None:
        self.phase = PHASES[0]
        self.counts = {p: self._zero() for p in PHASES}
        self.follow_up_retrieved: list[int] = []  # tokens LMCache retrieved during each follow-up, in order

    @staticmethod
    def _zero() -> dict:
        return {"lookups": 0, "lookup_hit_tokens": 0, "lookups_with_hit": 0, "stores": 0, "stored_tokens": 0,
                "retrieves": 0, "retrieved_tokens": 0, "memory_pressure": 0, "load_failed": 0, "errors": 0}

    def feed(self, line: str) -> None:
        if FOLLOW_UP_MARK in line:
            self.follow_up_retrieved.append(0)
            return
        if PHASE_MARK in line:
            phase = line.split(PHASE_MARK, 1)[1].strip()
            if phase in self.counts:
                self.phase = phase
            return
        c = self.counts[self.phase]
        if m := LMCACHE_LOG["lookup"].search(line):
            c["lookups"] += 1
            c["lookup_hit_tokens"] += int(m.group(1))
            c["lookups_with_hit"] += int(m.group(1)) > 0
        elif m := LMCACHE_LOG["stored"].search(line):
            c["stores"] += 1
            c["stored_tokens"] += int(m.group(1))
        elif m := LMCACHE_LOG["retrieved"].search(line):
            c["retrieves"] += 1
            c["retrieved_tokens"] += int(m.group(1))
            if self.phase == "follow_ups" and self.follow_up_retrieved:
                self.follow_up_retrieved[-1] += int(m.group(1))
        elif LMCACHE_LOG["memory_pressure"].search(line):
            c["memory_pressure"] += 1
        elif LMCACHE_LOG["load_failed"].search(line):
            c["load_failed"] += 1
        if LMCACHE_LOG["error"].search(line):
            c["errors"] += 1


def no_op_reason(r: dict, contexts: int) -> str | None:
    """Why an offload mode's follow-ups got (almost) nothing from a cache, from its own evidence (None where
    they did): a CPU budget that holds fewer contexts than the round-robin visits is recomputation by design;
    for LMCache its log says whether it was consulted, stored, hit and loaded."""
    if not r.get("no_op"):
        return None
    held = r.get("contexts_held")
    evicted = (f"its CPU budget holds {held} of the {contexts} contexts, so round-robin (LRU) evicts every "
               f"context before its follow-up: recomputation by design (--contexts {held} or fewer compares loads)"
               if isinstance(held, int) and held < contexts else None)
    log, server = r.get("lmcache_log"), r.get("lmcache_server")
    if log is None and server is not None and "stored_tokens" in server:  # an MP mode: its server's own log
        if not server["registered"]:
            return "no engine registered its KV cache with LMCache's server: the MP connector never connected"
        if evicted:
            return evicted
        return (f"LMCache's server stored {server['stored_tokens']} and retrieved {server['retrieved_tokens']} "
                f"tokens ({server['errors']} errors), but the follow-ups got few connector tokens")
    if log is None:
        return evicted or "no follow-up got cached tokens and the connector loaded no block"
    t1, fu = log["turn1"], log["follow_ups"]
    if not (t1["lookups"] or t1["stores"] or fu["lookups"]):
        return ("LMCache logged no lookup and no store: the connector was not consulted "
                "(or its log level hides INFO: LMCACHE_LOG_LEVEL)")
    if not t1["stored_tokens"]:
        why = f"; {t1['memory_pressure']} memory-pressure warnings" if t1["memory_pressure"] else ""
        return f"LMCache stored nothing in turn 1 ({t1['lookups']} lookups, {t1['errors']} errors{why})"
    if not fu["lookup_hit_tokens"]:
        head = (f"LMCache stored {t1['stored_tokens']} tokens in turn 1, but its {fu['lookups']} follow-up "
                f"lookups hit 0 tokens")
        return f"{head}: {evicted}" if evicted else head + " (keys differ between store and lookup?)"
    if not fu["retrieved_tokens"]:
        return (f"LMCache's follow-up lookups hit {fu['lookup_hit_tokens']} tokens but it retrieved none "
                f"({fu['load_failed']} load failures, {fu['errors']} errors): its load path did not run")
    return (f"LMCache retrieved {fu['retrieved_tokens']} tokens in the follow-ups, but vLLM counted few cached "
            f"tokens")


# What LMCache's MP server (0.5.3: v1/multiprocess/modules/lmcache_driven_transfer.py) logs at INFO: per count,
# its pattern and the count its first group's tokens add to.
MP_SERVER_LOG = {
    "registered": (re.compile(r"Registered KV cache for GPU ID"), None),
    "stores": (re.compile(r"Stored (\d+) tokens in"), "stored_tokens"),
    "retrieves": (re.compile(r"Retrieved (\d+) tokens in"), "retrieved_tokens"),
    "errors": (re.compile(r"LMCache ERROR|Traceback"), None),
}


def server_log_counts(text: str) -> dict:
    """What LMCache's MP server logged: engines that registered their KV cache, stores and stored tokens,
    retrieves and retrieved tokens, errors."""
    c = {"registered": 0, "stores": 0, "stored_tokens": 0, "retrieves": 0, "retrieved_tokens": 0, "errors": 0}
    for line in text.splitlines():
        for count, (pattern, tokens) in MP_SERVER_LOG.items():
            if m := pattern.search(line):
                c[count] += 1
                if tokens:
                    c[tokens] += int(m.group(1))
    return c


def mp_server_command(cpu_gib: float, port: int, python: str = sys.executable) -> list[str]:
    """LMCache's MP server for a run's CPU budget: its L1 (pinned CPU memory, GiB) is the budget, LRU eviction,
    the in-process modes' 256-token chunks, no metrics exporter (it would bind :9090 and import
    opentelemetry-exporter-prometheus, which the GPU host lacks: the server dies at start without the flag)."""
    return [python, "-m", MP_SERVER_MODULE, "--host", MP_HOST, "--port", str(port),
            "--chunk-size", str(LMCACHE_CHUNK_TOKENS), "--l1-size-gb", str(float(cpu_gib)),
            "--eviction-policy", "LRU", "--disable-metrics"]


def _log_tail(path: Path, lines: int = MP_LOG_TAIL) -> list[str]:
    """The last ``lines`` non-empty lines of a server log, without LMCache's colour codes (they would land in
    the row's JSON and in a ServerError's one line)."""
    try:
        text = _ANSI_ESCAPE.sub("", path.read_text(errors="replace"))
    except OSError:
        return []
    return [ln.strip() for ln in text.splitlines() if ln.strip()][-lines:]


def _listens(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((MP_HOST, port)) == 0


class ServerError(RuntimeError):
    """An MP server that did not come up; its message is one line with the server log's tail."""


@contextlib.contextmanager
def running_server(command: list[str], port: int, env: dict[str, str], log_path: Path,
                   timeout: float = MP_START_TIMEOUT_S):
    """``command`` (a server that will listen on MP_HOST:``port``) in its own session, its output in
    ``log_path``; yields its process once the port accepts connections, and stops its process group on leaving
    (errors included). ServerError, in one line with its log's tail, where it exits or does not listen within
    ``timeout`` seconds."""
    proc = harness.start_session(command, log_path, env)
    try:
        deadline = time.monotonic() + timeout
        while not _listens(port):
            if proc.poll() is not None:
                why = f"exited with {proc.returncode}"
                break
            if time.monotonic() > deadline:
                why = f"did not listen on {MP_HOST}:{port} within {timeout:g} s"
                break
            time.sleep(0.2)
        else:
            why = None
        if why:
            raise ServerError(f"LMCache server {why} (log {log_path}): " + " / ".join(_log_tail(log_path)))
        yield proc
    finally:  # SIGTERM to its group (LMCache's server shuts down on it), then SIGKILL to what is left
        harness.stop_process_tree(proc, MP_STOP_TIMEOUT_S)


def serve(mode: str, cpu_gib: float, env: dict[str, str], run: Callable[[dict[str, str]], dict],
          probe: dict | None = None, command: Callable[[float, int], list[str]] | None = None,
          timeout: float | None = None) -> dict:
    """``run(env)``'s result; for an MP mode with its LMCache server up for the duration (``cpu_gib`` GiB of L1,
    in ``env``: the staged LMCache first on its path), the worker's ``env`` telling its port and connector module
    (from ``probe``), and ``lmcache_server`` in the result (its command, log, what it logged). A server that does
    not come up is ``{"error": one line}``."""
    if not is_mp(mode):
        return run(env)
    port = harness.free_port()
    log_path = Path(tempfile.mkdtemp(prefix=f"{mode}-")) / "server.log"
    cmd = (command or mp_server_command)(cpu_gib, port)
    worker_env = {**env, MP_PORT_ENV: str(port)}
    if probe and probe.get("mp_connector_module"):
        worker_env[MP_CONNECTOR_MODULE_ENV] = probe["mp_connector_module"]
    record: dict = {"command": cmd, "log": str(log_path)}
    try:
        with running_server(cmd, port, env, log_path, MP_START_TIMEOUT_S if timeout is None else timeout):
            print(f"[lmcache] {mode}: server listening on {MP_HOST}:{port} (log {log_path})", file=sys.stderr,
                  flush=True)
            r = run(worker_env)
    except ServerError as exc:
        r = {"error": str(exc)}
    with contextlib.suppress(OSError):
        record.update(server_log_counts(log_path.read_text(errors="replace")))
    record["log_tail"] = _log_tail(log_path)
    return {**r, "lmcache_server": record}


def external_hit_tokens(llm) -> int | None:
    """vLLM's count of prompt tokens a KV connector supplied (``vllm:external_prefix_cache_hits``; the engine
    needs disable_log_stats=False), None where this vLLM's metrics do not have it."""
    try:
        metrics = llm.get_metrics()
    except Exception:  # noqa: BLE001 - no metrics API / stats off: the caller records its absence
        return None
    hits = [m.value for m in metrics if m.name == EXTERNAL_HITS and isinstance(getattr(m, "value", None), int)]
    return sum(hits) if hits else None


def mark_phase(phase: str) -> None:
    """In the worker: where a phase starts, on stderr (where the engine's own log lines go; LMCacheLog)."""
    print(PHASE_MARK + phase, file=sys.stderr, flush=True)


def mode_env(mode: str, args: argparse.Namespace, base: dict[str, str]) -> dict[str, str]:
    """A peer's engine environment: ``base`` on ``args.model_runner``'s vLLM runner (where not "default"), plus
    LMCache's configuration (``args.cpu_gib`` GiB) and staged folders (under ``args.lmcache_root``) for an
    LMCache mode; native offloading needs nothing more. gpu_offload's kvplug modes add their config to this."""
    env = dict(base)
    runner = getattr(args, "model_runner", "default")
    if runner != "default":  # every mode of the run on the same runner (like-for-like)
        env["VLLM_USE_V2_MODEL_RUNNER"] = "1" if runner == "v2" else "0"
    if is_lmcache(mode):
        env = lmcache_env(args.cpu_gib, env)
        paths = [str(p) for p in lmcache_paths(mode, args.lmcache_root)]
        if paths:
            env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def lmcache_missing(mode: str, root: str | Path) -> str | None:
    """Why a staged LMCache mode cannot run here (its folder is absent), else None."""
    for path in lmcache_paths(mode, root)[:1]:
        if not path.is_dir():
            return (f"{path} not found: stage LMCache first (benchmarks/gpu/stage-lmcache.sh, then "
                    f"bash .gpu-stage-lmcache/p0/receive.sh on this machine)")
    return None


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def lmcache_probe() -> dict:
    """In the worker, before the engine: which LMCache is imported, whether its compiled ops load (the exact
    error where not: LMCache >= 0.5.4 then falls back to torch ops; <= 0.5.3 cannot save or load at all),
    whether vLLM's connector can import its adapter, and the configuration LMCache reads from the environment."""
    import importlib
    import importlib.util

    probe: dict = {}
    with contextlib.suppress(Exception):  # the torch the compiled ops must match
        probe["torch"] = importlib.import_module("torch").__version__
    try:
        lmcache = importlib.import_module("lmcache")
    except BaseException as exc:  # noqa: BLE001 - anything that stops the import is the answer
        probe["import_error"] = _error_text(exc)
        return probe
    probe["version"] = getattr(lmcache, "__version__", "unknown")
    probe["path"] = str(Path(lmcache.__file__).parent)
    for name in LMCACHE_OPS_MODULES:
        # lmcache's own import may already have loaded (or stubbed) the ops module; find_spec then raises
        # ValueError on a module whose __spec__ is None.
        if name not in sys.modules and importlib.util.find_spec(name) is None:
            continue
        probe["ops_module"] = name
        try:
            importlib.import_module(name)
            probe["ops_loaded"] = True
        except BaseException as exc:  # noqa: BLE001
            probe["ops_loaded"] = False
            probe["ops_error"] = _error_text(exc)
        break
    else:
        probe["ops_loaded"] = False
        probe["ops_error"] = f"none of {', '.join(LMCACHE_OPS_MODULES)} in {probe['path']}"
    mp_errors = []  # the MP mode's connector: the first of MP_CONNECTOR_MODULES that imports (with vLLM)
    for name in MP_CONNECTOR_MODULES:
        try:
            importlib.import_module(name)
            probe["mp_connector_module"] = name
            break
        except BaseException as exc:  # noqa: BLE001
            mp_errors.append(f"{name}: {_error_text(exc)}")
    if mp_errors:
        probe["mp_connector_errors"] = mp_errors
    try:  # the MP server's own imports (its main is guarded): a dependency it lacks shows here, not in its log
        importlib.import_module(MP_SERVER_MODULE)
    except BaseException as exc:  # noqa: BLE001
        probe["mp_server_error"] = _error_text(exc)
    try:
        importlib.import_module("lmcache.integration.vllm.vllm_v1_adapter")
        from lmcache.v1.config import LMCacheEngineConfig

        cfg = LMCacheEngineConfig.from_env()
        probe["config"] = {k: getattr(cfg, k, None) for k in
                           ("chunk_size", "local_cpu", "max_local_cpu_size", "local_disk", "remote_url",
                            "use_layerwise", "save_unfull_chunk")}
    except BaseException as exc:  # noqa: BLE001
        probe["adapter_error"] = _error_text(exc)
    return probe


def lmcache_preflight(mode: str, root: str | Path, env: dict[str, str]) -> tuple[dict | None, str | None]:
    """An LMCache mode's probe, run in its own process with the mode's ``env`` (so no engine process imports
    LMCache before vLLM does), and why the mode cannot run (None where it can): not staged, the probe died,
    or LMCache or its vLLM adapter failed to import. The probe is None where it did not run."""
    missing = lmcache_missing(mode, root)
    if missing:
        return None, missing
    try:
        probe = harness.run_result_process([sys.executable, *PROBE_COMMAND],
                                           env, "LMCache probe failed", timeout=PROBE_TIMEOUT_S,
                                           stderr_tail=PROBE_STDERR_TAIL)
    except SystemExit as exc:
        return None, str(exc)
    if probe.get("import_error") or not is_mp(mode):
        return probe, probe.get("import_error") or probe.get("adapter_error")
    if probe.get("mp_server_error"):
        return probe, f"{MP_SERVER_MODULE} does not import: {probe['mp_server_error']}"
    if not probe.get("mp_connector_module"):
        return probe, "no LMCacheMPConnector imports: " + "; ".join(probe.get("mp_connector_errors", []))
    return probe, None


def prepare(mode: str, root: str | Path, env: dict[str, str]) -> tuple[dict, str | None, LMCacheLog | None]:
    """Before a mode's engine process starts: what its result records (``{"lmcache": probe}`` where the probe
    ran, ``known_issue`` where its numbers are known to be wrong), why it cannot run (None where it can:
    ``lmcache_preflight``) and the LMCacheLog to feed the engine process's stderr (none for an MP mode: its
    server logs the work, ``serve``). ``({}, None, None)`` for a mode that is not LMCache's."""
    if not is_lmcache(mode):
        return {}, None, None
    probe, failed = lmcache_preflight(mode, root, env)
    extra = {} if probe is None else {"lmcache": probe}
    issue = known_issue(mode)
    if issue:
        extra["known_issue"] = issue
    # The MP connector's work is logged by its server, not in the engine's stderr (serve reads that log).
    return extra, failed, (None if failed or is_mp(mode) else LMCacheLog())
