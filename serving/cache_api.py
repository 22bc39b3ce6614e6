"""kvplug's cache API on vLLM's OpenAI server (through serving/policy_middleware.py, vLLM's ``--middleware``).

* ``GET /kvplug/cache`` (``?offset=&limit=&tier=&pinned=``): the prefixes the offload tiers hold, per tier,
  with totals; ``GET /kvplug/cache/events?since=SEQ[&epoch=E][&wait_s=S]``: the block events feed
  (docs: README, "Cache control"); ``POST /kvplug/cache/pin`` ``{"prefix", "ttl_s", "priority", "pinned"}``;
  ``DELETE /kvplug/cache/{prefix}``. Behind the server's API key (``--api-key`` / VLLM_API_KEY), which vLLM
  itself checks only under /v1.
* The cache report of every completion: the middleware names the request's report (``kvplug_report_id`` in
  kv_transfer_params) and sets the ``x-kvplug-cache`` response header; with ``kvplug_report: true`` the body
  carries it too (``kv_transfer_params.kvplug_cache``; streaming: one more chunk before ``[DONE]``).

Streaming: HTTP headers go out before the body, so the middleware holds them until the first chunk (the
first token, after the prefill): by then the engine has decided where every prompt block comes from, and the
header carries those numbers (``final=0``: a later failed load or a preemption could still change them; the
final report is the one in the last chunk). The answers come from the engine core over the control channel
(offload/control.py).
"""
from __future__ import annotations

import json
import math
import os
import secrets
import sys
from typing import Any
from urllib.parse import parse_qs

from kvplug import plugin
from offload import control, request_keys
from offload.tiers.eviction import PRIORITY_CLASSES
from serving.replicas import api_keys

PREFIX = "/kvplug/cache"
HEADER = b"x-kvplug-cache"
REPORTED_PATHS = ("/v1/completions", "/v1/chat/completions")
MAX_BUFFERED_BODY = 64 << 20
HEADER_WAIT_S = 0.5  # a stream's first chunk waits at most this for the engine's answer (BENCHMARKS.md)  # a non-streaming answer larger than this passes through without a body report


ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError"}


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    kind = ERROR_TYPES.get(status, "ServerError" if status >= 500 else "BadRequestError")
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": status}}).encode()


async def send_json(send, status: int, payload: bytes, extra_headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            *(extra_headers or [])]})
    await send({"type": "http.response.body", "body": payload})


def header_value(report: dict | None) -> bytes:
    """The report as one header line: gpu=..; cpu=..; disk=..; recomputed=..; policy=..; miss=REASON@TOKEN."""
    if report is None:
        return b"unavailable"
    parts = [f"{k[:-len('_tokens')]}={v}" for k, v in report.items() if k.endswith("_tokens") and k != "prompt_tokens"]
    parts.append(f"policy={report['policy']}")
    miss = report.get("first_miss")
    parts.append(f"miss={miss['reason']}@{miss['token']}" if miss else "miss=none")
    pin = report.get("pin")
    if pin is not None:
        parts.append("pin=ok" if pin.get("pinned") else "pin=refused")
    parts.append(f"final={int(bool(report.get('final')))}")
    return "; ".join(parts).encode("ascii", "replace")


