"""What the benchmark scripts share. Scripts import this module (and the `kvplug bench` package,
benchmarks/scbench/), never each other.

Sections:
  * model shapes: config.json shapes for `load_format="dummy"` engines, small random-weight Llamas;
  * device and timing: ``cuda_available``, ``device_name``, ``time_cuda`` (CUDA events / perf_counter);
  * engine workers: one engine per subprocess, one ``RESULT {json}`` line back (``emit_result``,
    ``run_worker``), the environment each gets (``engine_env``, ``kvplug_env``) and result files that carry
    their command, device and date (``write_results``), the engine of the sparse prefill replay and accuracy
    scripts (``sparse_prefill_env``, ``chat_max_model_len``, ``sparse_prefill_llm_kwargs``);
  * library seams: the only places where more than one script reaches into kvplug's library
    (attention impl names, the connector's engine kwargs and worker side, model preparation, SCBench cases);
  * process trees: a command in a session of its own (``start_session``), stopped with every process it
    started, those in sessions of their own too (``stop_process_tree``);
  * servers: ``kvplug serve`` on a free port (``kvplug_server``) until /health answers (``health_failure``
    says why not; ``serve_kvplug`` raises it), ``kvplug bench`` as a subprocess (``run_kvplug``), HTTP with the
    standard library (``http_request``), Prometheus /metrics samples (``scrape_samples``);
  * profiling: torch.profiler in an engine's worker through collective_rpc (``profile_start``/``profile_stop``),
    summarized as device busy/idle time, kernel families, top kernels and host calls that wait (``profile_summary``);
  * plots: ``pyplot()`` (matplotlib on the Agg backend).

Only the standard library is imported at module level: ``python -m benchmarks.kernels.run`` runs on a GPU
box that has torch but maybe not httpx or vLLM.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

# ----------------------------------------------------------------------------------------------- model shapes

LLAMA_3_8B = {
    # Meta-Llama-3-8B's config.json, with the context raised so a 128K prompt plus its decode tokens stays
    # inside the RoPE table (positions >= max_position_embeddings index past vLLM's cos/sin cache: that was the
    # "index out of bounds ... < 131072" device assert of the 128K decode run). RoPE scaling is irrelevant to speed.
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 262144,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "bos_token_id": 128000, "eos_token_id": 128001,
    "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
}
# config.json of real model shapes, for engines with load_format="dummy" (no weights travel).
SHAPES = {"llama-3-8b": LLAMA_3_8B}
# Small Llamas written with seeded random weights (write_random_model); heads divisible by 2 (q and kv) so
# tensor parallel 2 splits them.
RANDOM_LLAMA_SHAPES = {
    "llama-tiny": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096},
    "llama-small": {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8,
                    "num_attention_heads": 16, "num_key_value_heads": 8, "vocab_size": 32000},
}


def write_shape(name: str, into: Path) -> Path:
    """``into/config.json`` of shape ``name``; returns ``into``."""
    into.mkdir(parents=True, exist_ok=True)
    (into / "config.json").write_text(json.dumps(SHAPES[name], indent=2))
    return into


def shape_dir(name: str) -> Path:
    """A fresh temporary model folder holding shape ``name``'s config.json."""
    return write_shape(name, Path(tempfile.mkdtemp(prefix="kvplug-shape-")))


def write_random_model(shape: str, into: Path, seed: int = 0) -> Path:
    """A Llama of RANDOM_LLAMA_SHAPES[shape] with seeded random weights and a word-level tokenizer ('t0 t1 ...')."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = RANDOM_LLAMA_SHAPES[shape]
    into.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    cfg = LlamaConfig(**s, max_position_embeddings=32768, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
                      torch_dtype="float16")
    model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(into, safe_serialization=True)
    return write_word_tokenizer(into, s["vocab_size"], bos=1, eos=2)


def write_word_tokenizer(into: Path, vocab_size: int, bos: int, eos: int) -> Path:
    """A word-level tokenizer over ``vocab_size`` ids ('t0 t1 ...' -> 0, 1, ...) saved into ``into``: text prompts
    for a model folder without a real tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", bos_token=f"t{bos}",
                            eos_token=f"t{eos}").save_pretrained(into)
    return into


def model_config(model_dir: str | Path) -> dict:
    """The config.json of a model folder."""
    return json.loads((Path(model_dir) / "config.json").read_text())


def kv_bytes_per_token(shape: dict, dtype_bytes: int = 2) -> int:
    """K and V bytes of one token over all layers (a config.json dict)."""
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    return 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * dtype_bytes


# ----------------------------------------------------------------------------------------- device and timing

def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def device_name(cpu: str = "cpu") -> str:
    """GPU 0's name, or ``cpu`` where there is no CUDA device."""
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else cpu


