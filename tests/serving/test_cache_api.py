"""The API server side of cache control (serving/cache_api.py) against a fake engine on the control socket:
routes, API key, bad parameters, and the report in headers and bodies (plain and streaming)."""
from __future__ import annotations

import asyncio
import json

import pytest

from offload import control, request_keys
from serving import cache_api
from serving.policy_middleware import _replay

REPORT = {"prompt_tokens": 70, "gpu_tokens": 16, "cpu_tokens": 32, "disk_tokens": 0, "recomputed_tokens": 22,
          "missed_blocks": 1, "policy": "keep", "priority": "normal", "offload": True,
          "first_miss": {"block": 3, "token": 48, "reason": "evicted_from_disk"}, "pin": None, "final": True}


@pytest.fixture
def engine(tmp_path, monkeypatch):
    """A fake scheduler side answering on the control socket; records what it was asked."""
    asked = []

    def answer(msg):
        asked.append(msg)
        if msg["op"] == "report":
            return {"ok": True, "report": dict(REPORT)}
        if msg["op"] == "pin" and msg["prefix"] == "nope":
            return {"ok": False, "status": 404, "error": "no resident prefix 'nope'"}
        return {"ok": True, "echo": msg}

    path = tmp_path / "engine.sock"
    monkeypatch.setattr(control, "socket_path", lambda pid: path)
    server = control.ControlServer(answer, path)
    yield asked
    server.close()


def call(api, method, path, body=b"", headers=(), query=b"", app=None):
    sent = []

    async def send(m):
        sent.append(m)

    receive = _replay([{"type": "http.request", "body": body, "more_body": False}])
    scope = {"type": "http", "method": method, "path": path, "headers": list(headers), "query_string": query}

    async def run():
        if api.handles(scope):
            await api.route(scope, receive, send)
        else:
            await api.serve_with_report(app, scope, json.loads(body), lambda m: _replay(m), send)
    asyncio.run(run())
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


AUTH = [(b"authorization", b"Bearer k")]


def test_routes_need_the_api_key_and_reach_the_engine(engine):
    api = cache_api.CacheApi(["k"], offload_enabled=True)
    assert call(api, "GET", "/kvplug/cache")[0] == 401
    status, _, body = call(api, "GET", "/kvplug/cache", headers=AUTH, query=b"limit=5&tier=disk&pinned=true")
    assert status == 200 and json.loads(body)["echo"] == {"op": "inventory", "offset": 0, "limit": 5, "tier": "disk",
                                                          "pinned": True}
    status, _, body = call(api, "GET", "/kvplug/cache/events", headers=AUTH, query=b"since=7&epoch=e1&wait_s=0.5")
    assert json.loads(body)["echo"] == {"op": "events", "since": 7, "epoch": "e1", "wait_s": 0.5}
    status, _, body = call(api, "DELETE", "/kvplug/cache/abc123", headers=AUTH)
    assert json.loads(body)["echo"] == {"op": "delete", "prefix": "abc123"}
    status, _, body = call(api, "POST", "/kvplug/cache/pin", b'{"prefix": "nope"}', headers=AUTH)
    assert status == 404 and "nope" in json.loads(body)["error"]["message"]


@pytest.mark.parametrize("method,path,body,query,param", [
    ("GET", "/kvplug/cache", b"", b"limit=x", "limit"),
    ("GET", "/kvplug/cache/events", b"", b"since=1&wait_s=99", "wait_s"),
    ("POST", "/kvplug/cache/pin", b'{"ttl_s": 5}', b"", "prefix"),
    ("POST", "/kvplug/cache/pin", b'{"prefix": "a", "ttl_s": -1}', b"", "ttl_s"),
    ("POST", "/kvplug/cache/pin", b'{"prefix": "a", "priority": "urgent"}', b"", "priority"),
    ("POST", "/kvplug/cache/pin", b'{"prefix": "a", "color": 1}', b"", "color"),
])
def test_bad_parameters_are_400_naming_them(engine, method, path, body, query, param):
    status, _, out = call(cache_api.CacheApi([], True), method, path, body, query=query)
    assert status == 400 and json.loads(out)["error"]["param"] == param


def test_without_offload_or_engine_the_routes_say_why(tmp_path, monkeypatch):
    status, _, body = call(cache_api.CacheApi([], offload_enabled=False), "GET", "/kvplug/cache")
    assert status == 404 and "offload" in json.loads(body)["error"]["message"]
    monkeypatch.setattr(control, "socket_path", lambda pid: tmp_path / "none.sock")
    status, _, body = call(cache_api.CacheApi([], True), "GET", "/kvplug/cache")
    assert status == 503 and "control socket" in json.loads(body)["error"]["message"]


