"""What the tiers hold, as the API server shows it: prefixes per tier, pins, the events feed, and why a block
missed.

Kept by the connector's scheduler side (engine core) next to the planner, which stays the authority on where
an entry is: after every batch of planned ops, ``sync`` compares each touched entry's tiers with the planner's
and turns the difference into events (vLLM's block hash as hex + tier, counted per (hash, tier), so a block
stored under two policies is "removed" only when its last copy goes). A *prefix* is the chain of blocks one
request stored, named by the hash of its last block; turns of a conversation are prefixes that extend each
other. Prompt text is never kept unless ``inventory_prompt_tokens`` > 0 (then that many first token ids).

Persistence (disk tier only): ``index.jsonl`` in the disk folder maps entry keys to block hash, policy and
prefix, and ``pins.json`` holds the pins, so after a restart the disk tier's entries are listed, announced
and still pinned.
"""
from __future__ import annotations

import collections
import json
import logging
import math
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from offload.tiers.eviction import DEFAULT_PRIORITY
from offload.tiers.planner import PinRefused, TierPlanner

logger = logging.getLogger("vllm.kvplug.offload")

RETAINED_EVENTS = 200_000  # events kept for incremental readers; older `since` gets a reset (full state)
REMEMBERED_MISSES = 200_000  # entries whose departure (evicted, corrupt...) a later miss can name
MAX_PAGE = 1000  # prefixes per GET /kvplug/cache page
MAX_EVENT_WAIT_S = 30.0
INDEX_NAME, PINS_NAME = "index.jsonl", "pins.json"

# Why the first missing block of a request missed (the report's first_miss.reason, the misses metric label).
NEVER_SEEN, OPTED_OUT, OTHER_SALT, OTHER_POLICY = "never_seen", "opted_out", "different_cache_salt", "other_policy"
UNREADABLE = "unreadable"  # corrupt on disk, or its disk write failed: a planned load found nothing
DELETED = "deleted"  # an operator's DELETE /kvplug/cache/{prefix}
NOT_STORED = "not_stored"  # seen with this salt and policy, but never stored (fit no tier) or forgotten
LAST_BLOCK = "last_block"  # every full block hit, but vLLM computes at least one prompt token


def evicted_from(tier: str) -> str:
    return f"evicted_from_{tier}"


@dataclass
class Block:
    block_hash: str
    policy: str
    prefixes: set[str] = field(default_factory=set)
    tiers: tuple[str, ...] = ()
    hits: int = 0
    last_use: float = 0.0
    # The salt- and policy-free digest of the tokens up to this block (SchedulerSide._content_chain), once known:
    # a later prompt through this block need not hash them again.
    content: bytes | None = None


@dataclass
class Prefix:
    prefix_id: str
    keys: list[str]
    policy: str
    created: float
    last_use: float
    priority: str = DEFAULT_PRIORITY
    hits: int = 0
    pinned_until: float | None = None  # inf: until unpinned
    head_tokens: list[int] = field(default_factory=list)


