"""Block summaries inside the memory vLLM sizes its KV cache from.

vLLM sizes the KV cache from what is left after the model: on CUDA, ``gpu_memory_utilization`` x total minus
weights, peak activations and non-torch memory measured while profiling; on the CPU, the requested share of the
node minus the process's RSS. Summaries allocated later, beside a cache that already fills that share, push the
process past it (on an 80 GB H100 `kvplug serve` died with an OOM while warming up the sampler).

So the backend reserves the summaries' share *before* vLLM measures: once per process, on the first profiling
step (CUDA) or when the first attention layer is built (CPU, which profiles only when compiling), a buffer of
``R = M * s / (1 + s)`` bytes, where ``M`` bounds the KV cache vLLM may size (requested memory minus what is in
use now) and ``s`` is summary bytes per KV byte. vLLM then sizes the cache from ``M - R`` or less, so its
summaries (``s`` x the cache) fit in ``R``; each layer carves its summaries out of the buffer. With an explicit
``kv_cache_memory_bytes`` the cache is that size and ``R`` is exactly its summaries (extra to the explicit size).
"""
from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass

import torch

ALIGN = 256
log = logging.getLogger("vllm.kvplug.retrieval_decode")


@dataclass
class Reservation:
    buffer: torch.Tensor  # uint8, flat
    offset: int = 0
    carved_layers: int = 0
    overflow_layers: int = 0  # layers whose summaries did not fit (allocated outside: counted, warned)

    # Other per-layer state reserved beside the summaries (selection-reuse stores): bytes carved / not fitting.
    extra_bytes: int = 0
    extra_overflow: int = 0
    planned_extra_bytes: int = 0  # what the reservation holds for them (their largest size, every layer)

    def take(self, nbytes: int, summaries: bool = True) -> torch.Tensor | None:
        start = -(-self.offset // ALIGN) * ALIGN
        if start + nbytes > self.buffer.numel():
            if summaries:
                self.overflow_layers += 1
            else:
                self.extra_overflow += 1
            return None
        self.offset = start + nbytes
        if summaries:
            self.carved_layers += 1
        else:
            self.extra_bytes += nbytes
        return self.buffer[start:start + nbytes]


_lock = threading.Lock()
_RESERVATION: Reservation | None = None


def summary_bytes_per_kv_byte(block_size: int, kv_element_size: int, summary_element_size: int) -> float:
    """Per block and kv-head: K and V hold 2 x block_size x head_dim elements, the summary kmin + kmax 2 x head_dim."""
    return summary_element_size / (block_size * kv_element_size)


def reservation_bytes(kv_bound_bytes: int, ratio: float, explicit: bool, fixed_bytes: int = 0) -> int:
    """``fixed_bytes``: summary bytes no KV byte pays for (each layer's padding row and its alignment)."""
    if kv_bound_bytes <= 0:
        return 0
    if explicit:  # the cache is exactly this size; the summaries are on top of it
        return math.ceil(kv_bound_bytes * ratio) + fixed_bytes + 64 * ALIGN
    return math.ceil(kv_bound_bytes * ratio / (1.0 + ratio)) + fixed_bytes + 64 * ALIGN


def selection_store_bytes(layers: int, capacity: int, kv_heads: int, slots: int, element_size: int) -> int:
    """Selection reuse (reselect_interval > 1) keeps each decode row's last selection per layer: [capacity, kv heads,
    slots] indices, reserved with the summaries so vLLM sizes its cache around them too."""
    return layers * (capacity * kv_heads * slots * element_size + ALIGN)


def fixed_summary_bytes(layers: int, padding_row_bytes: int) -> int:
    """Per layer, the summaries hold one row more than the cache has blocks (it absorbs padded tokens) and start
    on an ALIGN boundary: without this, an explicit cache size left the last layer outside the reservation
    (vLLM 0.34 on the H100: 31 of 32 layers reserved, 2026-12-07)."""
    return layers * (padding_row_bytes + ALIGN)


def reserve(kv_bound_bytes: int, explicit: bool, ratio: float, device: torch.device | str,
            fixed_bytes: int = 0, extra_bytes: int = 0) -> Reservation | None:
    """Once per process: the summaries' share (+ ``extra_bytes`` for other per-layer state: selection-reuse
    stores), allocated (and touched, so the CPU's RSS counts it) now."""
    global _RESERVATION
    with _lock:
        if _RESERVATION is None:
            n = reservation_bytes(kv_bound_bytes, ratio, explicit, fixed_bytes)
            if n <= 0:
                return None
            n += extra_bytes
            buf = torch.empty(n, dtype=torch.uint8, device=device)
            buf.fill_(0)  # a fresh CPU allocation is not resident until written
            _RESERVATION = Reservation(buf, planned_extra_bytes=extra_bytes)
            log.info("kvplug retrieval decode: reserved %.2f GiB for block summaries%s before vLLM sizes its KV "
                     "cache (KV bound %.2f GiB, %s, %.4f summary bytes per KV byte)", n / 2**30,
                     f" and {extra_bytes / 2**30:.2f} GiB of selection stores" if extra_bytes else "",
                     kv_bound_bytes / 2**30, "explicit size" if explicit else "profiled", ratio)
        return _RESERVATION


def current() -> Reservation | None:
    return _RESERVATION


def carve(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of the reservation for one layer's summaries, or None (nothing reserved, or it is used up)."""
    with _lock:
        return None if _RESERVATION is None else _RESERVATION.take(nbytes)


def carve_extra(nbytes: int) -> torch.Tensor | None:
    """``nbytes`` of the reservation for other per-layer state (a selection-reuse store), or None."""
    with _lock:
        return None if _RESERVATION is None else _RESERVATION.take(nbytes, summaries=False)


def snapshot() -> dict[str, int]:
    r = _RESERVATION
    if r is None:
        return {"reserved_bytes": 0, "reserved_used_bytes": 0, "reserved_layers": 0, "unreserved_layers": 0,
                "reserved_for_stores_bytes": 0, "reserved_store_bytes": 0, "unreserved_stores": 0}
    return {"reserved_bytes": r.buffer.numel(), "reserved_used_bytes": r.offset, "reserved_layers": r.carved_layers,
            "unreserved_layers": r.overflow_layers, "reserved_for_stores_bytes": r.planned_extra_bytes,
            "reserved_store_bytes": r.extra_bytes, "unreserved_stores": r.extra_overflow}


def reset_for_tests() -> None:
    global _RESERVATION
    with _lock:
        _RESERVATION = None
