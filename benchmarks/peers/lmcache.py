"""The LMCache peer (and vLLM's native offloading beside it) for the offload benchmarks: the library both
benchmarks/gpu_offload.py (its lmcache modes) and benchmarks/offload_accuracy.py (its --peers) use.

Mode names (``lmcache``: whatever ``import lmcache`` finds; ``lmcache-<version>``: a copy staged under
--lmcache-root by benchmarks/gpu/stage-lmcache.sh's receive.sh), LMCache's configuration as environment variables
and vLLM's transfer config for it, the probe of its import and compiled ops (run in its own process before an
engine: ``lmcache_preflight``), and the evidence of what it did: its own INFO log lines counted per phase
(``LMCacheLog``, fed the engine process's stderr, with the phase and follow-up marks the worker prints) and
why a run got nothing from it (``no_op_reason``).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
from pathlib import Path

from benchmarks import harness

LMCACHE = "lmcache"  # the peer's modes: "lmcache" (as importable) or "lmcache-<version>" (a staged copy)
LMCACHE_ROOT = "/tmp/kvstage"  # where benchmarks/gpu/stage-lmcache.sh's receive.sh installs LMCache
LMCACHE_CHUNK_TOKENS = 256
LMCACHE_OPS_MODULES = ("lmcache.cuda_ops", "lmcache.c_ops")  # >= 0.5.4 / <= 0.5.3
# The probe's process: gpu_offload's CLI runs lmcache_probe() and prints its result (--probe-lmcache).
PROBE_COMMAND = ("-m", "benchmarks.gpu_offload", "--probe-lmcache")
PROBE_TIMEOUT_S = 300
PROBE_STDERR_TAIL = 8  # error lines of a probe that died, kept in its reason


def lmcache_version(mode: str) -> str | None:
    """The staged LMCache version a mode names ("lmcache-0.5.3" -> "0.5.3"; "lmcache" -> None: as importable).
    ValueError for anything else."""
    if mode == LMCACHE:
        return None
    m = re.fullmatch(r"lmcache-(\d+(?:\.\d+)*(?:\.post\d+)?)", mode)
    if not m:
        raise ValueError(f"not an LMCache mode: {mode!r} (lmcache or lmcache-<version>, e.g. lmcache-0.5.6)")
    return m.group(1)


def is_lmcache(mode: str) -> bool:
    try:
        lmcache_version(mode)
    except ValueError:
        return False
    return True


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


def lmcache_transfer_config() -> dict:
    """vLLM's KVTransferConfig fields for LMCache (LMCacheConnectorV1 loads lmcache's own vllm_v1_adapter)."""
    return {"kv_connector": "LMCacheConnectorV1", "kv_role": "kv_both"}


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
    log = r.get("lmcache_log")
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
    return probe, probe.get("import_error") or probe.get("adapter_error")


def prepare(mode: str, root: str | Path, env: dict[str, str]) -> tuple[dict, str | None, LMCacheLog | None]:
    """Before a mode's engine process starts: what its result records (``{"lmcache": probe}`` where the probe
    ran), why it cannot run (None where it can: ``lmcache_preflight``) and the LMCacheLog to feed the engine
    process's stderr. ``({}, None, None)`` for a mode that is not LMCache's."""
    if not is_lmcache(mode):
        return {}, None, None
    probe, failed = lmcache_preflight(mode, root, env)
    return ({} if probe is None else {"lmcache": probe}), failed, (None if failed else LMCacheLog())
