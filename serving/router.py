"""One OpenAI endpoint in front of N vLLM OpenAI servers (the replicas).

Requests are proxied byte for byte (streaming included) to the replica that ``routing.Router`` picks.
A replica that refuses a connection or breaks a response is marked down at once and the request is
retried on the next replica, as long as nothing of the response reached the client yet; a stream that
breaks after its first byte ends with an SSE error event and is counted, so no request is lost
silently. A background loop polls every replica's /health and brings recovered replicas back.

/metrics = the router's own counters + every replica's /metrics with a ``replica`` label added.

Tier-aware routing (the default of `kvplug serve --replicas N`): one loop per replica polls its
``GET /kvplug/cache/events?since=<seq>&epoch=<e>&wait_s=5`` (deltas of the prefix blocks it holds per tier;
a long poll where the replica supports it, plain polling every 0.25 s where not) into a
``routing.ReplicaBlocks``; a request's block hashes (serving/prompt_blocks.py) are matched against the
replicas whose feed is live. A replica without the feed (404, errors) just takes no part in the match:
with no live feed at all, routing is prefix affinity. Every response says where it went and why:
``x-kvplug-replica`` and ``x-kvplug-route`` (reason, matched/prompt blocks, per-tier blocks); the
replica's own headers (``x-kvplug-cache``) and body pass through unchanged, streaming too.

With API keys (``kvplug serve --api-key K``, or VLLM_API_KEY, as vLLM takes them) the router checks them
itself on every route but /health and /metrics (vLLM leaves those open too), admin routes included; the
replicas get a key of their own that only the router knows (serving/replicas.py). Limits: a request body
over ``max_body_bytes`` is a 413, an ``x-session-id`` header over ``max_session_id_bytes`` a 431, a replica
that sends nothing for ``read_timeout_s`` a 504; a client that goes away cancels its upstream request.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from serving import routing
from serving.prompt_blocks import PromptHasher

log = logging.getLogger("kvplug.router")

PROXIED_REQUEST_HEADERS = ("authorization", "content-type", "accept", "x-request-id")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "server",
              "date"}
# Routes served without an API key (as vLLM serves them): load balancers and Prometheus need no key.
OPEN_PATHS = ("/health", "/metrics")
# A replica may think (prefill of a long context on CPU) for minutes before its first byte; a non-streaming
# request gets nothing until it is finished.
DEFAULT_READ_TIMEOUT_S = 900.0
DEFAULT_MAX_BODY_BYTES = 64 << 20       # ~10M tokens of text: past any context window served here
DEFAULT_MAX_SESSION_ID_BYTES = 256      # an id, not a payload (it is hashed onto the ring)
CLIENT_CLOSED_REQUEST = 499             # nginx's status for "the client went away"; nobody receives it
CACHE_PATH = "/kvplug/cache"
CACHE_EVENTS_PATH = CACHE_PATH + "/events"
DEFAULT_FEED_INTERVAL_S = 0.25          # a follow-up turn comes right after its answer: the feed must be quicker
DEFAULT_FEED_WAIT_S = 5.0               # long poll (wait_s): the replica answers as soon as it has news
FEED_RETRY_S = 10.0                     # a replica without the feed (404) or failing it is asked again this often
ROUTE_HEADER = "x-kvplug-route"
REPLICA_HEADER = "x-kvplug-replica"


@dataclass
class ReplicaEndpoint:
    name: str
    base_url: str                      # http://host:port (no /v1)
    info: dict[str, Any] = field(default_factory=dict)   # pid, node, log path: shown on /replicas


class RouterMetrics:
    """The router's counters, in their own registry (they live in the router process only)."""

    def __init__(self, prefix: str = "kvplug") -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        p = f"{prefix}_router"
        self.routed = Counter(f"{p}_routed", "Requests sent to a replica (retries included)",
                              ["replica", "reason"], registry=r)
        self.affinity_hits = Counter(f"{p}_affinity_hits",
                                     "Requests served where their prefix is: their key's home replica (affinity) "
                                     "or the one holding their longest cached prefix (tier_hit)", ["replica"],
                                     registry=r)
        self.fallbacks = Counter(f"{p}_fallbacks",
                                 "Requests sent away from their key's home replica (load_bound, home_down)",
                                 ["replica", "reason"], registry=r)
        self.retries = Counter(f"{p}_retries",
                               "Requests retried elsewhere after this replica failed before responding",
                               ["replica"], registry=r)
        self.errors = Counter(f"{p}_errors",
                              "Requests that failed or were refused at the router (connect, broken_stream, "
                              "no_replica, read_timeout, client_disconnected, unauthorized, body_too_large, "
                              "header_too_large, reset_prefix_cache); replica 'none' before one was chosen",
                              ["replica", "kind"], registry=r)
        self.bad_requests = Counter(f"{p}_bad_requests", "Requests rejected with HTTP 400 by the router",
                                    registry=r)
        self.completed = Counter(f"{p}_completed", "Requests whose response was fully relayed, by HTTP status",
                                 ["replica", "status"], registry=r)
        self.up = Gauge(f"{p}_replica_up", "1 while the replica is in the routing set", ["replica"], registry=r)
        self.in_flight = Gauge(f"{p}_in_flight", "Requests in flight per replica", ["replica"], registry=r)
        self.feed_up = Gauge(f"{p}_feed_up", "1 while the replica's cache-events feed answers (tier-aware routing)",
                             ["replica"], registry=r)
        self.cached_blocks = Gauge(f"{p}_cached_blocks", "Prefix blocks the replica holds, per tier, as its "
                                   "cache-events feed last told the router", ["replica", "tier"], registry=r)
        self.prompt_blocks = Counter(f"{p}_prompt_blocks", "Full prompt blocks of requests routed tier-aware",
                                     ["replica"], registry=r)
        self.matched_blocks = Counter(f"{p}_matched_blocks",
                                      "Leading prompt blocks the chosen replica held in some tier when routed "
                                      "(predicted hit rate = matched / prompt blocks)", ["replica"], registry=r)
        self.route_seconds = Histogram(f"{p}_route_seconds",
                                       "Time to pick a replica (tokenizing and hashing the prompt included)",
                                       buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
                                       registry=r)