def _quantile(sorted_vals: list[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def time_cuda(fn: Callable[[], object], warmup: int = 3, iters: int = 10,
              device: str | None = None) -> dict:
    """Time ``fn()``: ``{"median_ms", "p10", "p90", "mean_ms", "min_ms", "iters", "warmup", "timer"}``.

    Uses CUDA events when CUDA is available and ``device`` is not a CPU device, else ``perf_counter``.
    ``warmup`` untimed calls come first.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    import torch

    use_cuda = torch.cuda.is_available() and not (device and str(device).startswith("cpu"))
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if use_cuda:
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in zip(starts, ends)]
        timer = "cuda-event"
    else:
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000.0)
        timer = "perf_counter"
    ts = sorted(times)
    return {
        "median_ms": statistics.median(ts),
        "p10": _quantile(ts, 0.10),
        "p90": _quantile(ts, 0.90),
        "mean_ms": statistics.fmean(ts),
        "min_ms": ts[0],
        "iters": iters,
        "warmup": warmup,
        "timer": timer,
    }


# ---------------------------------------------------------------------------------------------- engine workers

RESULT_PREFIX = "RESULT "


def emit_result(result: dict) -> None:
    """The worker's answer to its parent: one ``RESULT {json}`` line on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_result_process(cmd: Sequence[str], env: dict, failure: str, timeout: float | None = None,
                       stderr_tail: int = 0, on_line: Callable[[str], None] | None = None) -> dict:
    """Run ``cmd`` and return its last ``RESULT {json}`` line. The child's stderr streams through; its other
    stdout lines are echoed to stderr. ``SystemExit(f"{failure} (exit N)")`` if it failed or sent none; with
    ``stderr_tail`` the message also carries the child's last error lines (at most that many), so a result
    file can say why a run died (the root cause is often only in a subprocess's log). ``on_line`` sees every
    stderr line of the child (and of the processes it starts), e.g. to count what a library logged."""
    if not stderr_tail and on_line is None:
        proc = subprocess.run(list(cmd), env=env, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
        stdout, tail = proc.stdout, []
    else:
        import collections
        import threading

        # Its own process group: a timeout (or Ctrl-C here) also ends the engine processes it started, which
        # would otherwise keep the GPU memory the next run needs.
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                errors="replace", start_new_session=True)
        kept: collections.deque = collections.deque(maxlen=400)

        def pump() -> None:
            for line in proc.stderr:
                sys.stderr.write(line)
                kept.append(line.rstrip("\n"))
                if on_line is not None:
                    on_line(line.rstrip("\n"))

        out: list[str] = []
        readers = [threading.Thread(target=pump, daemon=True),
                   threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)]
        for r in readers:
            r.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child's leftovers too, whether or not it ended
            proc.wait()
            for r in readers:
                r.join(timeout=5)
        stdout = "".join(out)
        tail = error_lines(list(kept), stderr_tail)
        if timed_out:
            raise SystemExit(f"{failure} (timed out after {timeout:g} s)" + "".join(f"\n{ln}" for ln in tail))
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    sys.stderr.write("".join(ln + "\n" for ln in stdout.splitlines() if not ln.startswith(RESULT_PREFIX)))
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{failure} (exit {proc.returncode})" + "".join(f"\n{ln}" for ln in tail))
    return json.loads(lines[-1][len(RESULT_PREFIX):])


# "SomeError: message" (not the "raise SomeError(" lines of a traceback), a loader's "undefined symbol", "error: "
ERROR_LINE = re.compile(r"\b[A-Za-z_][\w.]*(Error|Exception): |undefined symbol|\berror: ")


def error_lines(lines: Sequence[str], limit: int) -> list[str]:
    """The last ``limit`` lines that name an error (exception messages, ``undefined symbol``...), else the last
    ``limit`` lines: what a result file records of a run that died."""
    marked = [ln for ln in lines if ERROR_LINE.search(ln)]
    return list((marked or list(lines))[-limit:]) if limit > 0 else []


def run_worker(module: str, backend: str, argv: Sequence[str], env: dict, stderr_tail: int = 0,
               timeout: float | None = None, on_line: Callable[[str], None] | None = None) -> dict:
    """Run ``python -m module --worker --backend B <argv>`` and return its ``RESULT`` line."""
    print(f"[{module.rsplit('.', 1)[-1]}] running {backend} ...", file=sys.stderr, flush=True)
    return run_result_process([sys.executable, "-m", module, "--worker", "--backend", backend, *argv], env,
                              f"{backend} run failed", timeout=timeout, stderr_tail=stderr_tail, on_line=on_line)


def worker_argv(argv: Sequence[str], drop: Sequence[str] = ("--backends", "--out")) -> list[str]:
    """The parent's own flags minus those only the parent uses (``--flag value`` or ``--flag=value``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        name = a.split("=", 1)[0]
        if name in drop:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def kvplug_env(section: str, **keys: Any) -> dict[str, str]:
    """kvplug config as environment variables: ``KVPLUG_<SECTION>__<KEY>`` (booleans as true/false)."""
    return {f"KVPLUG_{section.upper()}__{k.upper()}": (str(v).lower() if isinstance(v, bool) else str(v))
            for k, v in keys.items()}


def set_pairs(pairs: Sequence[str], section: str) -> dict[str, str]:
    """--set KEY=VALUE arguments -> keys of one kvplug config section (kvplug validates them in the engine)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--set {pair!r}: expected KEY=VALUE (a {section} key)")
        out[key.strip()] = value.strip()
    return out


def resolved_config_env(sets: Sequence[str], environ: dict[str, str]) -> dict[str, str]:
    """``environ`` with kvplug's config resolved from its KVPLUG_* variables and ``sets`` (``SECTION.KEY=VALUE``,
    as `kvplug serve --set`) into the KVPLUG_CONFIG_JSON every engine process reads, as `kvplug serve` passes it.
    A bad key or value is a SystemExit naming it, before any engine starts."""
    from kvplug import settings

    env = {k: v for k, v in environ.items() if k != settings.ENV_CONFIG_JSON}
    try:
        env[settings.ENV_CONFIG_JSON] = settings.resolve(None, sets, env).to_json()
    except settings.KvplugConfigError as exc:
        raise SystemExit(f"kvplug config: {exc}") from None
    return env


