"""`--offload` parsing, `kvplug serve` wiring, and the HTTP 400 for an unknown request policy."""
from __future__ import annotations

import asyncio
import json

import pytest

from kvplug.config import KvplugConfigError
from kvplug.settings import resolve
from offload.spec import parse_offload_flag
from serving.policy_middleware import KV_TRANSFER_PATHS, PolicyValidationMiddleware, request_error


def test_offload_flag_sets_config():
    cfg = resolve(sets=parse_offload_flag("cpu:8GiB,disk:/var/kv:100GiB"), environ={})
    assert cfg.offload.enabled and cfg.offload.cpu_bytes == 8 << 30
    assert cfg.offload.disk_path == "/var/kv" and cfg.offload.disk_bytes == 100 << 30
    only_disk = resolve(sets=parse_offload_flag("disk:/d:1GiB"), environ={}).offload
    assert only_disk.cpu_bytes == 0 and only_disk.disk_bytes == 1 << 30
    assert "offload" in resolve(sets=parse_offload_flag("cpu:1GiB"), environ={}).enabled_features()


@pytest.mark.parametrize("bad,needle", [("gpu:1GiB", "unknown tier 'gpu'"), ("cpu:lots", "cpu:lots"),
                                        ("disk:/d:many", "disk:/d:many")])
def test_offload_flag_errors_name_the_part(bad, needle):
    with pytest.raises(KvplugConfigError, match=needle):
        parse_offload_flag(bad)


def test_serve_plan_adds_connector_and_middleware():
    from serving import server

    p = server.plan(["--offload", "cpu:1GiB", "--port", "18431"], prepare_model=False)
    cmd = p.command
    kv = json.loads(cmd[cmd.index("--kv-transfer-config") + 1])
    assert kv["kv_connector_module_path"] == "offload.connector" and kv["kv_connector"] == "KvplugConnector"
    assert cmd[cmd.index("--middleware") + 1] == server.POLICY_MIDDLEWARE
    plain = server.plan(["--port", "18432"], prepare_model=False).command
    assert "--kv-transfer-config" not in plain  # no offload unless asked
    with pytest.raises(server.ServeError, match="unknown tier"):
        server.plan(["--offload", "tape:1GiB", "--port", "18433"], prepare_model=False)


def test_policy_error_only_for_unknown_names():
    assert request_error(b'{"prompt": "x"}') is None
    assert request_error(b"not json") is None
    assert request_error(b'{"kv_transfer_params": {"kvplug_policy": "quant:int4"}}') is None
    msg = request_error(b'{"kv_transfer_params": {"kvplug_policy": "quant:int3"}}').message
    assert '"quant:int3"' in msg and "quant:int4" in msg


def _call(body: bytes, path="/v1/completions", method="POST", headers=()):
    seen = {}

    async def app(scope, receive, send):
        msg = await receive()
        seen["body"] = msg["body"]
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent = []
    chunks = [{"type": "http.request", "body": body[:5], "more_body": True},
              {"type": "http.request", "body": body[5:], "more_body": False}]

    async def receive():
        return chunks.pop(0)

    async def send(m):
        sent.append(m)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    asyncio.run(PolicyValidationMiddleware(app)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), seen.get("body")


def test_middleware_rejects_bad_policy_with_400_and_passes_good_bodies_intact():
    status, body, downstream = _call(b'{"model": "m", "kv_transfer_params": {"kvplug_policy": "zip"}}')
    assert status == 400 and downstream is None
    err = json.loads(body)["error"]
    assert '"zip"' in err["message"] and err["param"] == "kv_transfer_params.kvplug_policy"
    good = b'{"model": "m", "kv_transfer_params": {"kvplug_policy": "keep"}}'
    status, body, downstream = _call(good)
    assert status == 200 and downstream == good
    status, _, downstream = _call(b'{"kv_transfer_params": {"kvplug_policy": "zip"}}', method="GET")
    assert status == 200 and downstream is not None  # only POST bodies are checked
    form = [(b"content-type", b"multipart/form-data; boundary=x")]
    status, _, downstream = _call(b'{"kv_transfer_params": {"kvplug_policy": "zip"}}', path="/v1/audio", headers=form)
    assert status == 200  # uploads pass untouched


