"""`kvplug serve`: vLLM's own OpenAI-compatible server with the kvplug plugin on.

The launcher validates everything it can before the slow engine start (config, model, port), so a
mistake costs one clear line instead of a traceback a minute later. It then runs vLLM's API server as a
child process with the resolved config in its environment, and a fresh Prometheus multiprocess directory
so metrics from the engine core and workers reach /metrics.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import dataclass, field

from kvplug import models, settings, vllm_compat
from offload.spec import parse_offload_flag
from serving.processes import ServerProcess
from serving.replicas import (add_router_args, api_keys, replica_configs, run_replicated, tensor_parallel_size,
                              validate_router_args)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
# vLLM's default (0) aborts on SIGTERM and kills its engine core at once, which leaves the engine's shared
# memory and semaphores behind (the resource tracker's "leaked shared_memory objects" warnings). With a
# timeout, the engine stops in order; requests in flight get this long to finish.
DEFAULT_SHUTDOWN_TIMEOUT_S = 10
HASH_SEED = "0"


class ServeError(RuntimeError):
    """A problem found before starting vLLM; reported as one line, exit code ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ServePlan:
    """Everything needed to start the server; built without starting anything (testable)."""

    command: list[str]
    env: dict[str, str]
    model_path: str
    served_model_name: str
    host: str
    port: int
    config: settings.KvplugConfig
    vllm_args: list[str] = field(default_factory=list)
    replicas: int = 1                       # >1: N engines on Ray behind a router (serving/replicas.py)
    ray_address: str | None = None
    router: dict = field(default_factory=dict)
    replica_configs: list[settings.KvplugConfig] = field(default_factory=list)  # one per replica (>1)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvplug serve", add_help=False,
        description="Start vLLM's OpenAI-compatible server with kvplug on. MODEL is a kvplug model name "
                    f"({', '.join(models.MODELS)}; default {models.DEFAULT_MODEL}) or a local HF folder. "
                    "Flags kvplug does not know are passed to vLLM unchanged.")
    p.add_argument("--config", help="kvplug YAML config file")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config key (repeatable)")
    p.add_argument("--offload", metavar="TIERS",
                   help="offload evicted prefix KV through kvplug's connector, e.g. cpu:8GiB,disk:/path:100GiB "
                        "(sets the offload config section and vLLM's --kv-transfer-config)")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--kvplug-help", action="help", help="show kvplug's own flags and exit")
    add_router_args(p)
    return p


def flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def check_port_free(host: str, port: int) -> None:
    """ServeError unless the server can bind ``host:port``.

    Binds the way vLLM's server (and the router's uvicorn) do, with SO_REUSEADDR: a port whose only sockets
    are in TIME-WAIT after a stop is free for them, so a restart right after a stop must pass here too.
    SO_REUSEADDR still fails on a port another socket listens on."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServeError(f"port {port} on {host} is not available ({exc.strerror}); pick another with --port",
                             code=1) from None


POLICY_MIDDLEWARE = "serving.policy_middleware.PolicyValidationMiddleware"


def offload_args(config: settings.KvplugConfig, user_args: list[str]) -> list[str]:
    """vLLM flags for the offload tiers (kvplug's KV connector) and the request-policy check (HTTP 400)."""
    args = []
    if config.offload.enabled and not _has_flag(user_args, "--kv-transfer-config"):
        args += ["--kv-transfer-config", json.dumps(vllm_compat.kv_transfer_config())]
    if POLICY_MIDDLEWARE not in user_args:
        args += ["--middleware", POLICY_MIDDLEWARE]
    return args


def _mem_available_bytes(meminfo: str) -> int | None:
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def check_cpu_tier_fits(config: settings.KvplugConfig, tp_ranks: int, replicas: int, meminfo: str) -> None:
    """ServeError if the CPU tiers of every TP rank of every replica on this host exceed its MemAvailable.

    Each rank's connector holds its own CPU tier of the (per-replica) size; without this check an oversized
    tier is found only when the host runs out of memory under load (or the pinned pool cannot be pinned)."""
    available = _mem_available_bytes(meminfo)
    per_rank = config.offload.cpu_bytes // replicas  # --replicas splits the budget (serving/replicas.py)
    need = per_rank * tp_ranks * replicas
    if not config.offload.enabled or available is None or need <= available:
        return
    split = f" ({_gib(config.offload.cpu_bytes)} split over {replicas} replicas)" if replicas > 1 else ""
    raise ServeError(f"--offload cpu: {_gib(per_rank)} per TP rank{split} x {tp_ranks} TP rank(s) x {replicas} "
                     f"replica(s) = {_gib(need)}, but this host has only {_gib(available)} available (MemAvailable "
                     "in /proc/meminfo); give a smaller --offload cpu:SIZE")


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def plan(argv: list[str], environ: dict[str, str] | None = None, prepare_model: bool = True,
         meminfo: str | None = None) -> ServePlan:
    """Parse `kvplug serve` arguments into a ServePlan; ServeError on bad input.

    ``meminfo``: the text of /proc/meminfo (read when None) for the CPU tier's size check."""
    environ = dict(os.environ if environ is None else environ)
    argv = list(argv)
    model_arg = argv.pop(0) if argv and not argv[0].startswith("-") else None
    ns, vllm_args = _parser().parse_known_args(argv)
    if _has_flag(vllm_args, "--model"):
        if model_arg is not None:
            raise ServeError("give the model once: either as MODEL or as --model")
        model_arg = flag_value(vllm_args, "--model")
        vllm_args = [a for i, a in enumerate(vllm_args)
                     if not (a == "--model" or a.startswith("--model=") or (i and vllm_args[i - 1] == "--model"))]
    if not 0 < ns.port < 65536:
        raise ServeError(f"--port {ns.port} is not a TCP port (1-65535)")
    if (problem := validate_router_args(ns, vllm_args)) is not None:
        raise ServeError(problem)
    try:
        sets = [*(parse_offload_flag(ns.offload) if ns.offload else []), *ns.sets]
        config = settings.resolve(ns.config, sets, environ)
    except settings.KvplugConfigError as exc:
        raise ServeError(str(exc)) from None
    try:
        per_replica = replica_configs(config, ns.replicas) if ns.replicas > 1 else []
    except settings.KvplugConfigError as exc:
        raise ServeError(str(exc)) from None
    if not ns.ray_address:  # on a Ray cluster, where the replicas land is Ray's choice
        if meminfo is None:
            try:
                with open("/proc/meminfo") as f:
                    meminfo = f.read()
            except OSError:
                meminfo = ""
        check_cpu_tier_fits(config, tensor_parallel_size(vllm_args), ns.replicas, meminfo)
    check_port_free(ns.host, ns.port)

    try:
        if model_arg is None or models.is_registered(model_arg):
            spec = models.lookup(model_arg or models.DEFAULT_MODEL)
            model_path = str(models.prepare(spec.name)) if prepare_model else str(models.model_dir(spec.name))
            served_name, default_len = spec.name, spec.max_model_len
        else:
            model_path, default_len = models.resolve_model(model_arg)
            served_name = os.path.basename(model_path.rstrip("/"))
    except models.ModelError as exc:
        raise ServeError(str(exc)) from None

    extra = list(vllm_args)
    if not _has_flag(extra, "--served-model-name"):
        extra += ["--served-model-name", served_name]
    else:
        served_name = flag_value(extra, "--served-model-name") or served_name
    if default_len and not _has_flag(extra, "--max-model-len"):
        extra += ["--max-model-len", str(default_len)]
    if not _has_flag(extra, "--shutdown-timeout"):
        extra += ["--shutdown-timeout", str(DEFAULT_SHUTDOWN_TIMEOUT_S)]
    if not _has_flag(extra, "--attention-backend"):
        extra += vllm_compat.attention_backend_cli_args()
    extra += vllm_compat.platform_default_args(extra, environ)
    extra += offload_args(config, extra)

    env = dict(environ)
    env.update(vllm_compat.platform_default_env(environ))
    # vLLM seeds its block hashes from PYTHONHASHSEED: a fixed one makes them equal across replicas and restarts
    # (the router's prefix map, pins on the disk tier). The user's own value wins.
    env.setdefault("PYTHONHASHSEED", HASH_SEED)
    env[settings.ENV_CONFIG_JSON] = config.to_json()
    env.pop(settings.ENV_CONFIG_PATH, None)  # resolved already; children must not re-read a changed file
    vllm_compat.propagate_env_to_ray(environ=env)
    # Ray TP workers write their kvplug/vLLM samples to the same multiprocess dir (set by run()).
    vllm_compat.propagate_env_to_ray(prefix="PROMETHEUS_MULTIPROC_DIR", environ=env)
    command = vllm_compat.api_server_command(sys.executable) + [
        "--model", model_path, "--host", ns.host, "--port", str(ns.port), *extra]
    return ServePlan(command=command, env=env, model_path=model_path, served_model_name=served_name,
                     host=ns.host, port=ns.port, config=config, vllm_args=extra, replicas=ns.replicas,
                     ray_address=ns.ray_address, replica_configs=per_replica,
                     router={**{k: getattr(ns, k) for k in ("routing", "load_factor", "tier_min_match", "affinity_prefix_chars",
                                                            "cpus_per_replica", "health_interval",
                                                            "replica_start_timeout", "router_read_timeout",
                                                            "router_max_body_bytes",
                                                            "router_max_session_id_bytes")},
                             "api_keys": api_keys(vllm_args, environ)})


def run(p: ServePlan) -> int:
    """Run the planned server in the foreground; returns its exit code.

    SIGINT/SIGTERM stop it in order (serving/processes.py); its metrics directory goes with it."""
    prom_dir = tempfile.mkdtemp(prefix="kvplug-prom-")
    env = dict(p.env, PROMETHEUS_MULTIPROC_DIR=prom_dir)
    print(f"kvplug serve: {p.served_model_name} on http://{p.host}:{p.port}/v1 "
          f"(features: {', '.join(p.config.enabled_features()) or 'none'})", file=sys.stderr, flush=True)
    old = {}
    try:
        server = ServerProcess(p.command, env)
        old = {s: signal.signal(s, lambda _signum, _frame: server.request_stop())
               for s in (signal.SIGINT, signal.SIGTERM)}
        return server.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        shutil.rmtree(prom_dir, ignore_errors=True)


def main(argv: list[str]) -> int:
    try:
        p = plan(argv)
    except ServeError as exc:
        print(f"kvplug serve: {exc}", file=sys.stderr)
        return exc.code
    if p.replicas > 1 or p.ray_address:
        return run_replicated(p)
    return run(p)
