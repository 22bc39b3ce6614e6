"""ASGI middleware (vLLM's ``--middleware``): reject bad kvplug per-request parameters with HTTP 400.

kvplug's per-request parameters travel in ``kv_transfer_params`` (``extra_body={"kv_transfer_params":
{"kvplug_policy": "quant:int4"}}``). vLLM passes that dict to the engine untouched, and the engine-side
connector cannot answer HTTP (it would only see ``"false"`` as "offload on"), so the check happens here,
before vLLM sees the body: HTTP 400 with an OpenAI-style error naming the parameter and echoing the bad
value (truncated). Every POST with a JSON body is checked, not only the routes listed in
``KV_TRANSFER_PATHS``, so a route added by a later vLLM cannot carry unchecked parameters. Other requests,
and good bodies, pass through byte for byte, but for the completion routes when the offload tiers are on:
those get a cache report (serving/cache_api.py, which also serves the /kvplug/cache routes).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cache_policies.registry import POLICY_NAMES, REQUEST_OFFLOAD_KEY, REQUEST_POLICY_KEY, REQUEST_TENANT_KEY
from offload import request_keys
from serving import cache_api

# vLLM 0.32 routes whose request model has a `kv_transfer_params` field (openai/completion,
# openai/chat_completion, openai/responses, anthropic, cohere, scale_out/render and token_in_token_out).
KV_TRANSFER_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses",
                     "/v1/messages", "/cohere/v2/chat", "/inference/v1/generate", "/v1/completions/render",
                     "/v1/chat/completions/render", "/v1/responses/render", "/v1/messages/render",
                     "/cohere/v2/chat/render")
PARAMS_FIELD = "kv_transfer_params"
KVPLUG_KEY_PREFIX = "kvplug_"
KNOWN_KVPLUG_KEYS = (REQUEST_POLICY_KEY, REQUEST_OFFLOAD_KEY, REQUEST_TENANT_KEY, *request_keys.CLIENT_KEYS)
# Deeper JSON is refused before parsing: json.loads recurses per level (RecursionError -> HTTP 500).
# Real requests (messages, tool schemas) stay far below this.
MAX_JSON_DEPTH = 128
ECHO_CHARS = 80  # a bad value is echoed at most this long


@dataclass
class BadParam:
    message: str
    param: str | None


def echo(value: Any) -> str:
    """The value as the client sent it (JSON), cut to ECHO_CHARS."""
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS] + f"... ({len(text)} chars)"


_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def json_depth_exceeds(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether the JSON text nests arrays/objects deeper than ``limit`` (brackets inside strings ignored)."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for c in _JSON_STRING.sub(b"", body).translate(None, _NOT_BRACKETS):
        depth += 1 if c in b"[{" else -1
        if depth > limit:
            return True
    return False


def _check_params(params: Any) -> BadParam | None:
    if params is None:
        return None
    if not isinstance(params, dict):
        return BadParam(f"{PARAMS_FIELD} must be a JSON object, got {echo(params)}", PARAMS_FIELD)
    unknown = [k for k in params if isinstance(k, str) and k.startswith(KVPLUG_KEY_PREFIX)
               and k not in KNOWN_KVPLUG_KEYS and k != request_keys.REPORT_ID_KEY]
    if unknown:
        return BadParam(f"{PARAMS_FIELD}: unknown kvplug parameter(s) {', '.join(echo(k) for k in unknown)}; "
                        f"known: {', '.join(KNOWN_KVPLUG_KEYS)}", f"{PARAMS_FIELD}.{unknown[0]}")
    where = f"{PARAMS_FIELD}.{REQUEST_POLICY_KEY}"
    if REQUEST_POLICY_KEY in params and params[REQUEST_POLICY_KEY] not in POLICY_NAMES:
        return BadParam(f"{where}: unknown cache policy {echo(params[REQUEST_POLICY_KEY])}; "
                        f"known policies: {', '.join(POLICY_NAMES)}", where)
    where = f"{PARAMS_FIELD}.{REQUEST_OFFLOAD_KEY}"
    if REQUEST_OFFLOAD_KEY in params and not isinstance(params[REQUEST_OFFLOAD_KEY], bool):
        return BadParam(f"{where} must be true or false (a JSON boolean), got {echo(params[REQUEST_OFFLOAD_KEY])}",
                        where)
    where = f"{PARAMS_FIELD}.{REQUEST_TENANT_KEY}"
    if REQUEST_TENANT_KEY in params and not isinstance(params[REQUEST_TENANT_KEY], str):
        return BadParam(f"{where} must be a string, got {echo(params[REQUEST_TENANT_KEY])}", where)
    bad = request_keys.check(params, PARAMS_FIELD)
    if bad is not None:
        key = bad[1].rsplit(".", 1)[1]
        return BadParam(f"{bad[0]}, got {echo(params.get(key))}", bad[1])
    return None


def parse_request(body: bytes) -> tuple[Any, BadParam | None]:
    """(the parsed body or None, what is wrong with its kvplug parameters or None).

    Text that is not JSON at all is vLLM's to report (and routes without a JSON body, like /ping, take it);
    JSON that cannot be parsed safely (too deep, integers past Python's digit limit) is refused here.
    """
    if json_depth_exceeds(body):
        return None, BadParam(f"request body: JSON nested deeper than {MAX_JSON_DEPTH} levels", None)
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return None, None
    except (ValueError, RecursionError) as exc:
        return None, BadParam(f"request body is not acceptable JSON: {str(exc)[:ECHO_CHARS]}", None)
    if not isinstance(data, dict) or PARAMS_FIELD not in data:
        return data, None
    return data, _check_params(data[PARAMS_FIELD])


def request_error(body: bytes) -> BadParam | None:
    """What is wrong with a request body's kvplug parameters, else None."""
    return parse_request(body)[1]


def _checked(scope) -> bool:
    """POSTs to the kv_transfer_params routes, and any other POST with a JSON content type or none (FastAPI
    parses a body without content type as JSON)."""
    if scope.get("type") != "http" or scope.get("method") != "POST":
        return False
    if scope.get("path") in KV_TRANSFER_PATHS:
        return True
    for name, value in scope.get("headers") or ():
        if name.lower() == b"content-type":
            return b"json" in value.lower()
    return True


class PolicyValidationMiddleware:
    def __init__(self, app) -> None:
        self.app = app
        self.cache = cache_api.from_process()

    async def __call__(self, scope, receive, send):
        if self.cache.handles(scope):
            return await self.cache.route(scope, receive, send)
        if not _checked(scope):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        data, error = parse_request(body)
        if error is not None:
            payload = json.dumps({"error": {"message": error.message, "type": "BadRequestError",
                                            "param": error.param, "code": 400}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
        if self.cache.reports(scope) and isinstance(data, dict):
            return await self.cache.serve_with_report(self.app, scope, data, lambda m: _replay(m, receive), send)
        return await self.app(scope, _replay([{"type": "http.request", "body": body, "more_body": False}],
                                             receive), send)


def _replay(messages, then=None):
    queue = list(messages)

    async def receive():
        if queue:
            return queue.pop(0)
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
