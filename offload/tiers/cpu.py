"""The CPU tier: entries in host memory (pinned on CUDA)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvplug.kv_payload import Payload, payload_nbytes
from offload.host_memory import HostMemory
from offload.tiers.base import SavedItem, Tier, TierEvents

if TYPE_CHECKING:
    from offload.config import OffloadConfig
    from offload.layerwise import Segment


class CpuStore(Tier):
    """Entries in host memory (the connector's ``HostMemory``: the pinned pool on CUDA, plain tensors on CPU).

    A released entry's memory is never recycled here: other readers may still hold it (the disk writer of a
    demoted entry, a load whose host->device copy is in flight). Its buffer goes back to the pool only when
    its last view has died and the copy streams have passed that moment (``PinnedPool``), so an entry is
    never overwritten while somebody reads it, and freed memory does not count against the tier twice.
    """

    name = "cpu"

    def __init__(self, host: HostMemory | None = None, events: TierEvents = TierEvents()) -> None:
        self.host = host if host is not None else HostMemory()
        self.events = events
        self._entries: dict[str, Payload] = {}
        self._slots: dict[str, tuple["Segment", int]] = {}  # entries that are views of a saved segment
        self.used_bytes = 0

    @classmethod
    def budget_bytes(cls, cfg: "OffloadConfig") -> int:
        return cfg.cpu_bytes

    @classmethod
    def host_bytes(cls, cfg: "OffloadConfig") -> int:
        return cfg.cpu_bytes

    @classmethod
    def open(cls, cfg: "OffloadConfig", rank: int, events: TierEvents) -> "CpuStore":
        return cls(events=events)

    def use_host_memory(self, host: HostMemory) -> None:
        self.host = host  # whole-block entries live in the same memory as layer-wise segments

    def store(self, key: str, item: SavedItem, ready: Any, label: str) -> None:
        if isinstance(item, tuple):  # (segment, slot) of a layer-wise save
            self.adopt(key, *item)
        else:
            self.put(key, item)
        self.events.on_stored(self.name, payload_nbytes(self._entries[key]), label)

    def put(self, key: str, payload: Payload) -> None:
        if key in self._entries:
            return
        buf = {k: self.host.empty(tuple(t.shape), t.dtype) for k, t in payload.items()}
        for k, t in payload.items():
            buf[k].copy_(t)
        self._entries[key] = buf
        self.used_bytes += payload_nbytes(buf)

    def adopt(self, key: str, segment: "Segment", slot: int) -> None:
        """Store slot ``slot`` of ``segment`` (host memory the layer-wise save already filled) without a copy."""
        if key in self._entries:
            return
        payload = segment.entry(slot)
        self._entries[key] = payload
        self._slots[key] = (segment, slot)
        self.used_bytes += payload_nbytes(payload)

    def get(self, key: str) -> Payload | None:
        return self._entries.get(key)

    def locate(self, key: str) -> tuple["Segment", int] | None:
        return self._slots.get(key)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def release(self, key: str) -> None:
        """Forget ``key``; its memory is freed once no reader holds it any more (see the class docstring)."""
        self._slots.pop(key, None)
        buf = self._entries.pop(key, None)
        if buf is not None:
            self.used_bytes -= payload_nbytes(buf)
