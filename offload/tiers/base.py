"""The worker-side interface of a storage tier, and how the connector learns of its stores and failures.

A tier class also tells the scheduler side its budget (and any entries a previous run left), so both sides
are generic over ``offload.tiers.registry``'s ordered list of tiers. Entries are keyed by the entry key
(offload/keys.py), which already includes the model, the KV layout and the policy.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Union

from kvplug.kv_payload import Payload

if TYPE_CHECKING:
    from offload.config import OffloadConfig
    from offload.host_memory import HostMemory
    from offload.layerwise import Segment

# What a save hands a tier: a payload, or (segment, slot) of host memory a layer-wise save already filled.
SavedItem = Union[Payload, "tuple[Segment, int]"]


def _ignore(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class TierEvents:
    on_stored: Callable[[str, int, str], None] = _ignore  # (tier name, bytes, label) once an entry is stored
    on_failed: Callable[[str, str], None] = _ignore  # (key, reason): a planned store was not done
    on_corrupt: Callable[[str, str], None] = _ignore  # (key, why): a stored entry failed verification


class Tier(ABC):
    name: ClassVar[str]
    # Bytes an entry takes beyond its payload (the scheduler's budget accounting).
    entry_overhead: ClassVar[int] = 0

    @classmethod
    @abstractmethod
    def budget_bytes(cls, cfg: "OffloadConfig") -> int:
        """Per-rank capacity from the offload config; 0: the tier is off."""

    @classmethod
    def host_bytes(cls, cfg: "OffloadConfig") -> int:
        """Host memory the tier's entries live in (sizes the pinned pool on CUDA)."""
        return 0

    @classmethod
    def existing_entries(cls, cfg: "OffloadConfig", tp_size: int,
                         on_corrupt: Callable[[str, str], None]) -> dict[str, int]:
        """Scheduler side, at start: entries a previous run left (key -> stored bytes); persistent tiers."""
        return {}

    @classmethod
    @abstractmethod
    def open(cls, cfg: "OffloadConfig", rank: int, events: TierEvents) -> "Tier":
        """The worker side's store of this tier for TP rank ``rank``."""

    @abstractmethod
    def store(self, key: str, item: SavedItem, ready: Any, label: str) -> None:
        """Store ``item`` under ``key`` once ``ready`` (the event of the copies that fill it, or None) is done."""

    @abstractmethod
    def get(self, key: str) -> Payload | None:
        ...

    def locate(self, key: str) -> "tuple[Segment, int] | None":
        """(segment, slot) of an entry held in a saved segment: consecutive slots load with one copy."""
        return None

    @abstractmethod
    def release(self, key: str) -> None:
        """Forget ``key`` (readers that already hold its payload keep it valid)."""

    def use_host_memory(self, host: "HostMemory") -> None:
        """The worker's host memory (pinned on CUDA), once the device is known."""
        return None

    def close(self) -> None:
        """Finish pending work (process exit, connector shutdown)."""
        return None
