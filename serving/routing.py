"""Which replica serves a request: the replica whose cache tiers hold the longest prefix of it (tier-aware),
prefix affinity, both with a load bound, or round-robin.

Pure policy, no I/O, so it is unit-tested without engines. The router (serving/router.py) asks
``choose()`` for a replica, tells ``started()``/``finished()`` around each request and ``mark()`` when
a replica goes up or down.

Affinity is consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): every
replica owns ``virtual_nodes`` points on a hash ring; a request's affinity key hashes to a point and
walks clockwise to the first replica. That first replica is the key's *home*: the one whose prefix
cache holds the shared context. A replica is skipped while it is down or while its in-flight count
has reached ``ceil(load_factor * (total_in_flight + 1) / healthy)``, so one hot context spills to the
next replica on the ring instead of queueing on its home. Removing a replica moves only its own keys.

Tier-aware routing knows, per replica, which prefix blocks it holds in any tier (GPU prefix cache, CPU,
disk): ``ReplicaBlocks`` is fed from the replica's ``GET /kvplug/cache/events`` (serving/router.py polls it).
A request's blocks are vLLM's chained block hashes of its token ids, so a match on block i means blocks
0..i are the same tokens; the router sends it to the replica holding the longest run of its leading blocks,
within the same load bound, and to its affinity home when no replica holds at least ``min_match_fraction`` of
its blocks (a new conversation) or no replica's feed is live.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

ROUTING_MODES = ("tier-aware", "affinity", "round-robin")
DEFAULT_ROUTING = "tier-aware"
TIERS = ("gpu", "cpu", "disk")
SESSION_HEADER = "x-session-id"
DEFAULT_PREFIX_CHARS = 1024
DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_VIRTUAL_NODES = 64
# Tier-aware: a replica's cached prefix decides only when it covers at least this share of the prompt's full
# blocks. A shared system prompt (the chat template's default one, say) is held by every busy replica; such a
# short match must not pull every new conversation to one replica, so affinity spreads those.
DEFAULT_MIN_MATCH_FRACTION = 0.25


class BadRequest(ValueError):
    """The request cannot be routed; its message is sent back with HTTP 400."""


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _content_text(content: Any, where: str) -> str:
    """Chat message content as text: a string, or a list of parts of which the text parts count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict):
                raise BadRequest(f"{where}[{i}] must be an object with a 'type', got {type(part).__name__}")
            if part.get("type") == "text":
                parts.append(str(part.get("text", "")))
        return "\n".join(parts)
    raise BadRequest(f"{where} must be a string or a list of content parts, got {type(content).__name__}")


def shared_prefix_text(path: str, body: Mapping[str, Any]) -> str:
    """The part of a request that later requests of the same conversation repeat.

    Chat: the messages up to and including the first user message (system prompt + the turn that
    carries the shared context); every later turn of the conversation starts with exactly these.
    Completions: the prompt itself (its first characters are taken by the caller).
    """
    if path.endswith("/chat/completions"):
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty list of {role, content} objects")
        parts = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise BadRequest(f"messages[{i}] must be an object with a 'role'")
            parts.append(f"<{m['role']}>{_content_text(m.get('content'), f'messages[{i}].content')}")
            if m["role"] == "user":
                break
        return "\n".join(parts)
    if path.endswith("/completions"):
        prompt = body.get("prompt")
        if isinstance(prompt, list):
            if not prompt:
                raise BadRequest("'prompt' must not be an empty list")
            prompt = prompt[0]  # a batch: route by its first prompt
            if isinstance(prompt, list):  # token ids
                return " ".join(str(t) for t in prompt)
            if isinstance(prompt, int):
                return " ".join(str(t) for t in body["prompt"])
        if not isinstance(prompt, str):
            raise BadRequest("'prompt' must be a string, a list of strings or a list of token ids")
        return prompt
    return ""


def affinity_key(path: str, body: Mapping[str, Any], headers: Mapping[str, str] | None = None,
                 prefix_chars: int = DEFAULT_PREFIX_CHARS) -> str:
    """The key requests sharing a context have in common: the session header when the client sends one,
    else the first ``prefix_chars`` characters of the shared prefix (see ``shared_prefix_text``)."""
    if headers:
        session = headers.get(SESSION_HEADER)
        if session:
            return "session:" + session
    text = shared_prefix_text(path, body)
    return "prefix:" + text[:prefix_chars] if text else ""


class FeedError(ValueError):
    """A replica's cache-events answer does not follow the contract (notes: GET /kvplug/cache/events)."""


