"""The storage tiers, fastest first: a new entry goes to the first with room, victims move down the list."""
from __future__ import annotations

from typing import TYPE_CHECKING

from offload.tiers.base import Tier
from offload.tiers.cpu import CpuStore
from offload.tiers.disk import DiskTier
from offload.tiers.planner import TierBudget

if TYPE_CHECKING:
    from offload.config import OffloadConfig

TIERS: tuple[type[Tier], ...] = (CpuStore, DiskTier)


def names() -> tuple[str, ...]:
    return tuple(t.name for t in TIERS)


def budgets(cfg: "OffloadConfig") -> list[TierBudget]:
    """The scheduler's view of every tier under ``cfg`` (per-rank bytes; 0 = off)."""
    return [TierBudget(t.name, t.budget_bytes(cfg), t.entry_overhead) for t in TIERS]


def enabled(cfg: "OffloadConfig") -> list[type[Tier]]:
    return [t for t in TIERS if t.budget_bytes(cfg) > 0]
