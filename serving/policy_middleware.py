"""ASGI middleware (vLLM's ``--middleware``): reject a request naming an unknown kvplug cache policy.

The policy travels in ``kv_transfer_params`` (``extra_body={"kv_transfer_params": {"kvplug_policy":
"quant:int4"}}``). vLLM passes that dict to the engine untouched, and the engine-side connector cannot
answer HTTP, so the check happens here, before vLLM sees the body: HTTP 400 with an OpenAI-style error
naming the bad value and the known ones. Other requests pass through byte for byte.
"""
from __future__ import annotations

import json

from cache_policies.registry import POLICY_NAMES, REQUEST_POLICY_KEY

CHECKED_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/responses")


def policy_error(body: bytes) -> str | None:
    """The error message for a body naming an unknown policy, else None (bad JSON is vLLM's to report)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    params = data.get("kv_transfer_params") if isinstance(data, dict) else None
    if not isinstance(params, dict) or REQUEST_POLICY_KEY not in params:
        return None
    name = params[REQUEST_POLICY_KEY]
    if isinstance(name, str) and name in POLICY_NAMES:
        return None
    return (f"kv_transfer_params.{REQUEST_POLICY_KEY}: unknown cache policy {name!r}; "
            f"known policies: {', '.join(POLICY_NAMES)}")


class PolicyValidationMiddleware:
    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http" or scope.get("method") != "POST" or scope.get("path") not in CHECKED_PATHS:
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # client went away
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        error = policy_error(body)
        if error is not None:
            payload = json.dumps({"error": {"message": error, "type": "BadRequestError",
                                            "param": f"kv_transfer_params.{REQUEST_POLICY_KEY}", "code": 400}}).encode()
            await send({"type": "http.response.start", "status": 400,
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(payload)).encode())]})
            await send({"type": "http.response.body", "body": payload})
            return
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
