"""Load generator: sessions of shared-context requests with SCBench's two modes.

* ``multi-turn``: turn *i* sends the context, every earlier question, the
  golden answer of every earlier turn (or the model's own answer with
  ``own_answers``) and the new question, as a chat.  A session's turns are
  sequential.
* ``multi-request``: every turn is an independent request ``context + question``;
  all requests of all sessions are issued concurrently.

Bounds: ``concurrency`` caps in-flight requests; ``rate`` (requests/s) draws
Poisson arrival times shared by all sessions (``inf``: no pacing);
``max_requests`` caps the requests issued and ``max_seconds`` the wall time
(in-flight requests are cancelled and recorded as ``cancelled``).  Cancelling
:func:`run_load` itself (Ctrl-C) stops the same way, with stop reason
``interrupted``, and still returns every record.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import time
from typing import Callable

import httpx

from .client import StreamResult, stream_chat
from .scoring import answer_text, score
from .tasks.base import Case

MODES = ("multi-turn", "multi-request")
# Every request names its shared context, so a router can pin a session to a replica.
SESSION_HEADER = "X-Session-Id"  # what `kvplug serve --replicas` routes on


@dataclasses.dataclass
class LoadConfig:
    api_base: str
    model: str
    mode: str = "multi-turn"
    concurrency: int = 8
    rate: float = math.inf
    max_requests: int | None = None
    max_seconds: float | None = None
    max_tokens: int = 32
    temperature: float = 0.0
    own_answers: bool = False
    request_timeout: float = 600.0
    seed: int = 0
    extra_body: dict | None = None  # merged into every request body
    # Session i also merges session_bodies[i % len] (e.g. a cache policy per session), over extra_body.
    session_bodies: list[dict] | None = None
    repeat: bool = False  # multi-turn sessions start over at turn 1 until max_requests/max_seconds stop them


def session_body(cfg: LoadConfig, session: int) -> dict | None:
    """The extra request body of ``session``: extra_body with its session_bodies entry merged in
    (``kv_transfer_params`` merged key by key)."""
    if not cfg.session_bodies:
        return cfg.extra_body
    own = cfg.session_bodies[session % len(cfg.session_bodies)]
    body = {**(cfg.extra_body or {}), **own}
    if "kv_transfer_params" in own and "kv_transfer_params" in (cfg.extra_body or {}):
        body["kv_transfer_params"] = {**cfg.extra_body["kv_transfer_params"], **own["kv_transfer_params"]}
    return body


def turn_messages(case: Case, t: int, replies: list[str]) -> list[dict]:
    """The chat of turn ``t`` (0-based) of a multi-turn session, given the assistant replies of turns < t."""
    messages: list[dict] = []
    for i in range(t + 1):
        turn = case.multi_turns[i]
        messages.append({"role": "user", "content": (case.context + "\n\n" + turn.input) if i == 0 else turn.input})
        if i < t:
            messages.append({"role": "assistant", "content": replies[i]})
    return messages


class ArrivalClock:
    """Poisson arrivals: the k-th ``wait()`` returns at the k-th arrival time
    (exponential gaps with mean 1/rate), or at once if that time has passed."""

    def __init__(self, rate: float, seed: int, t0: float):
        self.rate = rate
        self.rng = random.Random(f"arrivals:{seed}")
        self.next_at = t0

    async def wait(self) -> None:
        if math.isinf(self.rate):
            return
        at = self.next_at
        self.next_at += self.rng.expovariate(self.rate)
        delay = at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)


class _Budget:
    def __init__(self, max_requests: int | None, deadline: float | None):
        self.max_requests = max_requests
        self.deadline = deadline
        self.issued = 0
        self.stop_reason: str | None = None

    def take(self) -> bool:
        if self.max_requests is not None and self.issued >= self.max_requests:
            self.stop_reason = self.stop_reason or "max-requests"
            return False
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            self.stop_reason = self.stop_reason or "max-seconds"
            return False
        self.issued += 1
        return True


def planned_requests(cases: list[Case], max_requests: int | None) -> int:
    total = sum(len(c.multi_turns) for c in cases)
    return min(total, max_requests) if max_requests is not None else total


async def run_load(cases: list[Case], cfg: LoadConfig,
                   on_record: Callable[[dict], None] | None = None,
                   client: httpx.AsyncClient | None = None) -> dict:
    """Run the load; returns ``{"records", "wall_s", "stop_reason", "issued", "started_unix"}``.

    Records are appended in completion order; each has ``start`` (seconds since
    the run began) for ordering.
    """
    if cfg.mode not in MODES:
        raise ValueError(f"unknown mode {cfg.mode!r}")
    own_client = client is None
    if own_client:
        limits = httpx.Limits(max_connections=cfg.concurrency + 4,
                              max_keepalive_connections=cfg.concurrency + 4)
        client = httpx.AsyncClient(timeout=httpx.Timeout(cfg.request_timeout), limits=limits)
    t0 = time.perf_counter()
    t0_unix = time.time()  # records' ``start`` on the wall clock, to line them up with outside events
    deadline = t0 + cfg.max_seconds if cfg.max_seconds is not None else None
    budget = _Budget(cfg.max_requests, deadline)
    clock = ArrivalClock(cfg.rate, cfg.seed, t0)
    sem = asyncio.Semaphore(cfg.concurrency)
    records: list[dict] = []

    def emit(rec: dict) -> None:
        records.append(rec)
        if on_record:
            on_record(rec)

    async def one(session: int, case: Case, t: int, messages: list[dict], round_: int = 0) -> StreamResult | None:
        turn = case.multi_turns[t]
        body = session_body(cfg, session)
        await clock.wait()
        async with sem:
            if not budget.take():
                return None
            start = time.perf_counter() - t0
            rec = {
                "session": session, "case_id": case.id, "turn": t + 1, "task": turn.task,
                "mode": cfg.mode, "scorer": turn.scorer, "start": round(start, 6),
                "context_tokens": case.context_tokens, "answer": turn.answer,
            }
            if cfg.session_bodies:
                rec["policy"] = ((body or {}).get("kv_transfer_params") or {}).get("kvplug_policy", "default")
            if cfg.repeat:
                rec["round"] = round_
            try:
                res = await stream_chat(client, cfg.api_base, cfg.model, messages,
                                        cfg.max_tokens, cfg.temperature, cfg.request_timeout,
                                        extra_body=body,
                                        headers={SESSION_HEADER: case.id})
            except asyncio.CancelledError:
                res = StreamResult(status="cancelled", error="cancelled: run bound reached",
                                   e2e=time.perf_counter() - t0 - start)
                rec.update(_result_fields(res, turn))
                emit(rec)
                raise
            rec.update(_result_fields(res, turn))
            emit(rec)
            return res

    async def multi_turn_session(session: int, case: Case) -> None:
        round_ = 0
        while True:
            replies: list[str] = []
            for t, turn in enumerate(case.multi_turns):
                res = await one(session, case, t, turn_messages(case, t, replies), round_)
                if res is None:
                    return
                replies.append(res.text if (cfg.own_answers and res.status == "ok") else answer_text(turn.answer))
            if not cfg.repeat:
                return
            round_ += 1

    async def multi_request_one(session: int, case: Case, t: int) -> None:
        turn = case.multi_turns[t]
        await one(session, case, t, [{"role": "user", "content": case.context + "\n\n" + turn.input}])

    if cfg.mode == "multi-turn":
        coros = [multi_turn_session(i, c) for i, c in enumerate(cases)]
    else:
        coros = [multi_request_one(i, c, t) for i, c in enumerate(cases)
                 for t in range(len(c.multi_turns))]
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        timeout = None if deadline is None else max(0.0, deadline - time.perf_counter())
        try:
            done, pending = await asyncio.wait(tasks, timeout=timeout)
        except asyncio.CancelledError:
            # Ctrl-C (asyncio.run cancels us): stop like a bound, so what finished is kept
            budget.stop_reason = "interrupted"
            done = {t for t in tasks if t.done()}
            pending = {t for t in tasks if not t.done()}
        if pending:
            budget.stop_reason = budget.stop_reason or "max-seconds"
            for p in pending:
                p.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for d in done:
            if not d.cancelled() and d.exception() is not None:
                raise d.exception()
    finally:
        if own_client:
            await client.aclose()
    wall = time.perf_counter() - t0
    records.sort(key=lambda r: (r["start"], r["session"], r["turn"]))
    return {"records": records, "wall_s": wall, "issued": budget.issued, "started_unix": t0_unix,
            "stop_reason": budget.stop_reason or "completed"}


def _result_fields(res: StreamResult, turn) -> dict:
    ok = res.status == "ok"
    return {
        "status": res.status,
        "http_status": res.http_status,
        "error": res.error,
        "prompt_tokens": res.prompt_tokens,
        "cached_tokens": res.cached_tokens,
        "output_tokens": res.output_tokens,
        "ttft": res.ttft,
        "tpot": res.tpot,
        "e2e": res.e2e,
        "finish_reason": res.finish_reason,
        "replica": res.replica,
        "route": res.route,
        "cache": res.cache,
        "prediction": res.text,
        "score": score(turn.scorer, res.text, turn.answer) if ok else None,
    }