def _merge_replica_metrics(texts: dict[str, str]) -> list[Metric]:
    """Families from several Prometheus expositions, each sample labelled with its replica."""
    families: dict[str, Metric] = {}
    for replica, text in texts.items():
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                merged.samples.append(type(s)(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp,
                                              s.exemplar))
    return list(families.values())


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


class _UpstreamFailed(Exception):
    """The replica failed before sending anything of its response: safe to retry elsewhere."""


class _UpstreamTimeout(Exception):
    """The replica took the request but sent nothing for the read timeout: busy, not dead; no retry."""


class _Refused(Exception):
    """A request the router answers itself with an error (status, message, metrics kind)."""

    def __init__(self, status: int, message: str, kind: str) -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


def _key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


class ApiKeyMiddleware:
    """401 unless ``Authorization: Bearer <one of the keys>``, on every path but OPEN_PATHS (ASGI)."""

    def __init__(self, app, digests: list[bytes], on_refused) -> None:
        self.app, self.digests, self.on_refused = app, digests, on_refused

    def authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        digest = _key_digest(token.strip())
        return any([secrets.compare_digest(digest, d) for d in self.digests])  # no early exit: constant time

    async def __call__(self, scope, receive, send):
        if (scope["type"] != "http" or not self.digests or scope["path"] in OPEN_PATHS
                or scope.get("method") == "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or ())
        if self.authorized(headers.get(b"authorization", b"").decode("latin-1")):
            return await self.app(scope, receive, send)
        self.on_refused()
        await _error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                     "AuthenticationError")(scope, receive, send)


