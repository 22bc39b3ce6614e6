"""Capacity accounting and eviction order of one tier: priority class, then recency boosted by reuse count.

Within a class, the priority of an entry = tick of its last access + reuse_weight * times it was reused. The
lowest goes first. With reuse_weight 0 this is LRU; with w > 0 an entry reused r times survives w*r other
accesses longer than a one-off one, so a shared context many requests return to outlives one-off prompts,
yet still ages out (no LFU pollution). Classes (``PRIORITY_CLASSES``, a request's ``kvplug_priority``) go in
order: no entry of a higher class is evicted while a lower class has one. Pinned entries (until their pin
expires) are never victims and count against the tier's pin budget. A lazy heap per class keeps
add/touch/evict O(log n).
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass
from typing import Callable

# Eviction order: every "low" entry goes before any "normal" one, every "normal" before any "high" one.
PRIORITY_CLASSES = ("low", "normal", "high")
DEFAULT_PRIORITY = "normal"


def priority_rank(name: str) -> int:
    return PRIORITY_CLASSES.index(name)


@dataclass
class _Entry:
    nbytes: int
    reuses: int
    version: int
    priority: int = 1
    pinned_until: float | None = None  # None: not pinned; math.inf: until unpinned


class EvictionIndex:
    def __init__(self, capacity_bytes: int, reuse_weight: float = 0.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.capacity = capacity_bytes
        self.reuse_weight = reuse_weight
        self.clock = clock
        self.used = 0
        self._entries: dict[str, _Entry] = {}
        self.holds = self._entries.__contains__  # ``key in index`` without a Python frame (asked per prompt block)
        self._heaps: list[list[tuple[float, int, str]]] = [[] for _ in PRIORITY_CLASSES]
        self._tick = 0
        self._pinned: dict[str, float] = {}  # key -> pinned until (wall clock, inf: until unpinned)
        self.pinned_bytes = 0
        self._class_bytes = [0] * len(PRIORITY_CLASSES)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self):
        return self._entries.keys()

    def nbytes(self, key: str) -> int:
        return self._entries[key].nbytes

    def priority(self, key: str) -> str:
        return PRIORITY_CLASSES[self._entries[key].priority]

    def _push(self, key: str, e: _Entry) -> None:
        self._tick += 1
        e.version = self._tick
        heapq.heappush(self._heaps[e.priority], (self._tick + self.reuse_weight * e.reuses, self._tick, key))

    def expire_pins(self) -> list[str]:
        """Unpin entries whose TTL has passed (they become ordinary entries); their keys."""
        now = self.clock()
        gone = [k for k, until in self._pinned.items() if until <= now]
        for k in gone:
            self.unpin(k)
        return gone

    def evictable_room(self, exclude: str | None = None) -> int:
        """Bytes an entry may take: the capacity less what pinned entries hold (other than ``exclude``)."""
        self.expire_pins()
        pinned = self.pinned_bytes
        if exclude is not None and exclude in self._pinned:
            pinned -= self._entries[exclude].nbytes
        return self.capacity - pinned

    def fits(self, nbytes: int, key: str | None = None) -> bool:
        return nbytes <= self.evictable_room(key)

    def add(self, key: str, nbytes: int, reuses: int = 0,
            priority: str = DEFAULT_PRIORITY) -> list[tuple[str, int, int, str]]:
        """Insert (or refresh) ``key``; returns (key, nbytes, reuses, priority class) of each entry evicted to
        make room.
        Never evicts ``key`` itself nor a pinned entry.

        The caller checks ``fits`` first: an entry larger than the tier's unpinned room is not stored at all.
        """
        until = self._pinned.get(key)
        if key in self._entries:
            self.remove(key)
        evicted = []
        while self.used + nbytes > self.capacity and len(self._entries) > len(self._pinned):
            evicted.append(self.pop_victim())
        e = _Entry(nbytes, reuses, 0, priority_rank(priority))
        self._entries[key] = e
        self.used += nbytes
        self._class_bytes[e.priority] += nbytes
        self._push(key, e)
        if until is not None:
            self.pin(key, until)
        return evicted

    def touch(self, key: str) -> None:
        """A hit: more recent and one more reuse."""
        e = self._entries.get(key)
        if e is not None:
            e.reuses += 1
            self._push(key, e)

    def set_priority(self, key: str, priority: str) -> None:
        e = self._entries.get(key)
        if e is not None and e.priority != priority_rank(priority):
            self._class_bytes[e.priority] -= e.nbytes
            e.priority = priority_rank(priority)
            self._class_bytes[e.priority] += e.nbytes
            self._push(key, e)

    def reuses(self, key: str) -> int:
        return self._entries[key].reuses

    def class_bytes(self) -> dict[str, int]:
        """Bytes held per priority class."""
        return dict(zip(PRIORITY_CLASSES, self._class_bytes))

    def pinned_until(self, key: str) -> float | None:
        return self._pinned.get(key)

    def pin(self, key: str, until: float = math.inf) -> None:
        e = self._entries[key]
        if key not in self._pinned:
            self.pinned_bytes += e.nbytes
        until = max(until, self._pinned.get(key, until))  # a second pin never shortens the first
        self._pinned[key] = until
        e.pinned_until = until

    def unpin(self, key: str) -> None:
        if self._pinned.pop(key, None) is not None:
            e = self._entries[key]
            self.pinned_bytes -= e.nbytes
            e.pinned_until = None

    def remove(self, key: str) -> None:
        self.unpin(key)
        e = self._entries.pop(key, None)
        if e is not None:
            self.used -= e.nbytes
            self._class_bytes[e.priority] -= e.nbytes

    def pop_victim(self) -> tuple[str, int, int, str]:
        """The next entry to evict (lowest class first, never a pinned one), removed from the index."""
        self.expire_pins()
        for heap in self._heaps:
            skipped = []
            victim = None
            while heap:
                item = heapq.heappop(heap)
                _, version, key = item
                e = self._entries.get(key)
                if e is None or e.version != version:
                    continue  # stale (touched, re-classed or removed since)
                if key in self._pinned:
                    skipped.append(item)
                    continue
                victim = (key, e.nbytes, e.reuses, PRIORITY_CLASSES[e.priority])
                break
            for item in skipped:
                heapq.heappush(heap, item)
            if victim is not None:
                self.remove(victim[0])
                return victim
        raise KeyError("nothing to evict")