BAD = b'{"model": "m", "kv_transfer_params": {"kvplug_offload": "false"}}'


@pytest.mark.parametrize("path", [*KV_TRANSFER_PATHS, "/some/future/route"])
def test_every_route_taking_kv_transfer_params_is_checked(path):
    status, body, downstream = _call(BAD, path=path)
    assert status == 400 and downstream is None
    assert json.loads(body)["error"]["param"] == "kv_transfer_params.kvplug_offload"


def test_the_routes_cover_every_vllm_route_whose_request_model_has_kv_transfer_params():
    """Walks the installed vLLM's API routers, so a route a vLLM upgrade adds shows up here."""
    import importlib
    import pkgutil
    import typing

    import vllm.entrypoints

    routes = {}
    for info in pkgutil.walk_packages(vllm.entrypoints.__path__, "vllm.entrypoints."):
        if not info.name.endswith(".api_router"):
            continue
        router = getattr(importlib.import_module(info.name), "router", None)
        for route in getattr(router, "routes", ()):
            for hint in typing.get_type_hints(getattr(route, "endpoint", None) or (lambda: None)).values():
                if "kv_transfer_params" in getattr(hint, "model_fields", {}):
                    routes[route.path] = hint.__name__
    assert {"/v1/completions", "/v1/chat/completions", "/v1/responses"} <= set(routes)
    assert set(routes) <= set(KV_TRANSFER_PATHS), routes


@pytest.mark.parametrize("params,param,fragment", [
    ({"kvplug_offload": "false"}, "kvplug_offload", 'must be true or false (a JSON boolean), got "false"'),
    ({"kvplug_offload": 0}, "kvplug_offload", "got 0"),
    ({"kvplug_offload": None}, "kvplug_offload", "got null"),
    ({"kvplug_tenant": 7}, "kvplug_tenant", "kvplug_tenant must be a string, got 7"),
    ({"kvplug_polcy": "keep", "kvplug_x": 1}, "kvplug_polcy", 'unknown kvplug parameter(s) "kvplug_polcy", "kvplug_x"'),
    ({"kvplug_policy": "z" * 500}, "kvplug_policy", '"' + "z" * 79 + "... (502 chars)"),
    ("just a string", None, 'kv_transfer_params must be a JSON object, got "just a string"'),
])
def test_bad_kvplug_params_are_400_naming_the_field(params, param, fragment):
    status, body, downstream = _call(json.dumps({"prompt": "x", "kv_transfer_params": params}).encode())
    err = json.loads(body)["error"]
    assert status == 400 and downstream is None and err["code"] == 400
    assert err["param"] == ("kv_transfer_params" + (f".{param}" if param else ""))
    assert fragment in err["message"] and len(err["message"]) < 300


def test_good_kvplug_params_and_foreign_keys_pass():
    body = json.dumps({"prompt": "x", "kv_transfer_params": {
        "kvplug_offload": False, "kvplug_tenant": "t1", "kvplug_policy": "quant:int8", "do_remote_prefill": True}})
    assert _call(body.encode())[0] == 200
    assert _call(b'{"prompt": "x", "kv_transfer_params": null}')[0] == 200


@pytest.mark.parametrize("raw", [
    b'{"prompt": "x", "kv_transfer_params": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b"[" * 100_000,                                    # deep and truncated
    b'{"prompt": ' + b"9" * 5000 + b"}",               # past Python's int digit limit
])
def test_deep_or_huge_json_is_400_not_500(raw):
    status, body, downstream = _call(raw)
    assert status == 400 and downstream is None
    assert json.loads(body)["error"]["type"] == "BadRequestError"


def test_brackets_inside_strings_do_not_count_as_nesting():
    prompt = "[" * 10_000 + '\\"{' * 100
    assert _call(json.dumps({"prompt": prompt}).encode())[0] == 200