@dataclass
class PrefixMatch:
    """How much of a request's prefix one replica holds: leading blocks found in any of its tiers, and how
    many of those each tier holds (a block may be in several)."""
    blocks: int = 0
    per_tier: dict[str, int] = field(default_factory=dict)


class ReplicaBlocks:
    """The prefix blocks one replica holds, per tier, kept current from its cache-events feed."""

    def __init__(self) -> None:
        self.epoch: str | None = None
        self.seq = 0
        self.block_size: int | None = None
        self.tiers: dict[bytes, set[str]] = {}
        self._per_tier = {t: 0 for t in TIERS}   # kept with every event: read after each poll

    def apply(self, feed: Mapping[str, Any]) -> None:
        """One answer of ``GET /kvplug/cache/events?since=<self.seq>``; FeedError if it is malformed (the
        state is then unchanged)."""
        try:
            epoch, seq, block_size = str(feed["epoch"]), int(feed["seq"]), int(feed["block_size"])
            if epoch != self.epoch and self.epoch is not None and not feed.get("reset"):
                # A new engine life answered deltas against our old seq: forget it all, ask from 0 next time.
                self.__init__()
                return
            reset = bool(feed.get("reset")) or self.epoch is None
            resident = [self._entry(e) for e in feed.get("resident") or ()] if reset else []
            stored = [self._entry(e) for e in feed.get("stored") or ()]
            removed = [self._entry(e) for e in feed.get("removed") or ()]
        except (KeyError, TypeError, ValueError) as exc:
            raise FeedError(f"malformed cache-events answer: {type(exc).__name__}: {exc}") from None
        if block_size < 1:
            raise FeedError(f"'block_size' must be >= 1, got {block_size}")
        if reset:
            self.tiers = {}
            self._per_tier = {t: 0 for t in TIERS}
            stored = resident + stored
        for h, tier in stored:
            held = self.tiers.setdefault(h, set())
            if tier not in held:
                held.add(tier)
                self._per_tier[tier] += 1
        for h, tier in removed:
            held = self.tiers.get(h)
            if held is not None and tier in held:
                held.discard(tier)
                self._per_tier[tier] -= 1
                if not held:
                    del self.tiers[h]
        self.epoch, self.seq, self.block_size = epoch, seq, block_size

    @staticmethod
    def _entry(entry: Any) -> tuple[bytes, str]:
        h, tier = entry
        if tier not in TIERS:
            raise ValueError(f"tier {tier!r} is not one of {', '.join(TIERS)}")
        return bytes.fromhex(h), tier

    def match(self, hashes: list[bytes]) -> PrefixMatch:
        """The longest run of leading ``hashes`` this replica holds in any tier."""
        m = PrefixMatch(per_tier={t: 0 for t in TIERS})
        for h in hashes:
            held = self.tiers.get(h)
            if not held:
                break
            m.blocks += 1
            for t in held:
                m.per_tier[t] += 1
        return m

    def blocks_per_tier(self) -> dict[str, int]:
        return dict(self._per_tier)


@dataclass
class Decision:
    replica: str
    home: str | None          # affinity: the key's replica on the ring; tier_hit: the longest holder
    reason: str               # tier_hit | affinity | load_bound | home_down | round_robin | no_key
    match: PrefixMatch | None = None   # tier-aware: what the chosen replica holds of the request
    best_blocks: int = 0               # tier-aware: the longest prefix any candidate holds

    @property
    def affinity_hit(self) -> bool:
        return self.reason in ("affinity", "tier_hit")


class NoReplicaAvailable(RuntimeError):
    pass