class ReplicaRouter:
    def __init__(self, endpoints: list[ReplicaEndpoint], mode: str = "affinity",
                 load_factor: float = routing.DEFAULT_LOAD_FACTOR,
                 min_match_fraction: float = routing.DEFAULT_MIN_MATCH_FRACTION,
                 prefix_chars: int = routing.DEFAULT_PREFIX_CHARS, health_interval_s: float = 2.0,
                 metrics_prefix: str = "kvplug", read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
                 api_keys: list[str] = (), upstream_api_key: str | None = None,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 max_session_id_bytes: int = DEFAULT_MAX_SESSION_ID_BYTES,
                 prompt_hasher: PromptHasher | None = None, feed_interval_s: float = DEFAULT_FEED_INTERVAL_S,
                 feed_wait_s: float = DEFAULT_FEED_WAIT_S,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        """``api_keys``: what clients must send (none: no check); ``upstream_api_key``: what the router sends
        to the replicas instead of the client's Authorization header; ``prompt_hasher``: computes requests'
        block hashes for tier-aware routing (None: tier-aware routing falls back to affinity)."""
        self.endpoints = {e.name: e for e in endpoints}
        self.max_body_bytes, self.max_session_id_bytes = max_body_bytes, max_session_id_bytes
        self.upstream_auth = {"authorization": f"Bearer {upstream_api_key}"} if upstream_api_key else {}
        self.policy = routing.Router([e.name for e in endpoints], mode=mode, load_factor=load_factor,
                                     min_match_fraction=min_match_fraction)
        self.prefix_chars = prefix_chars
        self.health_interval_s = health_interval_s
        self.metrics = RouterMetrics(metrics_prefix)
        self.prompt_hasher, self.feed_interval_s, self.feed_wait_s = prompt_hasher, feed_interval_s, feed_wait_s
        self.feed_long_poll = {name: True for name in self.endpoints}
        self.feeds = {name: routing.ReplicaBlocks() for name in self.endpoints}
        self.feed_live = {name: False for name in self.endpoints}
        self.feed_problem: dict[str, str] = {name: "not polled yet" for name in self.endpoints}
        for name in self.endpoints:
            self.metrics.up.labels(name).set(1)
            self.metrics.in_flight.labels(name).set(0)
            self.metrics.feed_up.labels(name).set(0)
        self._client = httpx.AsyncClient(timeout=httpx.Timeout(read_timeout_s, connect=10.0),
                                         limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
                                         transport=transport)  # tests pass fake replicas here
        self._health_task: asyncio.Task | None = None
        self._feed_tasks: list[asyncio.Task] = []
        self.app = Starlette(routes=[
            Route("/health", self.health, methods=["GET"]),
            Route("/replicas", self.replicas, methods=["GET"]),
            Route("/router/routing", self.set_routing, methods=["PUT"]),
            Route("/reset_prefix_cache", self.reset_prefix_cache, methods=["POST"]),
            Route(CACHE_PATH, self.cache_api, methods=["GET"]),
            Route(CACHE_PATH + "/pin", self.cache_api, methods=["POST"]),
            Route(CACHE_PATH + "/{prefix}", self.cache_api, methods=["DELETE"]),
            Route("/metrics", self.metrics_endpoint, methods=["GET"]),
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/completions", self.generate, methods=["POST"]),
            Route("/v1/chat/completions", self.generate, methods=["POST"]),
        ], lifespan=self._lifespan, middleware=[
            Middleware(ApiKeyMiddleware, digests=[_key_digest(k) for k in api_keys],
                       on_refused=lambda: self.metrics.errors.labels("none", "unauthorized").inc())])

    # --- lifecycle and health ---
    @contextlib.asynccontextmanager
    async def _lifespan(self, _app):
        self._health_task = asyncio.create_task(self._health_loop())
        self._feed_tasks = [asyncio.create_task(self._feed_loop(n)) for n in self.endpoints]
        if self.prompt_hasher is not None:
            self._feed_tasks.append(asyncio.create_task(asyncio.to_thread(self.prompt_hasher.warm_up)))
        try:
            yield
        finally:
            for task in (self._health_task, *self._feed_tasks):
                task.cancel()
            await asyncio.gather(self._health_task, *self._feed_tasks, return_exceptions=True)
            await self._client.aclose()

    def _set_health(self, name: str, healthy: bool, why: str = "") -> None:
        if self.policy.healthy[name] != healthy:
            log.warning("replica %s is %s%s", name, "back up" if healthy else "DOWN", f" ({why})" if why else "")
        self.policy.mark(name, healthy)
        self.metrics.up.labels(name).set(1 if healthy else 0)

    async def check_health(self, name: str) -> bool:
        try:
            r = await self._client.get(self.endpoints[name].base_url + "/health", headers=self.upstream_auth,
                                       timeout=5.0)
            ok = r.status_code == 200
            why = f"/health answered {r.status_code}"
        except httpx.HTTPError as exc:
            ok, why = False, f"{type(exc).__name__}"
        self._set_health(name, ok, why)
        return ok

    # --- cache-events feeds (tier-aware routing) ---
    async def poll_feed(self, name: str, wait_s: float = 0.0) -> bool:
        """Ask one replica for the cache events since the last one seen (a long poll of up to ``wait_s`` where
        the replica supports it); True if its feed answered."""
        blocks = self.feeds[name]
        params: dict[str, Any] = {"since": blocks.seq}
        if blocks.epoch is not None:
            params["epoch"] = blocks.epoch  # a new engine life answers with its full state at once
        if wait_s > 0 and self.feed_long_poll[name]:
            params["wait_s"] = wait_s
        try:
            r = await self._client.get(self.endpoints[name].base_url + CACHE_EVENTS_PATH, params=params,
                                       headers=self.upstream_auth, timeout=10.0 + params.get("wait_s", 0))
            if r.status_code == 400 and "wait_s" in params:  # no long polls there: plain polling from now on
                self.feed_long_poll[name] = False
                return await self.poll_feed(name)
            if r.status_code != 200:
                return self._set_feed(name, False, f"{CACHE_EVENTS_PATH} answered HTTP {r.status_code}")
            blocks.apply(r.json())
        except (httpx.HTTPError, ValueError, routing.FeedError) as exc:  # ValueError: not JSON
            return self._set_feed(name, False, f"{type(exc).__name__}: {exc}")
        for tier, n in blocks.blocks_per_tier().items():
            self.metrics.cached_blocks.labels(name, tier).set(n)
        return self._set_feed(name, True)

    def _set_feed(self, name: str, live: bool, why: str = "") -> bool:
        if self.feed_live[name] != live:
            log.log(logging.INFO if live else logging.WARNING, "replica %s cache-events feed is %s%s", name,
                    "live" if live else "unavailable (routing it by affinity)", f": {why}" if why else "")
        self.feed_live[name], self.feed_problem[name] = live, why
        self.metrics.feed_up.labels(name).set(1 if live else 0)
        return live

    async def _feed_loop(self, name: str) -> None:
        loop = asyncio.get_running_loop()
        while True:
            live, again = False, False
            if self.policy.mode == "tier-aware" and self.policy.healthy[name]:
                seq, t0 = self.feeds[name].seq, loop.time()
                live = await self.poll_feed(name, self.feed_wait_s)
                # news, or a long poll that waited: ask again at once; a quick answer without news: pace
                again = live and (self.feeds[name].seq != seq or loop.time() - t0 >= self.feed_wait_s / 2 > 0)
            elif self.feed_live[name]:
                self._set_feed(name, False, "replica down" if not self.policy.healthy[name] else "not tier-aware")
            if not again:
                await asyncio.sleep(self.feed_interval_s if live or self.policy.mode != "tier-aware"
                                    else FEED_RETRY_S)

    async def _prefix_matches(self, path: str, body: dict[str, Any]) -> tuple[dict[str, routing.PrefixMatch],
                                                                               dict[str, Any]]:
        """What each replica with a live feed holds of this request, and facts for the route header."""
        live = [n for n in self.endpoints if self.feed_live[n] and self.policy.healthy[n]]
        info: dict[str, Any] = {"feeds": f"{len(live)}/{len(self.endpoints)}"}
        if self.policy.mode != "tier-aware" or self.prompt_hasher is None or not live:
            return {}, info
        by_size: dict[int, list[bytes]] = {}
        for n in live:
            size = self.feeds[n].block_size
            if size not in by_size:  # replicas of one `kvplug serve` share it: hashed once
                by_size[size] = await asyncio.to_thread(self.prompt_hasher.block_hashes, path, body, size)
        matches = {n: self.feeds[n].match(by_size[self.feeds[n].block_size]) for n in live}
        info["prompt_blocks"] = {n: len(by_size[self.feeds[n].block_size]) for n in live}
        info["block_size"] = {n: self.feeds[n].block_size for n in live}
        return matches, info

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self.check_health(n) for n in self.endpoints), return_exceptions=True)
            await asyncio.sleep(self.health_interval_s)

    # --- small endpoints ---
    async def health(self, _request: Request) -> Response:
        up = self.policy.healthy_replicas()
        body = {"status": "ok" if up else "no healthy replica", "replicas_up": len(up),
                "replicas": len(self.endpoints)}
        return JSONResponse(body, status_code=200 if up else 503)

    async def replicas(self, _request: Request) -> Response:
        return JSONResponse({"routing": self.policy.mode, "load_factor": self.policy.load_factor,
                             "capacity": self.policy.capacity(), "replicas": [
                                 {"name": n, "url": e.base_url, "healthy": self.policy.healthy[n],
                                  "in_flight": self.policy.in_flight[n], "cache_feed": self._feed_info(n),
                                  **e.info}
                                 for n, e in self.endpoints.items()]})

    def _feed_info(self, name: str) -> dict[str, Any]:
        b = self.feeds[name]
        return {"live": self.feed_live[name], "problem": self.feed_problem[name] or None, "epoch": b.epoch,
                "seq": b.seq, "block_size": b.block_size, "blocks": b.blocks_per_tier()}

    async def set_routing(self, request: Request) -> Response:
        """Switch affinity <-> round-robin at run time (A/B runs without restarting the engines)."""
        try:
            body = routing.parse_json_body(await self._read_body(request))
            mode = body.get("mode")
            if mode not in routing.ROUTING_MODES:
                raise routing.BadRequest(f"'mode' must be one of {', '.join(routing.ROUTING_MODES)}, got {mode!r}")
        except routing.BadRequest as exc:
            self.metrics.bad_requests.inc()
            return _error(400, str(exc), "BadRequestError")
        except _Refused as exc:
            return self._refused(exc)
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        self.policy.mode = mode
        log.info("routing mode set to %s", mode)
        return JSONResponse({"routing": mode})

    async def cache_api(self, request: Request) -> Response:
        """The replicas' /kvplug/cache (serving/cache_api.py): ``?replica=NAME`` asks that one and answers as it
        does; else every healthy replica is asked: {"replicas": {name: its answer}} (a pin or DELETE names a
        prefix one replica holds: 200 if any replica did it)."""
        params = dict(request.query_params)
        only = params.pop("replica", None)
        if only is not None and only not in self.endpoints:
            return _error(400, f"replica {only!r} is not one of {', '.join(self.endpoints)}", "BadRequestError")
        try:
            raw = await self._read_body(request) if request.method == "POST" else b""
        except _Refused as exc:
            return self._refused(exc)
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        names = [only] if only is not None else self.policy.healthy_replicas()

        async def ask(name: str) -> tuple[int, Any]:
            try:
                r = await self._client.request(request.method, self.endpoints[name].base_url + request.url.path,
                                               params=params, content=raw or None, timeout=30.0,
                                               headers={**self.upstream_auth, "content-type": "application/json"})
                return r.status_code, r.json()
            except (httpx.HTTPError, ValueError) as exc:
                return 502, {"error": {"message": f"replica {name}: {type(exc).__name__}: {exc}", "code": 502}}

        answers = dict(zip(names, await asyncio.gather(*(ask(n) for n in names))))
        if only is not None:
            status, body = answers[only]
            return JSONResponse({**body, "replica": only} if isinstance(body, dict) else body, status_code=status)
        ok = [s for s, _ in answers.values() if s == 200]
        status = 200 if ok or not answers else min(s for s, _ in answers.values())
        return JSONResponse({"replicas": {n: b for n, (_, b) in answers.items()}}, status_code=status)

    async def reset_prefix_cache(self, _request: Request) -> Response:
        """Forwarded to every healthy replica (vLLM serves it with VLLM_SERVER_DEV_MODE=1)."""
        names = self.policy.healthy_replicas()
        results = await asyncio.gather(*(self._client.post(self.endpoints[n].base_url + "/reset_prefix_cache",
                                                           headers=self.upstream_auth, timeout=60.0)
                                         for n in names), return_exceptions=True)
        statuses = {n: (r.status_code if isinstance(r, httpx.Response) else type(r).__name__)
                    for n, r in zip(names, results)}
        for n, status in statuses.items():
            if status != 200:
                self.metrics.errors.labels(n, "reset_prefix_cache").inc()
        ok = bool(names) and all(v == 200 for v in statuses.values())
        return JSONResponse({"replicas": statuses}, status_code=200 if ok else 502 if names else 503)

    async def models(self, request: Request) -> Response:
        for name in self.policy.healthy_replicas():
            try:
                r = await self._client.get(self.endpoints[name].base_url + "/v1/models",
                                           headers=self._forward_headers(request), timeout=30.0)
            except httpx.HTTPError as exc:
                self.metrics.errors.labels(name, "connect").inc()
                self._set_health(name, False, type(exc).__name__)
                continue
            return Response(r.content, status_code=r.status_code, media_type="application/json")
        self.metrics.errors.labels("none", "no_replica").inc()
        return _error(503, "no healthy replica is available", "service_unavailable")

    async def metrics_endpoint(self, _request: Request) -> Response:
        names = list(self.endpoints)

        async def scrape(name: str) -> str | None:
            try:
                r = await self._client.get(self.endpoints[name].base_url + "/metrics", headers=self.upstream_auth,
                                           timeout=10.0)
                return r.text if r.status_code == 200 else None
            except httpx.HTTPError:
                return None

        texts = await asyncio.gather(*(scrape(n) for n in names))
        merged = _merge_replica_metrics({n: t for n, t in zip(names, texts) if t is not None})
        registry = CollectorRegistry()
        registry.register(_Families(merged))
        body = generate_latest(self.metrics.registry) + generate_latest(registry)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    # --- generation ---
    def _forward_headers(self, request: Request) -> dict[str, str]:
        headers = {k: v for k, v in request.headers.items() if k.lower() in PROXIED_REQUEST_HEADERS}
        if self.upstream_auth:  # the client's key was checked here; the replicas know only the router's
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"} | self.upstream_auth
        return headers

    async def _read_body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it is known to exceed max_body_bytes."""
        too_large = _Refused(413, f"request body exceeds the router's limit of {self.max_body_bytes} bytes "
                                  "(--router-max-body-bytes)", "body_too_large")
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_large
            chunks.append(chunk)
        return b"".join(chunks)

    def _refused(self, exc: _Refused) -> Response:
        self.metrics.errors.labels("none", exc.kind).inc()
        return _error(exc.status, str(exc), "BadRequestError")

    async def generate(self, request: Request) -> Response:
        try:
            session = request.headers.get(routing.SESSION_HEADER, "")
            if len(session.encode("latin-1", "replace")) > self.max_session_id_bytes:
                raise _Refused(431, f"header '{routing.SESSION_HEADER}' exceeds the router's limit of "
                                    f"{self.max_session_id_bytes} bytes (--router-max-session-id-bytes)",
                               "header_too_large")
            raw = await self._read_body(request)
        except _Refused as exc:
            return self._refused(exc)
        except ClientDisconnect:
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        # A non-streaming answer comes in one piece at the end: without this, a client that gave up would
        # leave its request running on the replica until it finished.
        proxied = asyncio.ensure_future(self._proxy(request, raw))
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({proxied, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:  # also when this handler is cancelled (server stopping)
            gone.cancel()
            if not proxied.done():
                proxied.cancel()  # closes the upstream request; _proxy counts it and frees the replica's slot
                await asyncio.gather(proxied, return_exceptions=True)
        if proxied.cancelled():
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        return proxied.result()

    async def _proxy(self, request: Request, raw: bytes) -> Response:
        try:
            body = routing.parse_json_body(raw)
            key = routing.affinity_key(request.url.path, body, request.headers, self.prefix_chars)
        except routing.BadRequest as exc:
            self.metrics.bad_requests.inc()
            return _error(400, str(exc), "BadRequestError")
        stream = bool(body.get("stream"))
        headers = self._forward_headers(request)
        headers.setdefault("content-type", "application/json")
        tried: set[str] = set()
        last_error = "no healthy replica is available"
        with self.metrics.route_seconds.time():
            matches, route_info = await self._prefix_matches(request.url.path, body)
        while True:
            try:
                decision = self.policy.choose(key, exclude=tried, matches=matches,
                                              prompt_blocks=max(route_info.get("prompt_blocks", {}).values(),
                                                                default=0))
            except routing.NoReplicaAvailable:
                self.metrics.errors.labels("none", "no_replica").inc()
                detail = f" (tried {', '.join(sorted(tried))}: {last_error})" if tried else ""
                return _error(503, f"no healthy replica could serve the request{detail}", "service_unavailable")
            name = decision.replica
            tried.add(name)
            self._count_decision(decision, route_info)
            self._started(name)
            try:
                response = await self._send(name, request.url.path, raw, headers, stream,
                                            self._route_header(decision, route_info))
            except _UpstreamFailed as exc:
                self._finished(name)
                last_error = str(exc)
                self.metrics.retries.labels(name).inc()
                self.metrics.errors.labels(name, "connect").inc()
                self._set_health(name, False, last_error)
                continue
            except _UpstreamTimeout as exc:
                self._finished(name)
                self.metrics.errors.labels(name, "read_timeout").inc()
                return _error(504, str(exc), "gateway_timeout")
            except asyncio.CancelledError:
                self._finished(name)
                self.metrics.errors.labels(name, "client_disconnected").inc()
                raise
            except BaseException:
                self._finished(name)
                raise
            return response

    def _route_header(self, d: routing.Decision, info: dict[str, Any]) -> str:
        """Why this replica: ``reason=...; mode=...; feeds=live/all`` and, when the prompt was matched
        against the feeds, its blocks held by this replica (``matched_blocks``, per tier) of ``prompt_blocks``."""
        parts = [f"reason={d.reason}", f"mode={self.policy.mode}", f"feeds={info['feeds']}"]
        if d.replica in info.get("prompt_blocks", {}):
            m = d.match or routing.PrefixMatch()
            parts += [f"matched_blocks={m.blocks}", f"prompt_blocks={info['prompt_blocks'][d.replica]}",
                      f"block_size={info['block_size'][d.replica]}",
                      *(f"{t}={m.per_tier.get(t, 0)}" for t in routing.TIERS)]
            if d.reason != "tier_hit":
                parts.append(f"best_blocks={d.best_blocks}")
        return "; ".join(parts)

    def _count_decision(self, d: routing.Decision, info: dict[str, Any]) -> None:
        if d.replica in info.get("prompt_blocks", {}):
            self.metrics.prompt_blocks.labels(d.replica).inc(info["prompt_blocks"][d.replica])
            self.metrics.matched_blocks.labels(d.replica).inc(d.match.blocks if d.match else 0)
        self.metrics.routed.labels(d.replica, d.reason).inc()
        if d.affinity_hit:
            self.metrics.affinity_hits.labels(d.replica).inc()
        elif d.reason in ("load_bound", "home_down"):
            self.metrics.fallbacks.labels(d.replica, d.reason).inc()

    def _started(self, name: str) -> None:
        self.policy.started(name)
        self.metrics.in_flight.labels(name).set(self.policy.in_flight[name])

    def _finished(self, name: str) -> None:
        self.policy.finished(name)
        self.metrics.in_flight.labels(name).set(self.policy.in_flight[name])

    async def _send(self, name: str, path: str, raw: bytes, headers: dict[str, str], stream: bool,
                    route: str) -> Response:
        """Forward one request; _UpstreamFailed if the replica failed before any byte reached the client.

        On success the response owns the in-flight slot and releases it when relayed."""
        url = self.endpoints[name].base_url + path
        upstream_req = self._client.build_request("POST", url, content=raw, headers=headers)
        try:
            upstream = await self._client.send(upstream_req, stream=True)
        except httpx.ReadTimeout:
            raise self._timeout(name, "its response headers") from None
        except httpx.HTTPError as exc:
            raise _UpstreamFailed(f"{name}: {type(exc).__name__}: {exc}".rstrip(": ")) from None
        out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        out_headers[REPLICA_HEADER] = name
        out_headers[ROUTE_HEADER] = route
        if not stream or upstream.status_code != 200:
            try:
                content = await upstream.aread()
            except httpx.ReadTimeout:
                raise self._timeout(name, "the rest of its response") from None
            except httpx.HTTPError as exc:
                raise _UpstreamFailed(f"{name}: {type(exc).__name__} while reading the response") from None
            finally:
                await upstream.aclose()
            self.metrics.completed.labels(name, str(upstream.status_code)).inc()
            self._finished(name)
            return Response(content, status_code=upstream.status_code, headers=out_headers)
        # Streaming: wait for the first chunk here, so a replica that dies before producing anything is
        # still retried elsewhere; after that, bytes go to the client as they come.
        chunks = upstream.aiter_raw()
        try:
            first = await chunks.__anext__()
        except StopAsyncIteration:
            first = b""
        except httpx.ReadTimeout:
            await upstream.aclose()
            raise self._timeout(name, "the first streamed byte") from None
        except httpx.HTTPError as exc:
            await upstream.aclose()
            raise _UpstreamFailed(f"{name}: {type(exc).__name__} before the first streamed byte") from None
        except BaseException:  # cancelled (client gone): the connection must not stay open
            await upstream.aclose()
            raise
        return StreamingResponse(self._relay(name, upstream, first, chunks), status_code=200,
                                 headers=out_headers)

    def _timeout(self, name: str, waiting_for: str) -> _UpstreamTimeout:
        seconds = self._client.timeout.read
        return _UpstreamTimeout(f"replica {name} sent nothing for {seconds:g}s while the router waited for "
                                f"{waiting_for} (--router-read-timeout)")

    async def _relay(self, name: str, upstream: httpx.Response, first: bytes,
                     chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        ok = False
        try:
            if first:
                yield first
            async for chunk in chunks:
                yield chunk
            ok = True
        except httpx.HTTPError as exc:
            # Part of the answer was already sent: it cannot be retried transparently. Tell the client
            # in-band (OpenAI-style error event) and count it.
            self.metrics.errors.labels(name, "broken_stream").inc()
            self._set_health(name, False, f"stream broke: {type(exc).__name__}")
            err = {"error": {"message": f"replica {name} failed mid-stream ({type(exc).__name__}); "
                                        "the response is incomplete", "type": "replica_failed", "code": 502}}
            yield f"data: {json.dumps(err)}\n\n".encode()
        finally:
            await upstream.aclose()
            self._finished(name)
            if ok:
                self.metrics.completed.labels(name, "200").inc()


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone away (the body was read already: only http.disconnect comes)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(status: int, message: str, kind: str) -> JSONResponse:
    """vLLM/OpenAI-shaped error body."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


def serve_router(router: ReplicaRouter, host: str, port: int) -> None:
    """Run the router in the foreground (blocks until SIGINT/SIGTERM)."""
    import uvicorn

    uvicorn.Server(uvicorn.Config(router.app, host=host, port=port, log_level="warning", access_log=False)).run()
