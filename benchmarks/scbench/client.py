"""Streaming chat-completions client for any OpenAI-compatible endpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx


def normalize_endpoint(endpoint: str) -> tuple[str, str]:
    """``(server_base, api_base)``: ``http://h:p`` and ``http://h:p/v1``."""
    e = endpoint.strip().rstrip("/")
    if not e.startswith(("http://", "https://")):
        raise ValueError(f"expected an http(s) URL, got {endpoint!r}")
    base = e[: -len("/v1")] if e.endswith("/v1") else e
    return base, base + "/v1"


@dataclasses.dataclass
class StreamResult:
    status: str = "ok"  # ok | error | cancelled
    http_status: int | None = None
    error: str | None = None
    text: str = ""
    ttft: float | None = None  # seconds from send to first content token
    e2e: float | None = None
    output_tokens: int | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    finish_reason: str | None = None
    chunks: int = 0  # content chunks received
    replica: str | None = None  # x-kvplug-replica: which replica a `kvplug serve --replicas N` router chose
    route: str | None = None  # x-kvplug-route: why it chose that one
    cache: dict | None = None  # x-kvplug-cache: where the prompt's KV came from (kvplug serve --offload)

    @property
    def tpot(self) -> float | None:
        if self.status != "ok" or self.ttft is None or self.e2e is None:
            return None
        if not self.output_tokens or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


CACHE_SOURCES = ("gpu", "cpu", "disk", "recomputed")  # x-kvplug-cache's token counts, in serving order


def parse_cache_header(value: str | None) -> dict | None:
    """``gpu=256; cpu=128; disk=0; recomputed=93; policy=keep; miss=evicted_from_disk@384; final=0`` -> a dict
    (token counts as ints, ``miss`` as its reason, ``miss_token`` where); None without the header."""
    if not value or "=" not in value:
        return None
    out: dict = {}
    for part in value.split(";"):
        key, _, v = part.strip().partition("=")
        if key in CACHE_SOURCES:
            try:
                out[key] = int(v)
            except ValueError:
                continue
        elif key == "miss":
            reason, _, at = v.partition("@")
            out["miss"] = reason
            if at.isdigit():
                out["miss_token"] = int(at)
        elif key:
            out[key] = v
    return out if any(k in out for k in CACHE_SOURCES) else None


def _short(text: str, n: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 3] + "..."


async def stream_chat(client: httpx.AsyncClient, api_base: str, model: str,
                      messages: list[dict], max_tokens: int, temperature: float = 0.0,
                      timeout: float = 600.0, extra_body: dict | None = None,
                      headers: dict | None = None) -> StreamResult:
    """Send one streaming chat request and time it.  Never raises (except
    ``asyncio.CancelledError``): failures come back as ``status='error'``."""
    payload = {
        "model": model,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if extra_body:
        payload.update(extra_body)
    res = StreamResult()
    t0 = time.perf_counter()
    try:
        # wait_for, not asyncio.timeout: the package supports Python 3.10
        await asyncio.wait_for(_stream_into(res, client, api_base + "/chat/completions", payload,
                                            headers, t0), timeout)
    except asyncio.TimeoutError:
        res.status, res.error = "error", f"timeout after {timeout:g}s"
    except httpx.HTTPError as e:
        res.status, res.error = "error", f"{type(e).__name__}: {_short(str(e)) or 'connection failed'}"
    except (OSError, ValueError) as e:
        res.status, res.error = "error", f"{type(e).__name__}: {_short(str(e))}"
    res.e2e = time.perf_counter() - t0
    if res.status == "ok" and res.output_tokens is None:
        res.output_tokens = res.chunks  # server sent no usage: one token per chunk
    return res


async def _stream_into(res: StreamResult, client: httpx.AsyncClient, url: str, payload: dict,
                       headers: dict | None, t0: float) -> None:
    """Fill ``res`` from one streaming request (SSE lines ``data: {...}``)."""
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as r:
            res.http_status = r.status_code
            res.replica, res.route = r.headers.get("x-kvplug-replica"), r.headers.get("x-kvplug-route")
            res.cache = parse_cache_header(r.headers.get("x-kvplug-cache"))
            if r.status_code != 200:
                body = (await r.aread()).decode("utf-8", "replace")
                res.status, res.error = "error", f"HTTP {r.status_code}: {_short(body)}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    res.status, res.error = "error", f"bad SSE payload: {_short(data, 120)}"
                    break
                if obj.get("error"):
                    err = obj["error"]
                    msg = err.get("message", err) if isinstance(err, dict) else err
                    res.status, res.error = "error", f"stream error: {_short(msg)}"
                    break
                for ch in obj.get("choices") or []:
                    delta = ch.get("delta") or {}
                    # reasoning models stream thoughts first: they count for TTFT, not the answer
                    if delta.get("content") or delta.get("reasoning_content"):
                        if res.ttft is None:
                            res.ttft = time.perf_counter() - t0
                        res.chunks += 1
                        parts.append(delta.get("content") or "")
                    if ch.get("finish_reason"):
                        res.finish_reason = ch["finish_reason"]
                usage = obj.get("usage")
                if usage:
                    res.output_tokens = usage.get("completion_tokens")
                    res.prompt_tokens = usage.get("prompt_tokens")
                    details = usage.get("prompt_tokens_details") or {}
                    res.cached_tokens = details.get("cached_tokens")
    finally:
        res.text = "".join(parts)  # keep what arrived, even on a timeout


async def list_models(client: httpx.AsyncClient, api_base: str) -> list[str]:
    r = await client.get(api_base + "/models")
    r.raise_for_status()
    return [m["id"] for m in r.json().get("data", [])]
