"""The ``offload`` config section: the tiers' budgets and the eviction order."""
from __future__ import annotations

import os

from kvplug.config import KvplugConfigError, Section, check_finite, parse_size

SECTION = "offload"
MIN_LOAD_STAGING_BYTES = 1 << 20


class OffloadConfig(Section):
    """CPU and disk tiers for evicted prefix KV blocks, through kvplug's KV connector (offload/connector.py).

    ``kvplug serve --offload cpu:8GiB,disk:/path:100GiB`` fills these. ``disk_path`` empty = no disk tier.
    Eviction: least recently used first, where each reuse of an entry counts as ``reuse_weight`` extra
    recent accesses (0 = plain LRU), so shared contexts many requests come back to outlive one-off prompts.
    """

    enabled: bool = False
    cpu_size: str | int = "8GiB"  # bytes, or with a unit: 8GiB, 500MB
    disk_path: str = ""
    disk_size: str | int = "100GiB"
    reuse_weight: float = 8.0
    # Pins (kvplug_pin, POST /kvplug/cache/pin) may hold at most this fraction of each tier; a pin past it is
    # refused (reported, counted), never a failed request.
    max_pinned_fraction: float = 0.5
    # GET /kvplug/cache shows no prompt text by default; > 0: the first N token ids of each prefix.
    inventory_prompt_tokens: int = 0
    # CUDA loads: copy layer l + 1 host -> device while layer l is decoded and scattered (two side streams),
    # through a staging ring of load_staging_size bytes of device memory per worker, allocated once when the
    # KV caches register (two slots; a slot holds one layer of a 32K-token Llama-3-8B context at full
    # precision, 128 MiB; a larger layer is staged in parts). false: copy, decode and scatter on one stream,
    # with no ring. Ignored on CPU (no streams). Off until the H100 shows its bytes equal and its gain
    # (DEVELOPERS.md item 2h: tested on the CPU with simulated streams only).
    load_overlap: bool = False
    load_staging_size: str | int = "320MiB"

    def __post_init__(self) -> None:
        check_finite(self, SECTION)
        cpu = parse_size(self.cpu_size, f"{SECTION}.cpu_size")
        disk = parse_size(self.disk_size, f"{SECTION}.disk_size")
        if self.disk_path and disk == 0:
            raise KvplugConfigError(f"{SECTION}.disk_size: a disk tier at {self.disk_path!r} needs a size > 0")
        if self.enabled and cpu == 0 and not self.disk_path:
            raise KvplugConfigError(f"{SECTION}: enabled with no tier (cpu_size is 0 and disk_path is empty)")
        if not 0 <= self.max_pinned_fraction <= 1:
            raise KvplugConfigError(f"{SECTION}.max_pinned_fraction: must be within [0, 1], got "
                                    f"{self.max_pinned_fraction}")
        if self.inventory_prompt_tokens < 0:
            raise KvplugConfigError(f"{SECTION}.inventory_prompt_tokens: must be >= 0, got "
                                    f"{self.inventory_prompt_tokens}")
        staging = parse_size(self.load_staging_size, f"{SECTION}.load_staging_size")
        if self.load_overlap and staging < MIN_LOAD_STAGING_BYTES:
            raise KvplugConfigError(f"{SECTION}.load_staging_size: at least 1MiB with load_overlap (two slots, "
                                    f"each holding one block of a layer at least), got {self.load_staging_size!r}")
        if self.reuse_weight < 0:
            raise KvplugConfigError(f"{SECTION}.reuse_weight: must be >= 0, got {self.reuse_weight}")
        if self.disk_path:
            # Relative paths would depend on each process's cwd (engine core, workers, Ray actors).
            if not os.path.isabs(self.disk_path):
                raise KvplugConfigError(f"{SECTION}.disk_path: must be an absolute path, got {self.disk_path!r}")
            if os.path.exists(self.disk_path) and not os.path.isdir(self.disk_path):
                raise KvplugConfigError(f"{SECTION}.disk_path: {self.disk_path!r} exists and is not a directory")

    @property
    def cpu_bytes(self) -> int:
        return parse_size(self.cpu_size, f"{SECTION}.cpu_size")

    @property
    def load_staging_bytes(self) -> int:
        return parse_size(self.load_staging_size, f"{SECTION}.load_staging_size")

    @property
    def disk_bytes(self) -> int:
        return parse_size(self.disk_size, f"{SECTION}.disk_size") if self.disk_path else 0
