"""Kernel microbenchmarks for the attention backends.

Registry contract::

    KERNELS[name] = factory
    factory(shape: dict, device: torch.device, dtype: torch.dtype) -> fn
        prepares inputs for ``shape`` and returns a zero-argument callable to
        time.  ``fn.flops`` / ``fn.bytes`` (optional attributes) turn the
        timing into TFLOP/s / GB/s in the report.
    KERNEL_SHAPES[name] = [shape, ...]   # the default sweep

Register with :func:`register`; ``dense_attention`` (torch SDPA) is the first
kernel.  Timing lives in :mod:`benchmarks.harness` (CUDA events on GPU, perf_counter on
CPU); :mod:`.run` sweeps shapes and builds the JSON report.
"""

from __future__ import annotations

from typing import Callable

KERNELS: dict[str, Callable] = {}
KERNEL_SHAPES: dict[str, list[dict]] = {}


def register(name: str, shapes: list[dict]):
    def deco(factory):
        if name in KERNELS:
            raise ValueError(f"kernel {name!r} registered twice")
        KERNELS[name] = factory
        KERNEL_SHAPES[name] = list(shapes)
        return factory
    return deco


from . import dense_attention  # noqa: E402,F401  (registers dense-attention)