def fake_vllm(stream: bool):
    seen = {}

    async def app(scope, receive, send):
        seen["body"] = json.loads((await receive())["body"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"x")]})
        if stream:
            for part in (b'data: {"choices": [{"delta": {"content": "a"}}]}\n\n', b"data: [DONE]\n\n"):
                await send({"type": "http.response.body", "body": part, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        else:
            params = {request_keys.REPORT_FIELD: dict(REPORT, final=True)}  # what request_finished returned
            await send({"type": "http.response.body", "body": json.dumps({"id": "x", "kv_transfer_params": params})
                        .encode()})
    return app, seen


@pytest.mark.parametrize("asked", [False, True])
def test_plain_answer_gets_the_header_and_the_body_report_only_when_asked(engine, asked):
    app, seen = fake_vllm(stream=False)
    params = {request_keys.REPORT_KEY: True} if asked else {}
    body = json.dumps({"model": "m", "kv_transfer_params": params}).encode()
    status, headers, out = call(cache_api.CacheApi([], True), "POST", "/v1/completions", body, app=app)
    assert seen["body"]["kv_transfer_params"][request_keys.REPORT_ID_KEY]  # the engine can name the report
    assert headers[cache_api.HEADER] == (b"gpu=16; cpu=32; disk=0; recomputed=22; policy=keep; "
                                         b"miss=evicted_from_disk@48; final=1")
    data = json.loads(out)
    assert int(headers[b"content-length"]) == len(out)
    assert (data["kv_transfer_params"] or {}).get(request_keys.REPORT_FIELD) == (REPORT if asked else None)


def test_streaming_answer_gets_the_header_at_the_first_chunk_and_the_report_before_done(engine):
    app, _ = fake_vllm(stream=True)
    body = json.dumps({"model": "m", "stream": True, "kv_transfer_params": {request_keys.REPORT_KEY: True}}).encode()
    status, headers, out = call(cache_api.CacheApi([], True), "POST", "/v1/chat/completions", body, app=app)
    assert headers[cache_api.HEADER].startswith(b"gpu=16;")
    events = [e for e in out.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])[request_keys.REPORT_FIELD] == REPORT
    assert [m["op"] for m in engine] == ["report", "report"]


class CacheReplicas:
    """Fake replicas whose answers carry the cache header (and report chunk), with a /kvplug/cache API."""

    def __init__(self):
        from tests.serving.test_replicas_routing import FakeReplicas

        self.base = FakeReplicas(["r0", "r1"])
        self.names, self.url = self.base.names, self.base.url

    async def handler(self, request):
        import httpx

        name = request.url.host.split(".")[0]
        if request.url.path.startswith("/kvplug/cache"):
            assert request.headers.get("authorization") == "Bearer upstream"  # the router's own key
            if request.method == "GET":
                return httpx.Response(200, json={"totals": {}, "prefixes": [], "name": name,
                                                 "query": dict(request.url.params)})
            return httpx.Response(200 if name == "r1" else 404, json={"done": name})
        response = await self.base.handler(request)
        response.headers[cache_api.HEADER.decode()] = f"gpu=0; cpu=64; replica={name}"
        return response


def test_the_router_passes_the_report_through_and_fans_the_cache_api_out():
    from tests.serving.test_replicas_routing import run_router

    fake = CacheReplicas()

    async def go(client, router):
        out = {}
        for stream in (False, True):
            r = await client.post("/v1/chat/completions", json={"model": "m", "stream": stream,
                                                                "messages": [{"role": "user", "content": "hi"}]},
                                  headers={"authorization": "Bearer user"})
            out[stream] = (r.headers[cache_api.HEADER.decode()], r.headers["x-kvplug-replica"], r.text)
        auth = {"authorization": "Bearer user"}
        out["all"] = (await client.get("/kvplug/cache?limit=3", headers=auth)).json()
        out["one"] = (await client.get("/kvplug/cache?replica=r1", headers=auth)).json()
        out["bad"] = (await client.get("/kvplug/cache?replica=r9", headers=auth)).status_code
        out["pin"] = await client.post("/kvplug/cache/pin", json={"prefix": "ab"}, headers=auth)
        out["noauth"] = (await client.get("/kvplug/cache")).status_code
        return out

    out = run_router(fake, go, api_keys=["user"], upstream_api_key="upstream")
    for stream in (False, True):
        header, replica, _ = out[stream]
        assert header == f"gpu=0; cpu=64; replica={replica}"
    assert out[True][2].rstrip().endswith("data: [DONE]")
    assert set(out["all"]["replicas"]) == {"r0", "r1"} and out["all"]["replicas"]["r0"]["query"] == {"limit": "3"}
    assert out["one"]["replica"] == "r1" and out["one"]["name"] == "r1"
    assert out["bad"] == 400 and out["noauth"] == 401
    assert out["pin"].status_code == 200 and out["pin"].json()["replicas"]["r1"] == {"done": "r1"}
