"""Router guards: API keys on /v1 and admin routes, body and session-header limits, the read timeout and
cancelling the upstream request when the client goes away. Fake replicas, no engines."""
from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serving.router import ReplicaEndpoint, ReplicaRouter
from tests.benchmarks.fake_openai import FakeOpenAI
from tests.serving.test_replicas_routing import FakeReplicas, chat, run_router, samples

KEY = {"authorization": "Bearer client-key"}


def errors(metrics_text: str) -> dict[tuple[str, str], float]:
    return {(dict(labels)["replica"], dict(labels)["kind"]): v for (name, labels), v in samples(metrics_text).items()
            if name == "kvplug_router_errors_total"}


def test_api_key_guards_v1_and_admin_routes_and_replicas_get_the_routers_own_key():
    fake = FakeReplicas(["r0"])
    seen_auth = []
    inner = fake.handler

    async def handler(request):
        seen_auth.append(request.headers.get("authorization"))
        return await inner(request)

    fake.handler = handler

    async def go(client, router):
        router.endpoints["r0"].info.update(pid=4242, log="/tmp/secret/r0.log")
        refused = {
            "generate": await client.post("/v1/chat/completions", json=chat("hi")),
            "wrong key": await client.post("/v1/chat/completions", json=chat("hi"),
                                           headers={"authorization": "Bearer nope"}),
            "models": await client.get("/v1/models"),
            "replicas": await client.get("/replicas"),
            "routing": await client.put("/router/routing", json={"mode": "round-robin"}),
            "reset": await client.post("/reset_prefix_cache"),
            "unknown": await client.get("/router/anything"),
        }
        seen_auth.clear()
        ok = await client.post("/v1/chat/completions", json=chat("hi"), headers=KEY)
        upstream_auth = [a for a in seen_auth]
        replicas = await client.get("/replicas", headers=KEY)
        open_ = [await client.get("/health"), await client.get("/metrics")]
        return refused, ok, upstream_auth, replicas, open_, router.policy.mode

    refused, ok, upstream_auth, replicas, open_, mode = run_router(fake, go, api_keys=["client-key"],
                                                                  upstream_api_key="replica-key")
    for what, r in refused.items():
        assert r.status_code == 401, what
        err = r.json()["error"]
        assert err["code"] == 401 and "API key" in err["message"], what
        assert "4242" not in r.text and "secret" not in r.text
    assert mode == "affinity"                                     # the refused PUT changed nothing
    assert ok.status_code == 200 and "Bearer replica-key" in upstream_auth
    assert "Bearer client-key" not in upstream_auth               # the client's key never reaches a replica
    assert replicas.status_code == 200 and replicas.json()["replicas"][0]["pid"] == 4242
    assert all(r.status_code == 200 for r in open_)
    assert errors(open_[1].text)[("none", "unauthorized")] == len(refused)


def test_without_api_keys_nothing_is_checked():
    fake = FakeReplicas(["r0"])

    async def go(client, router):
        return (await client.post("/v1/chat/completions", json=chat("hi"))).status_code

    assert run_router(fake, go) == 200


def test_oversized_body_is_413_and_oversized_session_header_is_431():
    fake = FakeReplicas(["r0"])

    async def go(client, router):
        big = await client.post("/v1/completions", json={"model": "m", "prompt": "x" * 5000})
        async def no_content_length():
            for part in (b'{"prompt": "', b"x" * 5000, b'"}'):
                yield part
        chunked = await client.post("/v1/completions", content=no_content_length())
        fits = await client.post("/v1/completions", json={"model": "m", "prompt": "x" * 100})
        session = await client.post("/v1/completions", json={"model": "m", "prompt": "x"},
                                    headers={"x-session-id": "s" * 65})
        admin = await client.put("/router/routing", content=b" " * 5000)
        return big, chunked, fits, session, admin, (await client.get("/metrics")).text

    big, chunked, fits, session, admin, metrics = run_router(fake, go, max_body_bytes=1000,
                                                            max_session_id_bytes=64)
    for r in (big, chunked, admin):
        assert r.status_code == 413 and "1000 bytes" in r.json()["error"]["message"]
    assert fits.status_code == 200
    assert session.status_code == 431 and "x-session-id" in session.json()["error"]["message"]
    assert fake.seen["r0"] == [{"model": "m", "prompt": "x" * 100}]     # nothing refused reached a replica
    assert errors(metrics)[("none", "body_too_large")] == 3
    assert errors(metrics)[("none", "header_too_large")] == 1


def test_client_disconnect_cancels_the_non_streaming_upstream_request():
    """A client that gives up must not leave its request running on the replica (the engine would keep
    generating for nobody); the replica sees its request closed at once, not when it would have finished."""
    fake = FakeReplicas(["r0"])
    upstream_started, upstream_closed = asyncio.Event(), asyncio.Event()

    async def slow_replica(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/v1/chat/completions":
            return httpx.Response(200)
        upstream_started.set()
        try:
            await asyncio.sleep(3600)     # a long non-streaming generation
            return httpx.Response(200, json={})
        finally:
            upstream_closed.set()

    fake.handler = slow_replica

    async def go(_client, router):
        body = json.dumps(chat("hi")).encode()
        client_gone = asyncio.Event()
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await client_gone.wait()
            return {"type": "http.disconnect"}

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"",
                 "query_string": b"", "root_path": "", "headers": [(b"content-type", b"application/json")],
                 "client": ("127.0.0.1", 1), "server": ("router", 80)}
        app = asyncio.ensure_future(router.app(scope, receive, send))
        await asyncio.wait_for(upstream_started.wait(), 5)
        client_gone.set()
        try:
            await asyncio.wait_for(upstream_closed.wait(), 2)   # the replica would have run for an hour
            closed = True
        except asyncio.TimeoutError:
            closed = False
        app.cancel()
        await asyncio.gather(app, return_exceptions=True)
        return closed, router.policy.in_flight["r0"], (await _client.get("/metrics")).text

    closed, in_flight, metrics = run_router(fake, go)
    assert closed, "the upstream request kept running after the client went away"
    assert in_flight == 0
    assert errors(metrics)[("r0", "client_disconnected")] == 1


@pytest.fixture
def slow_openai():
    server = FakeOpenAI().start()
    server.answer = "slow"
    yield server
    server.stop()


def test_read_timeout_is_a_504_without_retry_and_the_replica_stays_up(slow_openai):
    slow_openai.first_token_delay = 3.0  # headers at once, then nothing for longer than the read timeout
    router = ReplicaRouter([ReplicaEndpoint("r0", slow_openai.base_url), ReplicaEndpoint("r1", slow_openai.base_url)],
                           read_timeout_s=0.5, health_interval_s=3600)

    async def main():
        async with router.app.router.lifespan_context(router.app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=router.app), base_url="http://router",
                                         timeout=10) as client:
                r = await client.post("/v1/chat/completions", json=chat("hi"))
                return r, (await client.get("/metrics")).text

    r, metrics = asyncio.run(main())
    assert r.status_code == 504 and "nothing for 0.5s" in r.json()["error"]["message"]
    assert "--router-read-timeout" in r.json()["error"]["message"]
    assert slow_openai.requests == 1                      # not retried on the other replica
    assert all(router.policy.healthy.values())            # slow is not dead
    assert sum(v for (_, kind), v in errors(metrics).items() if kind == "read_timeout") == 1
