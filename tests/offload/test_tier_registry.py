"""Every registered storage tier behind the Tier interface, the planner over any ordered list of tiers, and
the connector's wiring."""
from __future__ import annotations

import pytest
from offload import wiring
from offload.config import OffloadConfig
from offload.tiers import registry
from offload.tiers.base import TierEvents
from offload.tiers.planner import TierBudget, TierPlanner, demote, drop, store
from tests.offload.test_tiers import payload, same


def config_with_every_tier(tmp_path) -> OffloadConfig:
    return OffloadConfig(enabled=True, cpu_size="1MiB", disk_path=str(tmp_path / "disk"), disk_size="1MiB")


@pytest.mark.parametrize("tier_type", registry.TIERS, ids=registry.names())
def test_each_tier_stores_serves_and_releases_an_entry(tier_type, tmp_path):
    cfg = config_with_every_tier(tmp_path)
    assert tier_type.budget_bytes(cfg) > 0
    stored = []
    tier = tier_type.open(cfg, 0, TierEvents(on_stored=lambda *a: stored.append(a)))
    assert tier.get("a") is None
    tier.store("a", payload(), None, "keep")
    tier.close()
    assert same(tier.get("a"), payload())
    assert stored == [(tier_type.name, stored[0][1], "keep")] and stored[0][1] > 0
    tier.release("a")
    tier.close()
    assert tier.get("a") is None


def test_tier_order_and_names():
    assert registry.names() == ("cpu", "disk")  # fastest first: victims move down this list
    cfg = OffloadConfig(cpu_size="1KiB")
    assert [t.name for t in registry.enabled(cfg)] == ["cpu"]
    assert [(b.name, b.capacity_bytes) for b in registry.budgets(cfg)] == [("cpu", 1024), ("disk", 0)]


def test_planner_cascades_victims_down_any_number_of_tiers():
    """Three tiers (the planner knows no tier by name): victims are demoted one tier down, sizes re-counted with
    each tier's per-entry overhead, and the last tier's victims are dropped."""
    plan = TierPlanner([TierBudget("hbm", 100), TierBudget("ram", 250, 10), TierBudget("ssd", 300, 20)])
    assert plan.plan_store("a", 100) == [store("hbm", "a")]
    assert plan.plan_store("b", 100) == [demote("a", "hbm", "ram"), store("hbm", "b")]
    assert plan.plan_store("c", 100) == [demote("b", "hbm", "ram"), store("hbm", "c")]
    assert plan.plan_store("d", 100) == [demote("a", "ram", "ssd"), demote("c", "hbm", "ram"), store("hbm", "d")]
    assert plan.plan_store("e", 100) == [demote("b", "ram", "ssd"), demote("d", "hbm", "ram"), store("hbm", "e")]
    assert plan.plan_store("f", 100) == [drop("ssd", "a"), demote("c", "ram", "ssd"), demote("e", "hbm", "ram"),
                                         store("hbm", "f")]
    assert [plan.where(k) for k in "abcdef"] == [None, "ssd", "ssd", "ram", "ram", "hbm"]
    assert plan.stats.evictions == {"hbm": 5, "ram": 3, "ssd": 1}
    assert plan.record_hit("c") == "ssd" and plan.stats.hits == {"hbm": 0, "ram": 0, "ssd": 1}
    assert plan.plan_store("huge", 1000) == [] and plan.stats.skipped_stores == 1


def test_planner_trims_a_persistent_tiers_previous_entries_to_its_budget():
    plan = TierPlanner([TierBudget("ram", 100), TierBudget("ssd", 100)],
                       existing={"ssd": {"old": 60, "new": 60, "huge": 500}})
    assert plan.take_startup_ops() == [drop("ssd", "old"), drop("ssd", "huge")]
    assert plan.where("new") == "ssd" and plan.take_startup_ops() == []


def test_the_connector_reads_its_wiring_and_says_when_there_is_none(monkeypatch):
    monkeypatch.setattr(wiring, "_current", None)
    with pytest.raises(wiring.OffloadNotConfigured, match="kvplug.plugin"):
        wiring.current()
    offload, policies = OffloadConfig(), object()
    wiring.configure(offload, None, policies)  # type: ignore[arg-type]
    assert wiring.current() == wiring.OffloadWiring(offload, None, policies)  # type: ignore[arg-type]