def engine_env(vanilla: bool = False, clear_config: bool = False, **extra: str) -> dict[str, str]:
    """Environment of an engine subprocess: this one, collective_rpc of local functions allowed (pickle);
    ``vanilla``: kvplug not even loaded (VLLM_PLUGINS=none); ``clear_config``: no inherited KVPLUG_CONFIG_JSON
    (the KVPLUG_<SECTION>__<KEY> variables then decide)."""
    env = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    if clear_config:
        env.pop("KVPLUG_CONFIG_JSON", None)
    if vanilla:
        env["VLLM_PLUGINS"] = "none"
    env.update(extra)
    return env


def sparse_prefill_env(min_prompt_tokens: int, cost_table: str = "none", enabled: bool = True,
                       **keys: Any) -> dict[str, str]:
    """``engine_env(clear_config=True)`` of a sparse prefill accuracy engine: sparse prefill ``enabled`` from
    ``min_prompt_tokens`` on, ``keys`` more sparse_prefill keys (pattern_config). cost_table none (default): every
    chunk past the floor goes sparse, so what is measured is the sparse path, not the cost model's choices."""
    return engine_env(clear_config=True, **kvplug_env("sparse_prefill", enabled=enabled,
                                                      min_prompt_tokens=min_prompt_tokens, cost_table=cost_table,
                                                      **keys))


