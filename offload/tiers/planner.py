"""Scheduler-side tier plan: which tier holds each entry, and what to evict, over an ordered list of tiers.

Tiers are exclusive and ordered (fastest first): a new entry goes to the first tier it fits in; that tier's
eviction victims are demoted to the next tier (or dropped from the last one), whose victims go on down the
same way. A store that cannot fit anywhere is skipped: a full tier evicts, it never fails a request. The plan
is a list of TierOps the worker side executes in order, so both sides agree on contents without sharing
memory.

Pins (``pin``): a pinned entry is never a victim until its pin expires; pins of a tier may take at most
``max_pinned_fraction`` of it, so unpinned traffic keeps room. Where a disk tier follows, pinning a CPU entry
also copies it there (COPY: both tiers hold it), so a pin survives a restart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from offload.tiers.eviction import DEFAULT_PRIORITY, EvictionIndex

STORE, DEMOTE, DROP, COPY = "store", "demote", "drop", "copy"


@dataclass(frozen=True)
class TierOp:
    kind: str  # STORE into ``tier`` | DEMOTE from ``tier`` to ``to`` | DROP from ``tier`` | COPY ``tier`` -> ``to``
    key: str
    tier: str
    to: str = ""


def store(tier: str, key: str) -> TierOp:
    return TierOp(STORE, key, tier)


def demote(key: str, src: str, dst: str) -> TierOp:
    return TierOp(DEMOTE, key, src, dst)


def drop(tier: str, key: str) -> TierOp:
    return TierOp(DROP, key, tier)


def copy(key: str, src: str, dst: str) -> TierOp:
    return TierOp(COPY, key, src, dst)


class PinRefused(Exception):
    """A pin that would take a tier's pinned entries past its pin budget (the message says which)."""

    def __init__(self, message: str, tier: str) -> None:
        super().__init__(message)
        self.tier = tier


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
                 existing: Mapping[str, Mapping[str, int]] | None = None, max_pinned_fraction: float = 0.5) -> None:
        self.tiers = list(tiers)
        self.max_pinned_fraction = max_pinned_fraction
        self._index = [EvictionIndex(t.capacity_bytes, reuse_weight) if t.capacity_bytes > 0 else None
                       for t in self.tiers]
        # (position, membership test) of the tiers with a budget: where() runs for each block of a prompt, a few
        # times per step.
        self._holds = [(i, index.holds) for i, index in enumerate(self._index) if index is not None]
        self.evicted: list[tuple[str, str, str]] = []
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
                for victim, *_ in index.add(key, size):
                    self.stats.evictions[name] += 1
                    self._startup_ops.append(drop(name, victim))

    def _position(self, name: str) -> int:
        return next(i for i, t in enumerate(self.tiers) if t.name == name)

    def take_startup_ops(self) -> list[TierOp]:
        ops, self._startup_ops = self._startup_ops, []
        return ops

    def index(self, name: str) -> EvictionIndex | None:
        return self._index[self._position(name)]

    def holders(self, key: str) -> list[str]:
        """Every tier holding ``key`` (two after a pin copied a CPU entry to disk)."""
        return [t.name for t, index in zip(self.tiers, self._index) if index is not None and key in index]

    def _locate(self, key: str) -> int | None:
        for i, holds in self._holds:
            if holds(key):
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

    def _place(self, i: int, key: str, payload_bytes: int, reuses: int, op: TierOp, ops: list[TierOp],
               priority: str = DEFAULT_PRIORITY) -> bool:
        """Put ``key`` into tier ``i`` (its victims demoted further down, or dropped), then ``op``."""
        if i >= len(self.tiers) or self._index[i] is None:
            return False
        tier, index = self.tiers[i], self._index[i]
        if not index.fits(payload_bytes + tier.entry_overhead, key):
            return False
        for victim, size, victim_reuses, victim_priority in index.add(key, payload_bytes + tier.entry_overhead,
                                                                     reuses, priority):
            self.stats.evictions[tier.name] += 1
            self.evicted.append((tier.name, victim, victim_priority))
            below = self.tiers[i + 1].name if i + 1 < len(self.tiers) else ""
            if below and self._index[i + 1] is not None and victim in self._index[i + 1]:
                ops.append(drop(tier.name, victim))  # a pin copied it down already
                continue
            # Size, reuse count and class travel with a demoted entry, so a hot context stays hot further down.
            if not self._place(i + 1, victim, size - tier.entry_overhead, victim_reuses,
                               demote(victim, tier.name, below), ops, victim_priority):
                ops.append(drop(tier.name, victim))
        ops.append(op)
        return True

    def plan_store(self, key: str, nbytes: int, priority: str = DEFAULT_PRIORITY) -> list[TierOp]:
        """Ops that store ``key`` (evictions first); [] when it is already stored or fits nowhere."""
        if self.where(key) is not None:
            return []
        ops: list[TierOp] = []
        for i, tier in enumerate(self.tiers):
            if self._place(i, key, nbytes, 0, store(tier.name, key), ops, priority):
                return ops
        self.stats.skipped_stores += 1
        return []

    def take_evicted(self) -> list[tuple[str, str, str]]:
        """(tier, key, priority class) of every eviction planned since the last call."""
        out, self.evicted = self.evicted, []
        return out

    def _payload_bytes(self, i: int, key: str) -> int:
        return self._index[i].nbytes(key) - self.tiers[i].entry_overhead  # type: ignore[union-attr]

    def check_pin(self, keys: Sequence[str]) -> None:
        """PinRefused unless pinning ``keys`` keeps every tier's pinned bytes within its pin budget (counting
        the disk copies a pin makes of CPU entries)."""
        extra = [0] * len(self.tiers)
        disk = len(self.tiers) - 1 if len(self.tiers) > 1 and self._index[-1] is not None else None
        for key in keys:
            for i, index in enumerate(self._index):
                if index is not None and key in index and index.pinned_until(key) is None:
                    extra[i] += index.nbytes(key)
                    if disk is not None and i < disk and key not in self._index[disk]:
                        extra[disk] += self._payload_bytes(i, key) + self.tiers[disk].entry_overhead
        for i, (tier, index) in enumerate(zip(self.tiers, self._index)):
            if index is None or not extra[i]:
                continue
            budget = int(tier.capacity_bytes * self.max_pinned_fraction)
            index.expire_pins()
            if index.pinned_bytes + extra[i] > budget:
                raise PinRefused(f"{tier.name} tier full of pins: this pin needs {extra[i]} more bytes, "
                                 f"{index.pinned_bytes} of the tier's pin budget of {budget} bytes are pinned "
                                 f"(max_pinned_fraction {self.max_pinned_fraction} of {tier.capacity_bytes})", tier.name)

    def pin(self, keys: Sequence[str], until: float = math.inf,
            priority: str | None = None) -> list[TierOp]:
        """Pin ``keys`` (the ones stored anywhere) until ``until``; PinRefused (nothing pinned) when a tier's pin
        budget would overflow. Returns the ops that copy pinned CPU entries to the disk tier."""
        self.check_pin(keys)
        ops: list[TierOp] = []
        for key in keys:
            at = self._locate(key)
            if at is None:
                continue
            last = len(self.tiers) - 1
            if at < last and self._index[last] is not None and key not in self._index[last]:
                index = self._index[at]
                self._place(last, key, self._payload_bytes(at, key), index.reuses(key),  # type: ignore[union-attr]
                            copy(key, self.tiers[at].name, self.tiers[last].name), ops,
                            priority or index.priority(key))  # type: ignore[union-attr]
            for index in self._index:
                if index is not None and key in index:
                    index.pin(key, until)
                    if priority is not None:
                        index.set_priority(key, priority)
        return ops

    def unpin(self, keys: Sequence[str]) -> None:
        for key in keys:
            for index in self._index:
                if index is not None and key in index:
                    index.unpin(key)

    def plan_drop(self, key: str) -> list[TierOp]:
        """Ops that delete ``key`` from every tier (an operator's DELETE)."""
        ops = []
        for tier, index in zip(self.tiers, self._index):
            if index is not None and key in index:
                index.remove(key)
                ops.append(drop(tier.name, key))
        return ops
