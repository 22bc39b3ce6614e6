"""Capacity accounting and eviction order of one tier: recency, boosted by reuse count.

Priority of an entry = tick of its last access + reuse_weight * times it was reused. The lowest priority
goes first. With reuse_weight 0 this is LRU; with w > 0 an entry reused r times survives w*r other
accesses longer than a one-off one, so a shared context many requests return to outlives one-off prompts,
yet still ages out (no LFU pollution). A lazy heap keeps add/touch/evict O(log n).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass


@dataclass
class _Entry:
    nbytes: int
    reuses: int
    version: int


class EvictionIndex:
    def __init__(self, capacity_bytes: int, reuse_weight: float = 0.0) -> None:
        self.capacity = capacity_bytes
        self.reuse_weight = reuse_weight
        self.used = 0
        self._entries: dict[str, _Entry] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._tick = 0

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self):
        return self._entries.keys()

    def nbytes(self, key: str) -> int:
        return self._entries[key].nbytes

    def _push(self, key: str, e: _Entry) -> None:
        self._tick += 1
        e.version = self._tick
        heapq.heappush(self._heap, (self._tick + self.reuse_weight * e.reuses, self._tick, key))

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity

    def add(self, key: str, nbytes: int, reuses: int = 0) -> list[tuple[str, int, int]]:
        """Insert (or refresh) ``key``; returns (key, nbytes, reuses) of each entry evicted to make room.
        Never evicts ``key`` itself.

        The caller checks ``fits`` first: an entry larger than the whole tier is not stored at all.
        """
        if key in self._entries:
            self.remove(key)
        evicted = []
        while self.used + nbytes > self.capacity and self._entries:
            evicted.append(self.pop_victim())
        e = _Entry(nbytes, reuses, 0)
        self._entries[key] = e
        self.used += nbytes
        self._push(key, e)
        return evicted

    def touch(self, key: str) -> None:
        """A hit: more recent and one more reuse."""
        e = self._entries.get(key)
        if e is not None:
            e.reuses += 1
            self._push(key, e)

    def reuses(self, key: str) -> int:
        return self._entries[key].reuses

    def remove(self, key: str) -> None:
        e = self._entries.pop(key, None)
        if e is not None:
            self.used -= e.nbytes

    def pop_victim(self) -> tuple[str, int, int]:
        while self._heap:
            _, version, key = heapq.heappop(self._heap)
            e = self._entries.get(key)
            if e is not None and e.version == version:
                self.remove(key)
                return key, e.nbytes, e.reuses
        raise KeyError("nothing to evict")