def chat_max_model_len(longest_context: int, turns: int, max_tokens: int, positions: int | None = None) -> int:
    """max_model_len of multi-turn chats over contexts of up to ``longest_context`` tokens: 256 tokens a turn and
    ``max_tokens`` new ones on top, rounded up to 1024 plus 1024 spare (the chat template); at most ``positions``
    (the model's max_position_embeddings) when given."""
    n = -(-(longest_context + 256 * turns + max_tokens) // 1024) * 1024 + 1024
    return n if positions is None else min(positions, n)


def sparse_prefill_llm_kwargs(model: str, max_model_len: int, max_batched_tokens: int, prefix_caching: bool,
                              gpu_memory_utilization: float | None = None) -> dict:
    """LLM(...) arguments of a sparse prefill accuracy engine: kvplug's attention backend, seed 0, chunked prefill
    of ``max_batched_tokens``; a 2 GiB KV cache on the CPU, ``gpu_memory_utilization`` on a GPU (None: vLLM's)."""
    kw = dict(model=model, max_model_len=max_model_len, seed=0, enable_prefix_caching=prefix_caching,
              max_num_batched_tokens=max_batched_tokens, **kvplug_attention_kwargs())
    if not cuda_available():
        kw.update(kv_cache_memory_bytes=2 << 30)
    elif gpu_memory_utilization is not None:
        kw.update(gpu_memory_utilization=gpu_memory_utilization)
    return kw


def engine_memory_kwargs(kv_cache_gib: float | None, gpu_memory_utilization: float) -> dict:
    """LLM(...) memory arguments: a fixed KV-cache size when asked and this vLLM knows the argument (every
    backend then gets the same KV space, whatever its own extra memory), else the utilization fraction."""
    if kv_cache_gib:
        import dataclasses

        from vllm.engine.arg_utils import EngineArgs

        if "kv_cache_memory_bytes" in {f.name for f in dataclasses.fields(EngineArgs)}:
            return {"kv_cache_memory_bytes": int(kv_cache_gib * (1 << 30))}
        print(f"this vLLM has no kv_cache_memory_bytes; using gpu_memory_utilization={gpu_memory_utilization}",
              file=sys.stderr, flush=True)
    return {"gpu_memory_utilization": gpu_memory_utilization}


def add_parallel_args(p) -> None:
    """--tensor-parallel-size and --distributed-executor-backend of a script comparing engines: every engine of
    the run (the baseline and kvplug alike) gets the same ones, so speedups compare equal parallelism."""
    from benchmarks.cli import _positive_int

    p.add_argument("--tensor-parallel-size", type=_positive_int, default=1, metavar="N",
                   help="GPUs per engine (vLLM's tensor_parallel_size), the same for every engine of the run")
    p.add_argument("--distributed-executor-backend", choices=("mp", "ray"), default=None,
                   help="vLLM's distributed_executor_backend for every engine (default: not passed, vLLM "
                        "chooses: mp on one host)")


def check_parallel_args(args) -> None:
    """Before any engine starts: Ray must be importable here when it was asked for (else every engine would
    fail minutes in, one after the other)."""
    if args.distributed_executor_backend == "ray":
        try:
            import ray  # noqa: F401
        except Exception as e:  # noqa: BLE001  (an install that fails to import is as unusable as none)
            raise SystemExit(f"--distributed-executor-backend ray: Ray is not importable ({type(e).__name__}: "
                             f"{e}); stage it (../shared/gpu/stage.sh --with-ray) or use mp") from None


def parallel_kwargs(args) -> dict:
    """LLM(...) arguments of add_parallel_args' flags; the executor backend only when given (vLLM's own choice
    otherwise)."""
    kw: dict = {"tensor_parallel_size": args.tensor_parallel_size}
    if args.distributed_executor_backend:
        kw["distributed_executor_backend"] = args.distributed_executor_backend
    return kw


def parallel_argv(args) -> list[str]:
    """add_parallel_args' flags again, for a worker process's command line."""
    return [f"--{k.replace('_', '-')}={v}" for k, v in parallel_kwargs(args).items()]


def parallel_facts(args) -> dict:
    """The summary's record of the run's parallelism (None: the executor backend was vLLM's choice; each engine's
    ``engine`` facts say which it took)."""
    return {"tensor_parallel_size": args.tensor_parallel_size,
            "distributed_executor_backend": args.distributed_executor_backend}


def parallel_label(summary: dict) -> str:
    """``TP 2 (ray)`` / ``TP 1``: the parallelism of a summary, for a run's header line."""
    backend = summary.get("distributed_executor_backend")
    return f"TP {summary.get('tensor_parallel_size', 1)}" + (f" ({backend})" if backend else "")


def shape_parser(module: str, doc: str | None, default_out: str, backends: str = "FLASH_ATTN,CUSTOM"):
    """The parser of a dummy-weight GPU script comparing backends: --shape, --model-dir, --gpu-mem, --backends,
    --out and the hidden flags of its worker processes (--worker, --backend)."""
    import argparse

    p = argparse.ArgumentParser(prog=f"python -m {module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    p.add_argument("--model-dir", help="folder with config.json (default: a temp folder with --shape)")
    p.add_argument("--gpu-mem", type=float, default=0.85,
                   help="vLLM's gpu_memory_utilization: the fraction of each GPU's memory an engine may use")
    p.add_argument("--backends", default=backends)
    p.add_argument("--out", default=default_out)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    return p


def parse_shape_args(p, argv: Sequence[str] | None, worker: Callable[[Any], None]):
    """Parse a shape_parser's arguments. In a worker process: run ``worker(args)`` and return None. In the
    parent: --model-dir defaults to a fresh folder holding --shape's config.json."""
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return None
    if args.model_dir is None:
        args.model_dir = str(shape_dir(args.shape))
    return args


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """How this run was started: ``python -m <module> <args>``."""
    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)


def print_metric_rows(summary: dict, metrics: Sequence[str], line: Callable[[str, str, dict], str]) -> None:
    """One printed line per (metric, key) of ``summary[metric]``: ``line(metric, key, row)``."""
    for metric in metrics:
        for key, row in summary[metric].items():
            print(line(metric, key, row))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """95% interval of a proportion k/n (Wilson score)."""
    if n == 0:
        return None
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (round((centre - half) / (1 + z * z / n), 4), round((centre + half) / (1 + z * z / n), 4))


def paired_difference(a: Sequence[float], b: Sequence[float], z: float = 1.96) -> dict:
    """mean(a - b) over paired questions with its 95% interval (normal approximation of the paired differences)."""
    n = len(a)
    d = [x - y for x, y in zip(a, b)]
    mean = sum(d) / n if n else 0.0
    var = sum((x - mean) ** 2 for x in d) / (n - 1) if n > 1 else 0.0
    half = z * math.sqrt(var / n) if n else 0.0
    return {"n": n, "mean": round(mean, 4), "ci95": (round(mean - half, 4), round(mean + half, 4))}


# ------------------------------------------------------------------------------ two `kvplug bench` runs compared
# The same questions (same seed, tasks and contexts) asked of two servers: accuracy per turn over the questions both
# answered, paired per question, and how often the two said the very same thing.

def scores_by_question(records: Sequence[dict]) -> dict[tuple[str, int], float]:
    """(case_id, turn) -> score of each answered (status ok, scored) request of a bench run."""
    return {(r["case_id"], r["turn"]): float(r["score"]) for r in records
            if r.get("status") == "ok" and r.get("score") is not None}


def paired_accuracy_per_turn(a_records: Sequence[dict], b_records: Sequence[dict], a: str = "a", b: str = "b",
                             overall: bool = False) -> dict[str, dict]:
    """Per turn (and over all turns as "all" with ``overall``), over the questions answered in both runs: n, each
    run's accuracy with its 95% Wilson interval (keys ``a``, ``b``), ``<b>_minus_<a>`` paired per question with its
    95% interval, and ``within_noise`` (that interval holds 0). Questions answered in one run only are counted as
    ``unpaired`` (an error in the other run)."""
    one, two = scores_by_question(a_records), scores_by_question(b_records)
    groups = [(str(t), t) for t in sorted({t for _, t in one.keys() | two.keys()})]
    table = {}
    for name, turn in groups + ([("all", None)] if overall else []):
        keys = sorted(k for k in one.keys() & two.keys() if turn is None or k[1] == turn)
        x, y = [one[k] for k in keys], [two[k] for k in keys]
        n = len(keys)
        row = {"n": n, "unpaired": sum(1 for k in one.keys() ^ two.keys() if turn is None or k[1] == turn)}
        for label, scores in ((a, x), (b, y)):
            row[label] = {"accuracy": sum(scores) / n if n else None, "ci95": wilson(round(sum(scores)), n)}
        diff = paired_difference(y, x)
        row[f"{b}_minus_{a}"] = diff
        row["within_noise"] = bool(n) and diff["ci95"][0] <= 0.0 <= diff["ci95"][1]
        table[name] = row
    return table


def paired_accuracy_table(per_turn: dict[str, dict], a: str, b: str, a_title: str, b_title: str) -> str:
    """``paired_accuracy_per_turn``'s result as a Markdown table."""
    lines = [f"| turn | n | {a_title} accuracy [95%] | {b_title} accuracy [95%] | {b_title} - {a_title} [95%, paired] "
             "| within noise |", "|---|---|---|---|---|---|"]
    for turn, r in per_turn.items():
        d = r[f"{b}_minus_{a}"]
        lines.append(f"| {turn} | {r['n']} | {accuracy_cell(r[a])} | {accuracy_cell(r[b])} | {d['mean']:+.3f} "
                     f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | {r['within_noise']} |")
    return "\n".join(lines)


def accuracy_cell(side: dict) -> str:
    """One side of a paired accuracy row as a table cell: '0.750 [0.301, 0.954]' (– when nothing was answered)."""
    ci = side["ci95"]
    return "–" if side["accuracy"] is None else f"{side['accuracy']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def identical_answers(a_records: Sequence[dict], b_records: Sequence[dict]) -> dict:
    """How often run b's answer text equals run a's, over the questions both answered, and over those run a got
    right (score 1): the "answers identical to dense where dense is right" gate."""
    def texts(records):
        return {(r["case_id"], r["turn"]): (r.get("prediction"), float(r["score"] or 0.0)) for r in records
                if r.get("status") == "ok"}

    one, two = texts(a_records), texts(b_records)
    keys = one.keys() & two.keys()
    right = [k for k in keys if one[k][1] >= 1.0]
    same = [k for k in keys if one[k][0] == two[k][0]]
    return {"n": len(keys), "identical": len(same), "rate": len(same) / len(keys) if keys else None,
            "a_right": len(right), "identical_where_a_right": sum(1 for k in right if one[k][0] == two[k][0]),
            "rate_where_a_right": (sum(1 for k in right if one[k][0] == two[k][0]) / len(right)) if right else None}


def kvplug_deltas(result: dict) -> dict[str, float]:
    """The kvplug counters that moved in a bench run (its results.json): which features worked (sparse chunks,
    retrieval steps, tier stores and hits)."""
    deltas = (result["summary"].get("metrics") or {}).get("deltas") or {}
    return {k: v for k, v in deltas.items() if k.startswith("kvplug") and "_bucket" not in k and v}


def utc_now() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def write_results(out: str | Path, command: str, summary: dict, runs: Any) -> None:
    """``{"summary": ..., "runs": ...}`` into ``out``; the summary records the command and the date (the
    device is the script's own summary field: it is measured in the worker)."""
    summary["command"] = command
    summary.setdefault("date", utc_now())
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"summary": summary, "runs": runs}, indent=2))