class Router:
    """Routing state over named replicas. Not thread-safe: use it from one event loop."""

    def __init__(self, replicas: list[str], mode: str = "affinity", load_factor: float = DEFAULT_LOAD_FACTOR,
                 virtual_nodes: int = DEFAULT_VIRTUAL_NODES,
                 min_match_fraction: float = DEFAULT_MIN_MATCH_FRACTION) -> None:
        if mode not in ROUTING_MODES:
            raise ValueError(f"routing mode {mode!r} is not one of {', '.join(ROUTING_MODES)}")
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1.0 (1.0 = perfectly even), got {load_factor}")
        if not replicas or len(set(replicas)) != len(replicas):
            raise ValueError(f"replicas must be distinct names, got {replicas}")
        if not 0.0 <= min_match_fraction <= 1.0:
            raise ValueError(f"min_match_fraction must be within [0, 1], got {min_match_fraction}")
        self.mode = mode
        self.load_factor = load_factor
        self.min_match_fraction = min_match_fraction
        self.replicas = list(replicas)
        self.healthy = {r: True for r in replicas}
        self.in_flight = {r: 0 for r in replicas}
        ring = sorted((_hash64(f"{r}#{v}"), r) for r in replicas for v in range(virtual_nodes))
        self._ring_points = [p for p, _ in ring]
        self._ring_owners = [r for _, r in ring]
        self._rr = itertools.cycle(range(len(replicas)))

    # --- state ---
    def mark(self, replica: str, healthy: bool) -> None:
        self.healthy[replica] = healthy

    def started(self, replica: str) -> None:
        self.in_flight[replica] += 1

    def finished(self, replica: str) -> None:
        self.in_flight[replica] = max(0, self.in_flight[replica] - 1)

    def healthy_replicas(self) -> list[str]:
        return [r for r in self.replicas if self.healthy[r]]

    def capacity(self) -> int:
        """Most requests one replica may have in flight before new ones spill (bounded loads)."""
        n = len(self.healthy_replicas())
        if n == 0:
            return 0
        total = sum(self.in_flight[r] for r in self.replicas if self.healthy[r])
        return max(1, math.ceil(self.load_factor * (total + 1) / n))

    # --- policy ---
    def ring_order(self, key: str) -> list[str]:
        """Every replica once, in ring order starting at the key's home."""
        start = bisect.bisect(self._ring_points, _hash64(key)) % len(self._ring_points)
        seen: dict[str, None] = {}
        for i in range(len(self._ring_owners)):
            owner = self._ring_owners[(start + i) % len(self._ring_owners)]
            if owner not in seen:
                seen[owner] = None
                if len(seen) == len(self.replicas):
                    break
        return list(seen)

    def choose(self, key: str, exclude: frozenset[str] | set[str] = frozenset(),
               matches: Mapping[str, PrefixMatch] | None = None, prompt_blocks: int = 0) -> Decision:
        """Pick a replica for a request with this affinity key (``""``: none), never one in ``exclude``.

        ``matches`` (tier-aware mode): what each replica with a live feed holds of the request's
        ``prompt_blocks`` full blocks."""
        candidates = [r for r in self.replicas if self.healthy[r] and r not in exclude]
        if not candidates:
            raise NoReplicaAvailable("no healthy replica is available")
        if self.mode == "tier-aware" and matches:
            best = max((matches[r].blocks for r in candidates if r in matches), default=0)
            if best > 0 and best >= self.min_match_fraction * prompt_blocks:
                return self._choose_by_tiers(key, candidates, matches, best)
        if self.mode == "round-robin" or not key:
            for _ in range(len(self.replicas)):
                r = self.replicas[next(self._rr)]
                if r in candidates:
                    return Decision(r, None, "round_robin" if self.mode == "round-robin" else "no_key")
        order = self.ring_order(key)
        home = order[0]
        cap = self.capacity()
        for r in order:
            if r in candidates and self.in_flight[r] < cap:
                break
        else:  # everyone is at the bound (only possible with exclusions): least loaded candidate
            r = min(candidates, key=lambda c: (self.in_flight[c], order.index(c)))
        if r == home:
            return Decision(r, home, "affinity")
        home_usable = self.healthy[home] and home not in exclude
        return Decision(r, home, "load_bound" if home_usable else "home_down")

    def _choose_by_tiers(self, key: str, candidates: list[str], matches: Mapping[str, PrefixMatch],
                         best: int) -> Decision:
        """The candidate holding the most leading blocks (ties: ring order of the key) under the load bound,
        else the next-longest holder under it (load_bound), else the least loaded."""
        ring = self.ring_order(key) if key else self.replicas
        none = PrefixMatch(per_tier={t: 0 for t in TIERS})
        order = sorted(candidates, key=lambda r: (-matches.get(r, none).blocks, ring.index(r)))
        cap = self.capacity()
        under = [r for r in order if self.in_flight[r] < cap]
        r = under[0] if under else min(order, key=lambda c: (self.in_flight[c], order.index(c)))
        m = matches.get(r, none)
        return Decision(r, order[0], "tier_hit" if m.blocks == best else "load_bound", match=m, best_blocks=best)


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or BadRequest saying what is wrong with it."""
    if not raw:
        raise BadRequest("request body is empty; expected a JSON object")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, got {type(body).__name__}")
    return body