class CacheInventory:
    def __init__(self, planner: TierPlanner, block_size: int, disk_root: str = "",
                 prompt_tokens: int = 0) -> None:
        self.planner = planner
        self.block_size = block_size
        self.prompt_tokens = prompt_tokens
        self.epoch = secrets.token_hex(8)
        self.blocks: dict[str, Block] = {}
        self.prefixes: dict[str, Prefix] = {}
        self.seq = 0
        self._events: collections.deque[tuple[int, str, str, str]] = collections.deque(maxlen=RETAINED_EVENTS)
        self._resident: collections.Counter[tuple[str, str]] = collections.Counter()
        self.gone: collections.OrderedDict[str, str] = collections.OrderedDict()  # key -> why it left
        self.changed = threading.Condition()
        self._disk_root = Path(disk_root) if disk_root else None
        self._index_file: Any = None
        self._restoring = False

    # --- bookkeeping, fed by the scheduler side ---------------------------------------------------------
    def register(self, key: str, block_hash: str, policy: str) -> Block:
        b = self.blocks.get(key)
        if b is None:
            b = self.blocks[key] = Block(block_hash, policy, last_use=time.time())
        return b

    def add_prefix(self, prefix_id: str, keys: list[str], policy: str, priority: str,
                   head_tokens: Iterable[int] = ()) -> Prefix:
        now = time.time()
        p = self.prefixes.get(prefix_id)
        if p is None:
            p = self.prefixes[prefix_id] = Prefix(prefix_id, list(keys), policy, now, now, priority,
                                                  head_tokens=list(head_tokens)[:self.prompt_tokens])
        for k in keys:
            if k in self.blocks:
                self.blocks[k].prefixes.add(prefix_id)
        return p

    def sync(self, keys: Iterable[str], why_gone: str | None = None) -> None:
        """Re-read the tiers of ``keys`` from the planner; events for each change. A key no tier holds any
        more is forgotten, remembering ``why_gone`` (else: evicted from the tier it was last in)."""
        changed = False
        for key in dict.fromkeys(keys):
            b = self.blocks.get(key)
            if b is None:
                continue
            now = tuple(self.planner.holders(key))
            if now == b.tiers:
                continue
            for tier in b.tiers:
                if tier not in now:
                    self._count(b.block_hash, tier, -1)
            for tier in now:
                if tier not in b.tiers:
                    self._count(b.block_hash, tier, +1)
                    if tier == "disk" and not self._restoring:
                        self._journal(key, b)
            if not now:
                self._forget_block(key, b, why_gone or evicted_from(b.tiers[-1]))
            else:
                b.tiers = now
            changed = True
        if changed:
            with self.changed:
                self.changed.notify_all()

    def _count(self, block_hash: str, tier: str, delta: int) -> None:
        k = (block_hash, tier)
        before = self._resident[k]
        self._resident[k] = before + delta
        if self._resident[k] <= 0:
            del self._resident[k]
        if before == 0 and delta > 0:
            self._event("stored", block_hash, tier)
        elif before + delta <= 0 < before:
            self._event("removed", block_hash, tier)

    def _event(self, kind: str, block_hash: str, tier: str) -> None:
        self.seq += 1
        self._events.append((self.seq, kind, block_hash, tier))

    def _forget_block(self, key: str, b: Block, why: str) -> None:
        del self.blocks[key]
        self.gone[key] = why
        self.gone.move_to_end(key)
        while len(self.gone) > REMEMBERED_MISSES:
            self.gone.popitem(last=False)
        for pid in b.prefixes:
            p = self.prefixes.get(pid)
            if p is not None and not any(k in self.blocks for k in p.keys):
                del self.prefixes[pid]

    def hit(self, keys: list[str]) -> None:
        now = time.time()
        touched: set[str] = set()
        for k in keys:
            b = self.blocks.get(k)
            if b is not None:
                b.hits += 1
                b.last_use = now
                touched |= b.prefixes
        for pid in touched:
            p = self.prefixes[pid]
            p.hits += 1
            p.last_use = now

    def why_gone(self, key: str) -> str | None:
        return self.gone.get(key)

    # --- persistence (disk tier) ------------------------------------------------------------------------
    def _journal(self, key: str, b: Block) -> None:
        if self._disk_root is None:
            return
        try:
            if self._index_file is None:
                self._index_file = open(self._disk_root / INDEX_NAME, "a", buffering=1)
            self._index_file.write(json.dumps({"k": key, "h": b.block_hash, "p": b.policy}) + "\n")
        except OSError as exc:
            logger.warning("kvplug offload: cannot write the inventory index in %s (%s)", self._disk_root, exc)
            self._disk_root = None

    def restore(self) -> None:
        """After a restart: blocks and pins of the entries the planner found on disk (compacts the index)."""
        if self._disk_root is None:
            return
        index = self.planner.index("disk") if "disk" in [t.name for t in self.planner.tiers] else None
        path = self._disk_root / INDEX_NAME
        kept: dict[str, dict] = {}
        try:
            with open(path) as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        if index is not None and rec["k"] in index:
                            kept[rec["k"]] = rec
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut by a crash
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("kvplug offload: cannot read the inventory index %s (%s)", path, exc)
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "w") as f:
                f.writelines(json.dumps(rec) + "\n" for rec in kept.values())
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("kvplug offload: cannot compact the inventory index %s (%s)", path, exc)
        for key, rec in kept.items():
            self.register(key, rec["h"], rec["p"])
        for pid, rec in self._read_pins().items():
            keys = [k for k in rec.get("keys", []) if k in self.blocks]
            until = rec.get("until")
            until = math.inf if until is None else float(until)
            if not keys or until <= time.time():
                continue
            p = self.add_prefix(pid, keys, rec.get("policy", ""), rec.get("priority", DEFAULT_PRIORITY))
            try:
                self.planner.pin(keys, until, p.priority)
            except PinRefused as exc:  # the tiers were made smaller since: the pin is dropped, not the engine
                logger.warning("kvplug offload: pin of prefix %s from the last run dropped: %s", pid, exc)
                continue
            p.pinned_until = until
        for key, rec in kept.items():
            if not self.blocks[key].prefixes:
                self.add_prefix(self.blocks[key].block_hash, [key], rec["p"], DEFAULT_PRIORITY)
        self._restoring = True
        try:
            self.sync(list(kept))
        finally:
            self._restoring = False

    def _read_pins(self) -> dict[str, dict]:
        try:
            return json.loads((self._disk_root / PINS_NAME).read_text())  # type: ignore[operator]
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            logger.warning("kvplug offload: cannot read the pins file in %s (%s); pins from the last run are lost",
                           self._disk_root, exc)
            return {}

    def save_pins(self) -> None:
        if self._disk_root is None:
            return
        pins = {p.prefix_id: {"keys": p.keys, "until": None if p.pinned_until == math.inf else p.pinned_until,
                              "policy": p.policy, "priority": p.priority}
                for p in self.prefixes.values() if p.pinned_until is not None and p.pinned_until > time.time()}
        path = self._disk_root / PINS_NAME
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(pins))
            os.replace(tmp, path)
        except OSError as exc:
            logger.warning("kvplug offload: cannot write the pins file %s (%s)", path, exc)

    # --- what the API server reads ----------------------------------------------------------------------
    def events_since(self, since: int | None, epoch: str | None = None) -> dict:
        out: dict[str, Any] = {"epoch": self.epoch, "seq": self.seq, "block_size": self.block_size}
        first = self._events[0][0] if self._events else self.seq + 1
        reset = (since is None or since < 0 or (epoch is not None and epoch != self.epoch) or since > self.seq
                 or since < first - 1)
        out["reset"] = reset
        if reset:
            out["resident"] = [list(k) for k in self._resident]
            out["stored"], out["removed"] = [], []
            return out
        stored, removed = [], []
        for seq, kind, h, tier in reversed(self._events):
            if seq <= since:
                break
            (stored if kind == "stored" else removed).append((seq, [h, tier]))
        out["stored"] = [e for _, e in sorted(stored)]
        out["removed"] = [e for _, e in sorted(removed)]
        return out

    def _prefix_view(self, p: Prefix, now: float) -> dict:
        tiers: dict[str, dict[str, int]] = {}
        for k in p.keys:
            b = self.blocks.get(k)
            if b is None:
                continue
            tier = b.tiers[0] if b.tiers else None
            if tier is None:
                continue
            t = tiers.setdefault(tier, {"blocks": 0, "tokens": 0, "bytes": 0})
            t["blocks"] += 1
            t["tokens"] += self.block_size
            index = self.planner.index(tier)
            t["bytes"] += index.nbytes(k) if index is not None and k in index else 0
        resident = sum(t["blocks"] for t in tiers.values())
        pinned = p.pinned_until is not None and p.pinned_until > now
        view = {"prefix": p.prefix_id, "tokens": len(p.keys) * self.block_size,
                "resident_tokens": resident * self.block_size, "bytes": sum(t["bytes"] for t in tiers.values()),
                "tiers": tiers, "policy": p.policy, "priority": p.priority, "hits": p.hits,
                "last_use": round(p.last_use, 3), "created": round(p.created, 3), "pinned": pinned,
                "pin_ttl_s": (None if not pinned or p.pinned_until == math.inf
                              else round(p.pinned_until - now, 1))}  # type: ignore[operator]
        if self.prompt_tokens:
            view["head_token_ids"] = p.head_tokens
        return view

    def totals(self) -> dict[str, dict[str, int]]:
        out = {}
        for t in self.planner.tiers:
            index = self.planner.index(t.name)
            if index is None:
                continue
            index.expire_pins()
            out[t.name] = {"entries": len(index), "tokens": len(index) * self.block_size, "bytes": index.used,
                           "pinned_bytes": index.pinned_bytes, "capacity_bytes": t.capacity_bytes}
        return out

    def listing(self, offset: int = 0, limit: int = 100, tier: str | None = None, pinned: bool | None = None) -> dict:
        now = time.time()
        limit = max(1, min(limit, MAX_PAGE))
        views = [self._prefix_view(p, now) for p in sorted(self.prefixes.values(), key=lambda p: -p.last_use)]
        if tier is not None:
            views = [v for v in views if tier in v["tiers"]]
        if pinned is not None:
            views = [v for v in views if v["pinned"] == pinned]
        page = views[offset:offset + limit]
        return {"epoch": self.epoch, "block_size": self.block_size, "totals": self.totals(),
                "total_prefixes": len(views), "offset": offset, "limit": limit, "prefixes": page,
                "next_offset": offset + len(page) if offset + len(page) < len(views) else None}

    def find_prefix(self, prefix: str) -> Prefix | None:
        p = self.prefixes.get(prefix)
        if p is None and len(prefix) >= 8:  # an unambiguous start of a hash, as people copy them
            found = [q for pid, q in self.prefixes.items() if pid.startswith(prefix)]
            p = found[0] if len(found) == 1 else None
        return p