# -------------------------------------------------------------------------------------------------- profiling
# torch.profiler inside an engine's worker, started and stopped through ``llm.collective_rpc`` (engine_env
# allows pickled functions): where a step's time goes on the GPU and which host calls wait for it, in the same
# run as the timings. Kernels and CUDA runtime calls are recorded for the whole process (CUPTI), whichever
# thread runs the model.

_PROFILER: dict[str, Any] = {}
# CUDA runtime calls that make the host wait for the device (or may: cudaMemcpyAsync from/to pageable memory;
# cudaFree and cudaHostAlloc synchronize too).
HOST_WAIT_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
                   "cudaMemcpyAsync", "cudaFree", "cudaHostAlloc", "cudaMalloc", "cudaStreamWaitEvent")
# Kernel families by name (first match wins).
KERNEL_GROUPS = (("flash_attn", re.compile(r"flash|FlashAttn|fmha", re.I)),
                 ("gemm", re.compile(r"gemm|cutlass|nvjet|xmma|cublas|matmul", re.I)),
                 ("copy", re.compile(r"memcpy|memset|copy|gather|index|cat|stack", re.I)),
                 ("triton", re.compile(r"^triton_|^_")))


def profile_start(_worker: Any = None) -> None:
    """Start torch.profiler (CPU ops, CUDA kernels and runtime calls) in this process."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities)
    prof.start()
    _PROFILER["prof"] = prof


def profile_stop(_worker: Any = None, top: int = 25) -> dict:
    """Stop the profiler profile_start started (after the device finished) and summarize it."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    prof = _PROFILER.pop("prof")
    prof.stop()
    return profile_summary(prof.events(), top)


def _union_us(intervals: list[tuple[float, float]]) -> float:
    busy, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy


def _is_device_annotation(e: Any) -> bool:
    on_device = str(getattr(e, "device_type", "")).endswith("CUDA")
    return on_device and (bool(getattr(e, "is_user_annotation", False)) or e.name.startswith("kvplug."))


def profile_summary(events: Any, top: int = 25) -> dict:
    """torch.profiler events -> what a step's time went to: the window they span, the device's busy time (the
    union of its kernels and copies) and idle time within it, kernel time by family and the top kernels, the
    host calls that wait for the device, the top CPU ops by self time, and kvplug's own ranges (``kvplug.``)."""
    device, cpu = [], []
    for e in events:
        # A record_function range is mirrored on the GPU timeline as a user annotation spanning the kernels it
        # launched: counted there, it would double the device time (and "index" in a range name reads as a copy).
        if _is_device_annotation(e):
            continue
        (device if str(getattr(e, "device_type", "")).endswith("CUDA") else cpu).append(e)
    starts = [e.time_range.start for e in events]
    ends = [e.time_range.end for e in events]
    window_us = (max(ends) - min(starts)) if starts else 0.0
    busy_us = _union_us([(e.time_range.start, e.time_range.end) for e in device])
    kernels: dict[str, list[float]] = {}
    for e in device:
        k = kernels.setdefault(e.name, [0, 0.0])
        k[0] += 1
        k[1] += e.time_range.end - e.time_range.start
    groups: dict[str, float] = {}
    for name, (_, us) in kernels.items():
        group = next((g for g, rx in KERNEL_GROUPS if rx.search(name)), "other")
        groups[group] = groups.get(group, 0.0) + us / 1e3
    calls: dict[str, list[float]] = {}  # CPU ops and runtime calls: count, self time
    ranges: dict[str, list[float]] = {}  # kvplug's record_function ranges: count, total time
    for e in cpu:
        k = calls.setdefault(e.name, [0, 0.0])
        k[0] += 1
        k[1] += getattr(e, "self_cpu_time_total", e.time_range.end - e.time_range.start)
        if e.name.startswith("kvplug."):
            r = ranges.setdefault(e.name, [0, 0.0])
            r[0] += 1
            r[1] += e.time_range.end - e.time_range.start
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    ranked = lambda d: sorted(d.items(), key=lambda kv: -kv[1][1])  # noqa: E731
    return {
        "window_ms": ms(window_us), "gpu_busy_ms": ms(busy_us), "gpu_idle_ms": ms(max(window_us - busy_us, 0.0)),
        "kernel_ms_by_group": {g: round(v, 3) for g, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:200], "calls": c, "ms": ms(us)} for n, (c, us) in ranked(kernels)[:top]],
        "host_waits": {n: {"calls": calls[n][0], "ms": ms(calls[n][1])} for n in HOST_WAIT_CALLS if n in calls},
        "top_cpu_ops": [{"name": n[:200], "calls": c, "self_ms": ms(us)}
                        for n, (c, us) in ranked(calls) if not n.startswith("cuda")][:top],
        "kvplug_ranges": {n: {"calls": c, "ms": ms(us)} for n, (c, us) in ranges.items()},
    }