class CacheApi:
    """The /kvplug/cache routes and the per-request report; one per API server process."""

    def __init__(self, api_keys: list[str], offload_enabled: bool, prompt_tokens: int = 0) -> None:
        self.api_keys = [k.encode() for k in api_keys]
        self.offload_enabled = offload_enabled
        self.prompt_tokens = prompt_tokens
        self._tokenizer: Any = None

    # --- authorization -----------------------------------------------------------------------------------
    def authorized(self, scope) -> bool:
        if not self.api_keys:
            return True
        for name, value in scope.get("headers") or ():
            if name.lower() == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and any(secrets.compare_digest(token, k) for k in self.api_keys)
        return False

    # --- routes ------------------------------------------------------------------------------------------
    @staticmethod
    def handles(scope) -> bool:
        path = scope.get("path", "")
        return scope.get("type") == "http" and (path == PREFIX or path.startswith(PREFIX + "/"))

    async def route(self, scope, receive, send) -> None:
        if not self.authorized(scope):
            return await send_json(send, 401, error_body(401, "missing or wrong API key (Authorization: Bearer KEY)"),
                                   [(b"www-authenticate", b"Bearer")])
        method, path = scope.get("method"), scope["path"]
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode("latin-1")).items()}
        try:
            if method == "GET" and path in (PREFIX, PREFIX + "/"):
                status, payload = await self._inventory(query)
            elif method == "GET" and path == PREFIX + "/events":
                status, payload = await self._events(query)
            elif method == "POST" and path == PREFIX + "/pin":
                status, payload = await self._pin(await _read_body(receive))
            elif method == "DELETE" and path.startswith(PREFIX + "/") and path.count("/") == 3:
                status, payload = await self._ask({"op": "delete", "prefix": path.rsplit("/", 1)[1]})
            else:
                return await send_json(send, 404, error_body(404, f"no route {method} {path}; kvplug's cache API: "
                                                                  f"GET {PREFIX}, GET {PREFIX}/events, POST {PREFIX}/pin, "
                                                                  f"DELETE {PREFIX}/PREFIX"))
        except _BadRequest as exc:
            return await send_json(send, 400, error_body(400, str(exc), exc.param))
        await send_json(send, status, payload)

    async def _ask(self, msg: dict, timeout: float = 10.0) -> tuple[int, bytes]:
        if not self.offload_enabled:
            return 404, error_body(404, "the offload tiers are off on this server (kvplug serve --offload ...): "
                                        "there is no kvplug cache to show")
        try:
            answer = await control.call(msg, timeout=timeout)
        except control.ControlUnavailable as exc:
            return 503, error_body(503, str(exc))
        if not answer.pop("ok", False):
            status = int(answer.pop("status", 500))
            return status, error_body(status, answer.get("error", "failed"))
        return 200, json.dumps(answer).encode()

    async def _inventory(self, q: dict) -> tuple[int, bytes]:
        msg: dict[str, Any] = {"op": "inventory", "offset": _int(q, "offset", 0, 0), "limit": _int(q, "limit", 100, 1)}
        if "tier" in q:
            msg["tier"] = q["tier"]
        if "pinned" in q:
            if q["pinned"] not in ("true", "false"):
                raise _BadRequest("pinned must be true or false", "pinned")
            msg["pinned"] = q["pinned"] == "true"
        status, payload = await self._ask(msg)
        if status == 200 and self.prompt_tokens:
            payload = self._with_prompt_text(payload)
        return status, payload

    def _with_prompt_text(self, payload: bytes) -> bytes:
        """The operator enabled prompt text (offload.inventory_prompt_tokens): decode each prefix's head."""
        data = json.loads(payload)
        tok = self._load_tokenizer()
        for p in data.get("prefixes", []):
            ids = p.get("head_token_ids") or []
            if tok is not None:
                p["prompt_head"] = tok.decode(ids)
        return json.dumps(data).encode()

    def _load_tokenizer(self) -> Any:
        if self._tokenizer is None:
            from serving.server import flag_value

            model = flag_value(sys.argv[1:], "--model")
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(model) if model else False
            except Exception:  # no tokenizer: the token ids are still there
                self._tokenizer = False
        return self._tokenizer or None

    async def _events(self, q: dict) -> tuple[int, bytes]:
        msg: dict[str, Any] = {"op": "events", "since": _int(q, "since", -1, -1) if "since" in q else None}
        if "epoch" in q:
            msg["epoch"] = q["epoch"]
        if "wait_s" in q:
            try:
                wait = float(q["wait_s"])
            except ValueError:
                raise _BadRequest("wait_s must be a number of seconds", "wait_s") from None
            if not 0 <= wait <= 30 or math.isnan(wait):
                raise _BadRequest("wait_s must be within [0, 30]", "wait_s")
            msg["wait_s"] = wait
        return await self._ask(msg, timeout=10.0 + msg.get("wait_s", 0))

    async def _pin(self, body: bytes) -> tuple[int, bytes]:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise _BadRequest("the body must be a JSON object {\"prefix\": HASH, \"ttl_s\": N, \"priority\": C}", None)
        if not isinstance(data, dict) or not isinstance(data.get("prefix"), str) or not data["prefix"]:
            raise _BadRequest("prefix (a string: the prefix id from GET /kvplug/cache) is required", "prefix")
        unknown = sorted(set(data) - {"prefix", "ttl_s", "priority", "pinned"})
        if unknown:
            raise _BadRequest(f"unknown field(s) {', '.join(unknown)}; known: prefix, ttl_s, priority, pinned",
                              unknown[0])
        ttl = data.get("ttl_s")
        if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))
                                or not 0 < ttl <= request_keys.MAX_TTL_S):
            raise _BadRequest(f"ttl_s must be a number of seconds > 0 and <= {request_keys.MAX_TTL_S}", "ttl_s")
        if "priority" in data and data["priority"] not in PRIORITY_CLASSES:
            raise _BadRequest(f"priority must be one of {', '.join(PRIORITY_CLASSES)}", "priority")
        if "pinned" in data and not isinstance(data["pinned"], bool):
            raise _BadRequest("pinned must be true or false", "pinned")
        return await self._ask({"op": "pin", **data})

    # --- the per-request report ----------------------------------------------------------------------------
    def reports(self, scope) -> bool:
        return self.offload_enabled and scope.get("method") == "POST" and scope.get("path") in REPORTED_PATHS

    async def serve_with_report(self, app, scope, data: dict, replay, send) -> None:
        """Run vLLM's handler on ``data`` (the parsed body) with a report id; add the header (and the body
        report, when the client asked)."""
        params = dict(data.get("kv_transfer_params") or {})
        asked = params.get(request_keys.REPORT_KEY) is True
        rid = secrets.token_hex(12)
        params[request_keys.REPORT_ID_KEY] = rid
        body = json.dumps({**data, "kv_transfer_params": params}).encode()
        receive = replay([{"type": "http.request", "body": body, "more_body": False}])
        wrapped = (_StreamingReport if data.get("stream") is True else _BufferedReport)(send, rid, asked)
        await app(_with_length(scope, len(body)), receive, wrapped)
        await wrapped.close()


