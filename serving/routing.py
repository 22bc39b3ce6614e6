"""Which replica serves a request: prefix affinity with a load bound, or round-robin.

Pure policy, no I/O, so it is unit-tested without engines. The router (serving/router.py) asks
``choose()`` for a replica, tells ``started()``/``finished()`` around each request and ``mark()`` when
a replica goes up or down.

Affinity is consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2018): every
replica owns ``virtual_nodes`` points on a hash ring; a request's affinity key hashes to a point and
walks clockwise to the first replica. That first replica is the key's *home*: the one whose prefix
cache holds the shared context. A replica is skipped while it is down or while its in-flight count
has reached ``ceil(load_factor * (total_in_flight + 1) / healthy)``, so one hot context spills to the
next replica on the ring instead of queueing on its home. Removing a replica moves only its own keys.
"""
from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping

ROUTING_MODES = ("affinity", "round-robin")
SESSION_HEADER = "x-session-id"
DEFAULT_PREFIX_CHARS = 1024
DEFAULT_LOAD_FACTOR = 1.25
DEFAULT_VIRTUAL_NODES = 64


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


@dataclass
class Decision:
    replica: str
    home: str | None          # the key's replica on the ring when all replicas are up (affinity only)
    reason: str               # affinity | load_bound | home_down | round_robin | no_key

    @property
    def affinity_hit(self) -> bool:
        return self.reason == "affinity"


class NoReplicaAvailable(RuntimeError):
    pass


class Router:
    """Routing state over named replicas. Not thread-safe: use it from one event loop."""

    def __init__(self, replicas: list[str], mode: str = "affinity", load_factor: float = DEFAULT_LOAD_FACTOR,
                 virtual_nodes: int = DEFAULT_VIRTUAL_NODES) -> None:
        if mode not in ROUTING_MODES:
            raise ValueError(f"routing mode {mode!r} is not one of {', '.join(ROUTING_MODES)}")
        if load_factor < 1.0:
            raise ValueError(f"load_factor must be >= 1.0 (1.0 = perfectly even), got {load_factor}")
        if not replicas or len(set(replicas)) != len(replicas):
            raise ValueError(f"replicas must be distinct names, got {replicas}")
        self.mode = mode
        self.load_factor = load_factor
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

    def choose(self, key: str, exclude: frozenset[str] | set[str] = frozenset()) -> Decision:
        """Pick a replica for a request with this affinity key (``""``: none), never one in ``exclude``."""
        candidates = [r for r in self.replicas if self.healthy[r] and r not in exclude]
        if not candidates:
            raise NoReplicaAvailable("no healthy replica is available")
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