def profile_digest(p: dict, top: int | None = None) -> dict:
    """The comparable figures of one profile_summary (with the caller's ``ttft_s``): the full one stays in the
    run's result. ``top``: how many of its top kernels (None: all that profile_summary kept, --profile-top; the
    2026-12-07 128K digest cut at 8 hid most of the sparse path's copy and index kernels)."""
    return {k: p[k] for k in ("ttft_s", "window_ms", "gpu_busy_ms", "gpu_idle_ms", "kernel_ms_by_group",
                              "host_waits", "kvplug_ranges") if k in p} | {"top_kernels": p["top_kernels"][:top]}


# ---------------------------------------------------------------------------------------------- library seams
# Benchmarks reach kvplug's library here when more than one script needs the same thing.

def engine_facts(llm) -> dict:
    """What the engine really runs with (the cudagraph mode after vLLM's own downgrades, KV capacity)."""
    try:
        cfg = llm.llm_engine.vllm_config
    except AttributeError:
        return {}
    cc, cache, parallel = cfg.compilation_config, cfg.cache_config, getattr(cfg, "parallel_config", None)
    blocks = getattr(cache, "num_gpu_blocks", None)
    return {"cudagraph_mode": str(getattr(cc, "cudagraph_mode", None)),
            "enforce_eager": bool(getattr(cfg.model_config, "enforce_eager", False)),
            # Model Runner V2 (0.26's default for non-MoE models) and async scheduling: a host sync in a step's
            # metadata builder then waits for the previous step
            "v2_model_runner": getattr(cfg, "use_v2_model_runner", None),
            "async_scheduling": getattr(cfg.scheduler_config, "async_scheduling", None),
            "block_size": cache.block_size, "num_gpu_blocks": blocks,
            # what vLLM really ran with: the executor it chose when none was passed
            "tensor_parallel_size": getattr(parallel, "tensor_parallel_size", None),
            "distributed_executor_backend": _name_or_none(getattr(parallel, "distributed_executor_backend", None)),
            "kv_capacity_tokens": blocks * cache.block_size if blocks else None}


def _name_or_none(value: Any) -> str | None:
    """A config value for JSON: a string as is, a class by its name (vLLM may hold an executor class), None."""
    return None if value is None else value if isinstance(value, str) else getattr(value, "__name__", str(value))


def attention_impls(llm) -> list[str]:
    """The attention implementation classes the engine's workers run (needs engine_env's pickle switch)."""
    from kvplug.vllm_compat import attention_impl_names

    return sorted({c for per_worker in llm.collective_rpc(attention_impl_names) for c in per_worker})


def kvplug_attention_kwargs() -> dict:
    """LLM(...) arguments selecting kvplug's attention backend on this platform."""
    from kvplug import vllm_compat

    return vllm_compat.attention_backend_engine_kwargs()


def kvplug_connector_kwargs() -> dict:
    """LLM(...) arguments loading kvplug's offload connector."""
    from vllm.config import KVTransferConfig

    from kvplug import vllm_compat

    return {"kv_transfer_config": KVTransferConfig(**vllm_compat.kv_transfer_config())}


def connector_worker_side():
    """In an engine worker: the worker half of kvplug's connector (its counters: ``.stats``)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group().worker_side


def prepare_model(name: str | None) -> Path:
    """A prepared model folder as is, else kvplug's model by name (its default model when None)."""
    if name and Path(name).is_dir():
        return Path(name)
    from kvplug import models

    return models.prepare(name) if name else models.prepare()


def _cases_by_length(model_path, tasks: str, contexts: str, cases: int, turns: int, seed: int) -> Iterator[tuple]:
    from benchmarks.scbench.tasks import generate_cases
    from benchmarks.scbench.tokenizer import load_counter

    count, _ = load_counter(str(model_path))
    for task in tasks.split(","):
        for ctx in (int(c) for c in contexts.split(",")):
            for case in generate_cases(task, seed=seed, sessions=cases, context_tokens=ctx, turns=turns,
                                       count_tokens=count):
                yield task, ctx, case