class _BadRequest(ValueError):
    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class _BufferedReport:
    """Non-streaming: the whole JSON answer, its kv_transfer_params.kvplug_cache moved into the header (kept in
    the body only when asked)."""

    def __init__(self, send, rid: str, asked: bool) -> None:
        self.send, self.rid, self.asked = send, rid, asked
        self.start: dict | None = None
        self.chunks: list[bytes] = []
        self.size = 0
        self.passthrough = False

    async def __call__(self, message) -> None:
        if self.passthrough:
            return await self.send(message)
        if message["type"] == "http.response.start":
            self.start = message
            return
        if message["type"] != "http.response.body":
            return await self.send(message)
        self.chunks.append(message.get("body", b""))
        self.size += len(self.chunks[-1])
        if self.size > MAX_BUFFERED_BODY:  # not an OpenAI JSON answer we should hold: let it through
            self.passthrough = True
            await self.send(self._start(None))
            await self.send({"type": "http.response.body", "body": b"".join(self.chunks), "more_body": True})
            self.chunks = []
            return
        if not message.get("more_body", False):
            await self._flush()

    def _start(self, report_header: bytes | None, length: int | None = None) -> dict:
        assert self.start is not None
        headers = [(k, v) for k, v in self.start.get("headers", [])
                   if k.lower() not in (HEADER, b"content-length") or (k.lower() == b"content-length" and length is None)]
        if length is not None:
            headers.append((b"content-length", str(length).encode()))
        if report_header is not None:
            headers.append((HEADER, report_header))
        return {**self.start, "headers": headers}

    async def _flush(self) -> None:
        body = b"".join(self.chunks)
        self.chunks = []
        report = None
        if self.start is not None and self.start.get("status") == 200:
            try:
                data = json.loads(body)
                params = data.get("kv_transfer_params") if isinstance(data, dict) else None
                report = params.pop(request_keys.REPORT_FIELD, None) if isinstance(params, dict) else None
            except ValueError:
                data = None
            if report is None:
                report = await _fetch_report(self.rid)
            if data is not None and isinstance(data, dict):
                params = data.get("kv_transfer_params")
                if self.asked:
                    data["kv_transfer_params"] = {**(params or {}), request_keys.REPORT_FIELD: report}
                elif isinstance(params, dict) and not params:
                    data["kv_transfer_params"] = None
                body = json.dumps(data).encode()
            await self.send(self._start(header_value(report), len(body)))
        elif self.start is not None:
            await self.send(self._start(None, len(body)))
        await self.send({"type": "http.response.body", "body": body})

    async def close(self) -> None:
        return None


