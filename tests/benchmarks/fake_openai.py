"""A tiny in-process OpenAI-compatible SSE server for tests (127.0.0.1 only).

Behaviour knobs (attributes, change between runs):
  answer     "oracle-kv" parses the Retr.KV context/question and answers right;
             any other string is returned verbatim.
  fail_every every k-th request gets HTTP 500 (0: never).
  first_token_delay / token_delay  seconds.
It counts requests, tracks the peak number in flight and exports Prometheus
counters (vllm prefix-cache counters and a kvplug_* counter) on /metrics.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading

from aiohttp import web

MODEL = "fake-model"
_KEY = re.compile(r'Key: "([0-9a-f-]{36})"')


class FakeOpenAI:
    def __init__(self):
        self.answer = "oracle-kv"
        self.fail_every = 0
        self.first_token_delay = 0.0
        self.token_delay = 0.0
        self.requests = 0
        self.inflight = 0
        self.peak_inflight = 0
        self.prefix_queries = 0
        self.prefix_hits = 0
        self.bodies: list[dict] = []
        self.headers: list[dict] = []
        self.cache_header = False  # answer with x-kvplug-cache like kvplug serve --offload
        self.resets = 0
        self._loop = None
        self._runner = None
        self.port = None

    # ------------------------------------------------------------ handlers
    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    async def metrics(self, request):
        text = (
            "# HELP vllm:prefix_cache_queries Prefix cache queries, in tokens.\n"
            "# TYPE vllm:prefix_cache_queries counter\n"
            f'vllm:prefix_cache_queries_total{{engine="0",model_name="{MODEL}"}} {self.prefix_queries}\n'
            "# HELP vllm:prefix_cache_hits Prefix cache hits, in tokens.\n"
            "# TYPE vllm:prefix_cache_hits counter\n"
            f'vllm:prefix_cache_hits_total{{engine="0",model_name="{MODEL}"}} {self.prefix_hits}\n'
            "# HELP kvplug_fake_requests Requests seen.\n"
            "# TYPE kvplug_fake_requests counter\n"
            f"kvplug_fake_requests_total {self.requests}\n"
        )
        return web.Response(text=text, content_type="text/plain")

    def _reply(self, body: dict) -> str:
        if self.answer != "oracle-kv":
            return self.answer
        msgs = body["messages"]
        first = msgs[0]["content"]
        start = first.index("{")
        data = json.JSONDecoder().raw_decode(first[start:])[0]
        key = _KEY.search(msgs[-1]["content"]).group(1)
        return f"The value is {data[key]}."

    async def health(self, request):
        return web.Response(text="")

    async def reset_cache(self, request):
        self.resets += 1
        return web.Response(text="")

    async def chat(self, request):
        body = await request.json()
        self.bodies.append(body)
        self.headers.append({k.lower(): v for k, v in request.headers.items()})
        self.requests += 1
        n = self.requests
        prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
        self.prefix_queries += 100
        self.prefix_hits += 25
        if self.fail_every and n % self.fail_every == 0:
            return web.json_response({"object": "error", "message": "injected failure"}, status=500)
        self.inflight += 1
        self.peak_inflight = max(self.peak_inflight, self.inflight)
        try:
            headers = {"Content-Type": "text/event-stream"}
            if self.cache_header:  # turn 1 computed, later turns: a GPU hit and the rest from the CPU tier
                turns = sum(m["role"] == "user" for m in body["messages"])
                headers["x-kvplug-cache"] = ("gpu=0; cpu=0; disk=0; recomputed=300; policy=keep; miss=never_seen@0; "
                                             "final=0" if turns == 1 else
                                             "gpu=128; cpu=256; disk=0; recomputed=40; policy=keep; miss=none; final=0")
            resp = web.StreamResponse(headers=headers)
            await resp.prepare(request)
            await asyncio.sleep(self.first_token_delay)
            words = re.findall(r"\S+\s*", self._reply(body))[: body.get("max_tokens", 16)]
            for i, w in enumerate(words):
                if i:
                    await asyncio.sleep(self.token_delay)
                chunk = {"id": f"c{n}", "object": "chat.completion.chunk", "model": MODEL,
                         "choices": [{"index": 0, "delta": {"content": w}, "finish_reason": None}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            fin = {"id": f"c{n}", "object": "chat.completion.chunk", "model": MODEL,
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            await resp.write(f"data: {json.dumps(fin)}\n\n".encode())
            usage = {"id": f"c{n}", "object": "chat.completion.chunk", "model": MODEL, "choices": [],
                     "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                               "total_tokens": prompt_tokens + len(words)}}
            await resp.write(f"data: {json.dumps(usage)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            return resp
        finally:
            self.inflight -= 1

    # ----------------------------------------------------------- lifecycle
    def start(self) -> "FakeOpenAI":
        ready = threading.Event()

        def serve():
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            app = web.Application()
            app.router.add_get("/health", self.health)
            app.router.add_get("/v1/models", self.models)
            app.router.add_get("/metrics", self.metrics)
            app.router.add_post("/v1/chat/completions", self.chat)
            app.router.add_post("/reset_prefix_cache", self.reset_cache)
            self._runner = web.AppRunner(app, access_log=None)
            self._loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", 0)
            self._loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake server did not start")
        return self

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reset(self) -> None:
        self.answer, self.fail_every, self.cache_header = "oracle-kv", 0, False
        self.first_token_delay = self.token_delay = 0.0
        self.requests = self.inflight = self.peak_inflight = 0
        self.prefix_queries = self.prefix_hits = 0
        self.bodies = []
        self.headers = []
        self.resets = 0

    def stop(self) -> None:
        if self._loop is None:
            return
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