def scbench_cases(model_path: str | Path, tasks: str, contexts: str, cases: int, turns: int, seed: int) -> list:
    """SCBench-style cases (benchmarks/scbench) for every (task, context length) of the comma lists, sized with
    the model's tokenizer."""
    return [case for _, _, case in _cases_by_length(model_path, tasks, contexts, cases, turns, seed)]


def question_items(model_path: str | Path, tasks: str, contexts: str, cases: int, turns: int, seed: int,
                   multi_turn: bool = False) -> list[dict]:
    """The same cases, one chat per question with its answer: context + question (single turn), or with
    ``multi_turn`` the conversation so far (earlier questions answered with their reference answers, so every
    engine and budget sees the same history) followed by the question."""
    items = []
    for task, ctx, case in _cases_by_length(model_path, tasks, contexts, cases, turns, seed):
        history: list[dict] = []
        for t, turn in enumerate(case.multi_turns):
            ask = {"role": "user", "content": (case.context + "\n\n" if not history else "") + turn.input}
            messages = history + [ask] if multi_turn else [
                {"role": "user", "content": case.context + "\n\n" + turn.input}]
            items.append({"case": case.id, "task": task, "context_tokens": ctx, "turn": t, "messages": messages,
                          "answer": turn.answer, "scorer": turn.scorer})
            reference = turn.answer if isinstance(turn.answer, str) else ", ".join(map(str, turn.answer)) \
                if isinstance(turn.answer, list) else str(turn.answer)
            history = history + [ask, {"role": "assistant", "content": reference}]
    return items



# ------------------------------------------------------------------------------------------- answer budgets
# Scorers that match the whole reference answer: an answer cut at its token budget can never score under them
# (first_number reads only the first number, so a cut answer may still score there).
WHOLE_ANSWER_SCORERS = frozenset({"substring", "all_of_set"})


def task_budgets_text() -> str:
    """Every task's own answer budget, for --max-tokens help: 'kv 96, math_find 16, ...'."""
    from benchmarks.scbench.tasks import budgets_text

    return budgets_text()


def answer_budgets(tasks: str, max_tokens: int | None) -> dict[str, int]:
    """New tokens an answer may take, per task of the comma list ``tasks``: ``max_tokens`` (the user's
    --max-tokens) where given, else the task's own budget from the registry (a kv answer is a 36-character UUID:
    16 tokens cut it)."""
    from benchmarks.scbench.tasks import TASKS

    return {t: TASKS[t].default_max_tokens if max_tokens is None else max_tokens for t in tasks.split(",")}


def cut_at_budget(outs) -> list[bool]:
    """Per vLLM RequestOutput: whether its answer stopped at its token budget (finish_reason "length") instead
    of ending."""
    return [o.outputs[0].finish_reason == "length" for o in outs]


def count_cut(where: str, cut: Sequence[bool], scorers: Sequence[str]) -> int:
    """How many answers stopped at their token budget; a warning line on stderr when any of them is scored on the
    whole answer (``scorers``, one per answer), which a cut answer cannot match: its 0 says nothing of the model."""
    whole = sum(c and s in WHOLE_ANSWER_SCORERS for c, s in zip(cut, scorers))
    if whole:
        print(f"WARNING [{where}]: {whole} of {len(cut)} answers stopped at their max tokens and are scored on the "
              "whole answer: they cannot score (raise --max-tokens)", file=sys.stderr, flush=True)
    return sum(cut)

# ---------------------------------------------------------------------------------------------- process trees
# A server or benchmark script runs in a session of its own, so that stopping it reaches the processes it
# started. Not all of them share its process group: ``kvplug serve`` starts vLLM's API server in a session of
# its own (serving/processes.py), with the engine core and workers under it. vLLM's engine core does not watch
# its parent: if the API server dies without its orderly shutdown (killed, or SIGTERM'd before its handlers are
# in place), the engine core lives on and keeps its memory. So a stop also looks the tree up in /proc while the
# top process lives (once it is gone, its orphans are no longer its descendants) and kills what is left of it.

def _proc_stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a live process from /proc (Linux), None if there is none."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    except (OSError, IndexError):
        return None
    return int(fields[1]), fields[0], int(fields[19])


def child_pids(pid: int) -> list[int]:
    """The pids of ``pid``'s children, from /proc (empty where there is no /proc)."""
    with contextlib.suppress(OSError):
        return [int(e) for e in os.listdir("/proc") if e.isdigit() and (_proc_stat(int(e)) or (0,))[0] == pid]
    return []


def process_tree(pid: int) -> dict[int, int]:
    """``pid``'s descendants, pid -> start time (a pid reused later has another start time)."""
    parents: dict[int, list[tuple[int, int]]] = {}
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if entry.isdigit() and (stat := _proc_stat(int(entry))):
                parents.setdefault(stat[0], []).append((int(entry), stat[2]))
    tree, todo = {}, [pid]
    while todo:
        for child, started in parents.get(todo.pop(), []):
            if child not in tree:
                tree[child] = started
                todo.append(child)
    return tree


def _still_running(pid: int, started: int) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[2] == started and stat[1] != "Z"  # a zombie has ended


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def start_session(cmd: Sequence[str], log_path: Path, env: dict | None = None,
                  cwd: str | Path | None = None) -> subprocess.Popen:
    """``cmd`` in a session (and process group) of its own, stdout and stderr into ``log_path``."""
    with open(log_path, "w") as log:
        return subprocess.Popen(list(cmd), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
                                env=dict(os.environ) if env is None else env, start_new_session=True)