class _StreamingReport:
    """Streaming: headers held until the first chunk (then the engine knows the prompt's sources), and with
    kvplug_report the final report as one more chunk before ``data: [DONE]``."""

    def __init__(self, send, rid: str, asked: bool) -> None:
        self.send, self.rid, self.asked = send, rid, asked
        self.start: dict | None = None
        self.reported = False
        self.chunk_fields: dict = {}  # id, object, created, model of the stream's chunks: the report chunk's too

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.start = message
            if message.get("status") != 200:
                self.start = None
                await self.send(message)
            return
        if message["type"] == "http.response.body" and self.start is not None:
            start, self.start = self.start, None
            report = await _fetch_report(self.rid, timeout=HEADER_WAIT_S)
            await self.send({**start, "headers": [*start.get("headers", []), (HEADER, header_value(report))]})
        if message["type"] == "http.response.body" and self.asked and not self.reported:
            body = message.get("body", b"")
            if not self.chunk_fields:
                self._learn_fields(body)
            at = body.find(b"data: [DONE]")
            if at >= 0:
                self.reported = True
                report = await _fetch_report(self.rid)
                chunk = {**self.chunk_fields, "choices": [], request_keys.REPORT_FIELD: report}
                message = {**message, "body": body[:at] + b"data: " + json.dumps(chunk).encode() + b"\n\n" + body[at:]}
        await self.send(message)

    def _learn_fields(self, body: bytes) -> None:
        at = body.find(b"data: {")
        if at < 0:
            return
        try:
            first = json.loads(body[at + 6:body.find(b"\n", at)])
        except ValueError:
            return
        self.chunk_fields = {k: first[k] for k in ("id", "object", "created", "model") if k in first}

    async def close(self) -> None:
        if self.start is not None:  # the handler ended without a body
            start, self.start = self.start, None
            await self.send(start)


async def _fetch_report(rid: str, timeout: float = 5.0) -> dict | None:
    try:
        answer = await control.call({"op": "report", "id": rid}, timeout=timeout)
    except control.ControlUnavailable:
        return None
    return answer.get("report")


def _with_length(scope, n: int) -> dict:
    headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
    return {**scope, "headers": [*headers, (b"content-length", str(n).encode())]}


async def _read_body(receive) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _int(q: dict, name: str, default: int, minimum: int) -> int:
    if name not in q:
        return default
    try:
        value = int(q[name])
    except ValueError:
        raise _BadRequest(f"{name} must be an integer", name) from None
    if value < minimum:
        raise _BadRequest(f"{name} must be >= {minimum}", name)
    return value


def from_process() -> CacheApi:
    """The cache API of this API server process: its API keys (as vLLM takes them) and kvplug's config."""
    cfg = plugin.active_config()
    # Offload is on through kvplug's config, or through a --kv-transfer-config naming kvplug's connector.
    on = cfg.offload.enabled or any("KvplugConnector" in a for a in sys.argv)
    return CacheApi(api_keys(sys.argv[1:], dict(os.environ)), on, cfg.offload.inventory_prompt_tokens)
