"""`--offload` parsing, `kvplug serve` wiring, and the HTTP 400 for an unknown request policy."""
from __future__ import annotations

import asyncio
import json

import pytest

from kvplug.config import KvplugConfigError, resolve
from offload.spec import parse_offload_flag
from serving.policy_middleware import PolicyValidationMiddleware, policy_error


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
    assert policy_error(b'{"prompt": "x"}') is None
    assert policy_error(b"not json") is None
    assert policy_error(b'{"kv_transfer_params": {"kvplug_policy": "quant:int4"}}') is None
    msg = policy_error(b'{"kv_transfer_params": {"kvplug_policy": "quant:int3"}}')
    assert "'quant:int3'" in msg and "quant:int4" in msg


def _call(body: bytes, path="/v1/completions"):
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

    scope = {"type": "http", "method": "POST", "path": path}
    asyncio.run(PolicyValidationMiddleware(app)(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:]), seen.get("body")


def test_middleware_rejects_bad_policy_with_400_and_passes_good_bodies_intact():
    status, body, downstream = _call(b'{"model": "m", "kv_transfer_params": {"kvplug_policy": "zip"}}')
    assert status == 400 and downstream is None
    err = json.loads(body)["error"]
    assert "'zip'" in err["message"] and err["param"] == "kv_transfer_params.kvplug_policy"
    good = b'{"model": "m", "kv_transfer_params": {"kvplug_policy": "keep"}}'
    status, body, downstream = _call(good)
    assert status == 200 and downstream == good
    status, _, downstream = _call(b'{"kv_transfer_params": {"kvplug_policy": "zip"}}', path="/health")
    assert status == 200  # only the generation endpoints are checked
