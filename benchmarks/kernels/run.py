"""Shape sweep over registered kernels -> JSON report.

``kvplug bench kernels ...`` and ``python -m benchmarks.kernels.run ...`` (the
latter needs only torch, e.g. on a GPU box without vLLM) share :func:`add_arguments`
and :func:`run_from_args`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
from pathlib import Path
from typing import Callable

from . import KERNEL_SHAPES, KERNELS
from benchmarks.harness import time_cuda


class KernelError(ValueError):
    pass


def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise KernelError(f"--device: {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KernelError(f"--device {device}: CUDA is not available")
    if dtype == "auto":
        dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    else:
        dt = getattr(torch, dtype)
    return dev, dt


def run_kernels(which: list[str], warmup: int = 3, iters: int = 10, device: str = "auto",
                dtype: str = "auto", shapes: list[dict] | None = None,
                log: Callable[[str], None] | None = None) -> dict:
    import torch

    dev, dt = _device_and_dtype(device, dtype)
    results = []
    for name in which:
        if name not in KERNELS:
            raise KernelError(f"unknown kernel {name!r}")
        for shape in (shapes if shapes is not None else KERNEL_SHAPES[name]):
            rec = {"kernel": name, "shape": shape, "device": str(dev), "dtype": str(dt).replace("torch.", "")}
            try:
                fn = KERNELS[name](shape, dev, dt)
                rec.update(time_cuda(fn, warmup=warmup, iters=iters, device=str(dev)))
                sec = rec["median_ms"] / 1000.0
                if getattr(fn, "flops", None):
                    rec["tflops"] = fn.flops / sec / 1e12
                if getattr(fn, "bytes", None):
                    rec["gbps"] = fn.bytes / sec / 1e9
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                # e.g. out of memory or a shape the kernel does not support
                rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            if log:
                med = rec.get("median_ms")
                log(f"{name} {shape}: " + (f"{med:.3f} ms" if med is not None else rec.get("error", "")))
            results.append(rec)
    env = {
        "torch": torch.__version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "cuda": torch.version.cuda,
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
    }
    return {"kind": "kvplug-kernel-bench", "version": 1, "environment": env,
            "warmup": warmup, "iters": iters, "results": results}


def add_arguments(k: argparse.ArgumentParser) -> None:
    k.add_argument("--which", action="append", default=None, metavar="KERNEL",
                   help=f"kernel to run (repeatable; registered: {', '.join(sorted(KERNELS))}; "
                   "default: all)")
    k.add_argument("--warmup", type=int, default=3, help="untimed calls per shape (default 3)")
    k.add_argument("--iters", type=int, default=10, help="timed calls per shape (default 10)")
    k.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    k.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="default: bfloat16 on CUDA, float32 on CPU")
    k.add_argument("--shapes", default=None, metavar="JSON",
                   help="JSON list of shape dicts overriding the kernel's default sweep")
    k.add_argument("--out", default=None,
                   help="JSON output file (default results/kernels-<timestamp>.json)")
    k.add_argument("--list", action="store_true", help="list kernels and their default shapes")


def run_from_args(args, log: Callable[[str], None]) -> int:
    """Run the sweep the parsed ``args`` ask for; bad input raises :class:`KernelError`."""
    if args.list:
        for name in sorted(KERNELS):
            print(f"{name}: {json.dumps(KERNEL_SHAPES.get(name, []))}")
        return 0
    if args.warmup < 0 or args.iters < 1:
        raise KernelError(f"--warmup must be >= 0 and --iters >= 1 (got {args.warmup}, {args.iters})")
    which = args.which or sorted(KERNELS)
    unknown = [w for w in which if w not in KERNELS]
    if unknown:
        raise KernelError(f"--which: unknown kernel {unknown[0]!r} "
                          f"(registered: {', '.join(sorted(KERNELS))})")
    shapes = None
    if args.shapes:
        try:
            shapes = json.loads(args.shapes)
            if not isinstance(shapes, list) or not all(isinstance(s, dict) for s in shapes):
                raise ValueError("expected a JSON list of objects")
        except ValueError as e:
            raise KernelError(f"--shapes: {e}") from None
    report = run_kernels(which, warmup=args.warmup, iters=args.iters, device=args.device,
                         dtype=args.dtype, shapes=shapes, log=log)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out) if args.out else Path("results") / f"kernels-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    for r in report["results"]:
        extra = f", {r['tflops']:.2f} TFLOP/s" if r.get("tflops") else ""
        err = f" ERROR {r['error']}" if r.get("error") else ""
        med = "–" if r.get("median_ms") is None else f"{r['median_ms']:.3f} ms"
        print(f"{r['kernel']} {json.dumps(r['shape'])}: {med}{extra}{err}")
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.kernels.run",
                                description="Attention kernel microbenchmarks (JSON out).")
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run_from_args(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    except KernelError as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
