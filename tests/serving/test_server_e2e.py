"""`kvplug serve` end to end on the real vLLM CPU engine, through the `openai` client."""
from __future__ import annotations

import re

import pytest
from openai import OpenAI

pytestmark = pytest.mark.engine

DOC = " ".join(f"Fact {i}: the code word for box {i} is {['red', 'blue', 'green', 'gold'][i % 4]}{i * 7}."
               for i in range(60))


def sample(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of metric `name` whose labels include `labels`."""
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    if not found:
        raise AssertionError(f"no sample of {name} {labels} on /metrics")
    return total


@pytest.fixture(scope="module")
def client(kvplug_server) -> OpenAI:
    return OpenAI(base_url=kvplug_server.base_url + "/v1", api_key="unused", timeout=300)


def test_models_lists_the_default_model(client, kvplug_server):
    ids = [m.id for m in client.models.list().data]
    assert ids == [kvplug_server.model]


def test_completion(client, kvplug_server):
    out = client.completions.create(model=kvplug_server.model, prompt="The capital of France is",
                                    max_tokens=8, temperature=0)
    assert out.choices[0].text.strip()
    assert out.usage.completion_tokens == 8


def test_chat(client, kvplug_server):
    out = client.chat.completions.create(model=kvplug_server.model, max_tokens=16, temperature=0,
                                         messages=[{"role": "user", "content": "Say hello."}])
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content.strip()


def test_streaming_chat(client, kvplug_server):
    stream = client.chat.completions.create(model=kvplug_server.model, max_tokens=12, temperature=0, stream=True,
                                            messages=[{"role": "user", "content": "Count to five."}])
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1
    # Streaming and non-streaming greedy answers agree.
    full = client.chat.completions.create(model=kvplug_server.model, max_tokens=12, temperature=0,
                                          messages=[{"role": "user", "content": "Count to five."}])
    assert "".join(pieces) == full.choices[0].message.content


def test_second_turn_hits_the_prefix_cache(client, kvplug_server):
    before = sample(kvplug_server.metrics_text(), "vllm:prefix_cache_hits_total")
    messages = [{"role": "system", "content": "Answer from this document only.\n" + DOC},
                {"role": "user", "content": "What is the code word for box 3?"}]
    first = client.chat.completions.create(model=kvplug_server.model, messages=messages, max_tokens=10,
                                           temperature=0)
    prompt_tokens = first.usage.prompt_tokens
    assert prompt_tokens > 512, "the shared document must span several KV blocks"
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And for box 10?"}]
    client.chat.completions.create(model=kvplug_server.model, messages=messages, max_tokens=10, temperature=0)
    hits = sample(kvplug_server.metrics_text(), "vllm:prefix_cache_hits_total") - before
    # Turn 2 reuses the whole first prompt except its last partial KV block (block size <= 128 here).
    assert hits >= prompt_tokens - 128, f"prefix-cache hits rose by {hits}, first prompt had {prompt_tokens}"


def test_kvplug_metrics_from_every_process(client, kvplug_server):
    client.completions.create(model=kvplug_server.model, prompt="One two three", max_tokens=4, temperature=0)
    text = kvplug_server.metrics_text()
    info = [ln for ln in text.splitlines() if ln.startswith("kvplug_info{")]
    assert len(info) == 1 and 'features="none"' in info[0] and 'platform="cpu"' in info[0]
    processes = set(re.findall(r'kvplug_plugin_loads_total\{process="([^"]+)"\}', text))
    # API server, engine core and the worker each loaded the plugin.
    assert "MainProcess" in processes and len(processes) >= 3, processes
    layers = sample(text, "kvplug_backend_layers_total", backend="kvplug-cpu-dense")
    assert layers == 30  # SmolLM2-135M has 30 attention layers, all on kvplug's backend
    for phase in ("prefill", "decode"):
        assert sample(text, "kvplug_attention_calls_total", phase=phase) > 0
        assert sample(text, "kvplug_attention_tokens_total", phase=phase) > 0
    # Calls are per layer: a multiple of the layer count.
    assert sample(text, "kvplug_attention_calls_total", phase="prefill") % 30 == 0


def test_bad_request_is_400_not_a_trace(kvplug_server):
    import httpx

    r = httpx.post(kvplug_server.base_url + "/v1/chat/completions", timeout=60,
                   json={"model": kvplug_server.model, "messages": "not a list"})
    assert r.status_code == 400
    assert "Traceback" not in r.text