def stop_process_tree(proc: subprocess.Popen, grace_s: float, kill_wait_s: float = 10) -> None:
    """Stop ``proc`` (started by ``start_session``) and every process it started: SIGTERM to its process group,
    up to ``grace_s`` for the group and its descendants to end (their own orderly shutdown), then SIGKILL to
    the group and to each descendant left, and up to ``kill_wait_s`` for them to go."""
    tree = process_tree(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)

    def left() -> list[int]:
        if proc.poll() is None:
            tree.update(process_tree(proc.pid))
        return [pid for pid, started in tree.items() if _still_running(pid, started)]

    def done() -> bool:
        return not left() and proc.poll() is not None and not _group_alive(proc.pid)

    for wait_s, last in ((grace_s, False), (kill_wait_s, True)):
        deadline = time.monotonic() + wait_s
        while not done() and time.monotonic() < deadline:
            time.sleep(0.1)
        if last or done():
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in left():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=1)


# ---------------------------------------------------------------------------------------------------- servers

KVPLUG_CLI = [sys.executable, "-m", "kvplug.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_request(method: str, url: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict, str]:
    """(status, headers with lower-case names, text) of a JSON request, with the standard library (a GPU host
    may lack httpx); an HTTP error status is an answer, a connection that fails raises OSError."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read().decode(errors="replace")


class Server(NamedTuple):
    base: str  # http://127.0.0.1:PORT
    proc: subprocess.Popen
    command: str  # as a user would type it: kvplug serve ...
    log_path: Path


def log_tail(path: str | Path, chars: int = 4000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def health_failure(server: Server, timeout_s: float) -> str | None:
    """Waits for ``server``'s /health to answer 200: None once it does, else why it did not (the server exited,
    or ``timeout_s`` passed), for a caller that reports rather than stops (``serve_kvplug`` raises it)."""
    import http.client

    deadline = time.monotonic() + timeout_s
    while True:
        if server.proc.poll() is not None:
            return f"kvplug serve exited {server.proc.returncode} before /health answered"
        if time.monotonic() > deadline:
            return f"/health did not answer within {timeout_s:.0f} s"
        with contextlib.suppress(OSError, http.client.HTTPException):
            if http_request("GET", server.base + "/health", timeout=5)[0] == 200:
                return None
        time.sleep(0.5)


@contextlib.contextmanager
def kvplug_server(args: Sequence[str], log_path: Path, env: dict | None = None, cwd: str | Path | None = None,
                  stop_timeout_s: float = 60, tag: str = "bench") -> Iterator[Server]:
    """``kvplug serve ARGS --port P`` on a free port in a session of its own, output into ``log_path``; yields it
    as soon as it started (``health_failure`` waits for it), stops it and all it started on exit."""
    port = free_port()
    args = [*args, "--port", str(port)]
    command = "kvplug serve " + " ".join(args)
    print(f"[{tag}] {command}", file=sys.stderr, flush=True)
    proc = start_session([*KVPLUG_CLI, "serve", *args], log_path, env=env, cwd=cwd)
    try:
        yield Server(f"http://127.0.0.1:{port}", proc, command, Path(log_path))
    finally:
        stop_process_tree(proc, stop_timeout_s)


@contextlib.contextmanager
def serve_kvplug(args: Sequence[str], log_path: Path, env: dict | None = None, timeout_s: float = 900,
                 stop_timeout_s: float = 60, tag: str = "bench", cwd: str | Path | None = None) -> Iterator[Server]:
    """``kvplug_server`` once /health answers; SystemExit (with the log's tail) if the server exits or is late."""
    with kvplug_server(args, log_path, env=env, cwd=cwd, stop_timeout_s=stop_timeout_s, tag=tag) as server:
        if why := health_failure(server, timeout_s):
            raise SystemExit(f"[{tag}] {why}; log {log_path}:\n{log_tail(log_path)}")
        yield server


def run_kvplug(argv: Sequence[str]) -> subprocess.CompletedProcess:
    """``kvplug ARGV`` (e.g. ``bench run ...``) in a subprocess of this Python, output streaming through."""
    return subprocess.run([*KVPLUG_CLI, *argv], text=True)


def scrape_samples(base: str, prefixes: tuple[str, ...] = ("kvplug",), timeout: float = 30) -> list[dict]:
    """Samples of ``base``/metrics whose name starts with one of ``prefixes``: ``{"name", "labels", "value"}``."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(base + "/metrics", timeout=timeout).text
    return [{"name": s.name, "labels": s.labels, "value": s.value}
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name.startswith(prefixes)]


# ------------------------------------------------------------------------------------------------------ plots

def pyplot():
    """matplotlib.pyplot on the Agg backend (files only; matplotlib is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int) -> None:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def scaled_config(cfg, factor: float):
    """``cfg`` (head_config.PatternConfig) with every head's length-proportional budgets times ``factor``; the
    recall/density the search recorded no longer apply and are dropped."""
    import msgspec

    from attention_backends.sparse_prefill import head_config
    from attention_backends.sparse_prefill.patterns import registry

    def scale(hp):
        if hp.pattern == registry.DENSE:
            return head_config.HeadPattern(pattern=hp.pattern)
        budgets = head_config.scaled_budgets(hp.pattern, registry.get(hp.pattern).check_budgets(hp.budgets), factor)
        return head_config.HeadPattern(pattern=hp.pattern, budgets=budgets)

    return msgspec.structs.replace(
        cfg, default=scale(cfg.default), calibration={**cfg.calibration, "budgets_scaled_by": factor},
        layers={li: {h: scale(hp) for h, hp in heads.items()} for li, heads in cfg.layers.items()}).validate()
