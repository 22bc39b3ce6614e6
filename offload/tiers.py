"""Scheduler-side tier plan: which entries are in the CPU tier, which on disk, and what to evict.

Tiers are exclusive: a new entry goes to the CPU tier; when that is full, its eviction victims are demoted
to disk (or dropped when there is no disk tier); when the disk is full, its victims are deleted. A store
that cannot fit anywhere is skipped: a full tier evicts, it never fails a request. The plan is a list of
TierOps the worker side executes in order, so both sides agree on contents without sharing memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from offload.eviction import EvictionIndex

CPU, DISK = "cpu", "disk"
DISK_HEADER_ALLOWANCE = 1024  # bytes per entry file beyond its payload (header JSON)


@dataclass(frozen=True)
class TierOp:
    kind: str  # store_cpu | store_disk | demote | drop_cpu | drop_disk
    key: str


@dataclass
class TierStats:
    hits: dict[str, int] = field(default_factory=lambda: {CPU: 0, DISK: 0})
    misses: int = 0
    evictions: dict[str, int] = field(default_factory=lambda: {CPU: 0, DISK: 0})
    skipped_stores: int = 0


class TierPlanner:
    def __init__(self, cpu_bytes: int, disk_bytes: int = 0, reuse_weight: float = 0.0,
                 disk_entries: dict[str, int] | None = None) -> None:
        self.cpu = EvictionIndex(cpu_bytes, reuse_weight)
        self.disk = EvictionIndex(disk_bytes, reuse_weight) if disk_bytes > 0 else None
        self.stats = TierStats()
        # Entries a previous run left on disk (the tier survives restarts); trim to the configured size.
        self._startup_ops: list[TierOp] = []
        for key, size in (disk_entries or {}).items():
            if self.disk is None or not self.disk.fits(size):
                self._startup_ops.append(TierOp("drop_disk", key))
                continue
            for victim, _, _ in self.disk.add(key, size):
                self.stats.evictions[DISK] += 1
                self._startup_ops.append(TierOp("drop_disk", victim))

    def take_startup_ops(self) -> list[TierOp]:
        ops, self._startup_ops = self._startup_ops, []
        return ops

    def where(self, key: str) -> str | None:
        if key in self.cpu:
            return CPU
        if self.disk is not None and key in self.disk:
            return DISK
        return None

    def record_hit(self, key: str) -> str | None:
        tier = self.where(key)
        if tier == CPU:
            self.cpu.touch(key)
        elif tier == DISK:
            self.disk.touch(key)  # type: ignore[union-attr]
        if tier is None:
            self.stats.misses += 1
        else:
            self.stats.hits[tier] += 1
        return tier

    def forget(self, key: str) -> None:
        """The worker found the entry unreadable (corrupt): it no longer exists anywhere."""
        self.cpu.remove(key)
        if self.disk is not None:
            self.disk.remove(key)

    def _to_disk(self, key: str, nbytes: int, reuses: int, kind: str, ops: list[TierOp]) -> bool:
        size = nbytes + DISK_HEADER_ALLOWANCE
        if self.disk is None or not self.disk.fits(size):
            return False
        for victim, _, _ in self.disk.add(key, size, reuses):
            self.stats.evictions[DISK] += 1
            ops.append(TierOp("drop_disk", victim))
        ops.append(TierOp(kind, key))
        return True

    def plan_store(self, key: str, nbytes: int) -> list[TierOp]:
        """Ops that store ``key`` (evictions first); [] when it is already stored or fits nowhere."""
        if self.where(key) is not None:
            return []
        ops: list[TierOp] = []
        if self.cpu.fits(nbytes):
            for victim, size, reuses in self.cpu.add(key, nbytes):
                self.stats.evictions[CPU] += 1
                # Size and reuse count travel with a demoted entry, so a hot context stays hot on disk.
                if not self._to_disk(victim, size, reuses, "demote", ops):
                    ops.append(TierOp("drop_cpu", victim))
            ops.append(TierOp("store_cpu", key))
            return ops
        if self._to_disk(key, nbytes, 0, "store_disk", ops):
            return ops
        self.stats.skipped_stores += 1
        return []
