"""Scheduler-side tier plan: which tier holds each entry, and what to evict, over an ordered list of tiers.

Tiers are exclusive and ordered (fastest first): a new entry goes to the first tier it fits in; that tier's
eviction victims are demoted to the next tier (or dropped from the last one), whose victims go on down the
same way. A store that cannot fit anywhere is skipped: a full tier evicts, it never fails a request. The plan
is a list of TierOps the worker side executes in order, so both sides agree on contents without sharing
memory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from offload.tiers.eviction import EvictionIndex

STORE, DEMOTE, DROP = "store", "demote", "drop"


@dataclass(frozen=True)
class TierOp:
    kind: str  # STORE into ``tier`` | DEMOTE from ``tier`` to ``to`` | DROP from ``tier``
    key: str
    tier: str
    to: str = ""


def store(tier: str, key: str) -> TierOp:
    return TierOp(STORE, key, tier)


def demote(key: str, src: str, dst: str) -> TierOp:
    return TierOp(DEMOTE, key, src, dst)


def drop(tier: str, key: str) -> TierOp:
    return TierOp(DROP, key, tier)


@dataclass(frozen=True)
class TierBudget:
    name: str
    capacity_bytes: int  # 0: the tier is off
    entry_overhead: int = 0  # bytes an entry takes beyond its payload (a disk file's header)


@dataclass
class TierStats:
    hits: dict[str, int] = field(default_factory=dict)
    misses: int = 0
    evictions: dict[str, int] = field(default_factory=dict)
    skipped_stores: int = 0


class TierPlanner:
    def __init__(self, tiers: Sequence[TierBudget], reuse_weight: float = 0.0,
                 existing: Mapping[str, Mapping[str, int]] | None = None) -> None:
        self.tiers = list(tiers)
        self._index = [EvictionIndex(t.capacity_bytes, reuse_weight) if t.capacity_bytes > 0 else None
                       for t in self.tiers]
        self.stats = TierStats(hits={t.name: 0 for t in self.tiers}, evictions={t.name: 0 for t in self.tiers})
        # Entries a previous run left in persistent tiers (sizes as stored); trimmed to the configured size.
        self._startup_ops: list[TierOp] = []
        for name, entries in (existing or {}).items():
            i = self._position(name)
            index = self._index[i]
            for key, size in entries.items():
                if index is None or not index.fits(size):
                    self._startup_ops.append(drop(name, key))
                    continue
                for victim, _, _ in index.add(key, size):
                    self.stats.evictions[name] += 1
                    self._startup_ops.append(drop(name, victim))

    def _position(self, name: str) -> int:
        return next(i for i, t in enumerate(self.tiers) if t.name == name)

    def take_startup_ops(self) -> list[TierOp]:
        ops, self._startup_ops = self._startup_ops, []
        return ops

    def _locate(self, key: str) -> int | None:
        for i, index in enumerate(self._index):
            if index is not None and key in index:
                return i
        return None

    def where(self, key: str) -> str | None:
        i = self._locate(key)
        return None if i is None else self.tiers[i].name

    def record_hit(self, key: str) -> str | None:
        i = self._locate(key)
        if i is None:
            self.stats.misses += 1
            return None
        self._index[i].touch(key)  # type: ignore[union-attr]
        name = self.tiers[i].name
        self.stats.hits[name] += 1
        return name

    def forget(self, key: str) -> None:
        """The worker found the entry unreadable (corrupt): it no longer exists anywhere."""
        for index in self._index:
            if index is not None:
                index.remove(key)

    def _place(self, i: int, key: str, payload_bytes: int, reuses: int, op: TierOp, ops: list[TierOp]) -> bool:
        """Put ``key`` into tier ``i`` (its victims demoted further down, or dropped), then ``op``."""
        if i >= len(self.tiers) or self._index[i] is None:
            return False
        tier, index = self.tiers[i], self._index[i]
        if not index.fits(payload_bytes + tier.entry_overhead):
            return False
        for victim, size, victim_reuses in index.add(key, payload_bytes + tier.entry_overhead, reuses):
            self.stats.evictions[tier.name] += 1
            # Size and reuse count travel with a demoted entry, so a hot context stays hot further down.
            below = self.tiers[i + 1].name if i + 1 < len(self.tiers) else ""
            if not self._place(i + 1, victim, size - tier.entry_overhead, victim_reuses,
                               demote(victim, tier.name, below), ops):
                ops.append(drop(tier.name, victim))
        ops.append(op)
        return True

    def plan_store(self, key: str, nbytes: int) -> list[TierOp]:
        """Ops that store ``key`` (evictions first); [] when it is already stored or fits nowhere."""
        if self.where(key) is not None:
            return []
        ops: list[TierOp] = []
        for i, tier in enumerate(self.tiers):
            if self._place(i, key, nbytes, 0, store(tier.name, key), ops):
                return ops
        self.stats.skipped_stores += 1
        return []
