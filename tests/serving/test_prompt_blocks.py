"""The router's prompt tokens and block hashes (serving/prompt_blocks.py) are the replicas' own."""
from __future__ import annotations

import httpx
import pytest

from kvplug import vllm_compat
from serving.prompt_blocks import PromptHasher

CHAT = [{"role": "system", "content": "You answer from the context."},
        {"role": "user", "content": "Context: " + " ".join(f"box {i} holds {i * 7 % 13} coins." for i in range(40))},
        {"role": "assistant", "content": "Understood."},
        {"role": "user", "content": [{"type": "text", "text": "How many coins"}, {"type": "text", "text": "in box 3?"}]}]


def test_token_ids_follow_vllms_defaults_per_endpoint(smollm2_path):
    hasher = PromptHasher(str(smollm2_path), "0")
    tok = hasher.tokenizer
    chat_ids = hasher.token_ids("/v1/chat/completions", {"messages": CHAT})
    text = tok.apply_chat_template([*CHAT[:3], {"role": "user", "content": "How many coins\nin box 3?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert chat_ids == tok.encode(text, add_special_tokens=False)
    assert hasher.token_ids("/v1/completions", {"prompt": [5, 6, 7]}) == [5, 6, 7]
    assert hasher.token_ids("/v1/completions", {"prompt": [[8, 9], [1]]}) == [8, 9]
    assert hasher.token_ids("/v1/completions", {"prompt": "hello"}) == tok.encode("hello")
    assert hasher.token_ids("/v1/completions", {"prompt": None}) is None


def test_block_hashes_chain_the_token_ids_and_the_cache_salt(smollm2_path):
    hasher = PromptHasher(str(smollm2_path), "0")
    ids = list(range(100, 170))
    got = hasher.block_hashes("/v1/completions", {"prompt": ids}, 16)
    assert got == vllm_compat.prefix_block_hashes(ids, 16, "0") and len(got) == 4
    salted = hasher.block_hashes("/v1/completions", {"prompt": ids, "cache_salt": "s"}, 16)
    assert not set(salted) & set(got)
    hasher.warm_up()
    # a request the router cannot render (a template error) gets no hashes: routed by affinity, not failed
    assert hasher.block_hashes("/v1/chat/completions", {"messages": [{"content": "no role"}]}, 16) == []


@pytest.mark.engine
@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {"messages": CHAT}),
    ("/v1/completions", {"prompt": "The capital of France is"}),
])
def test_token_ids_equal_the_servers_tokenize(kvplug_server, path, body):
    """vLLM's own /tokenize on a running server renders and tokenizes exactly as the router does."""
    r = httpx.post(f"{kvplug_server.base_url}/tokenize", json={"model": kvplug_server.model, **body}, timeout=60)
    assert r.status_code == 200, r.text
    assert PromptHasher(kvplug_server.model_path, "0").token_ids(path, body) == r.json()["tokens"]
