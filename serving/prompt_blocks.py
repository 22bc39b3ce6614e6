"""A request's prompt token ids and prefix-block hashes, computed in the router as the replicas compute them.

Tier-aware routing (serving/routing.py) compares a request's vLLM block hashes with the blocks each replica
holds. The router computes them itself, without a round trip to a replica: the model's own tokenizer (the
same files the replicas load) renders a chat with its chat template and tokenizes it the way vLLM's OpenAI
server does (chat: template text, no extra special tokens; completions: special tokens added), then
``vllm_compat.prefix_block_hashes`` chains the block hashes with the engines' hash algorithm and seed (``kvplug
serve`` gives every replica the same PYTHONHASHSEED). The cost is one tokenization per request (a few ms
for thousands of tokens, off the event loop). A request it cannot render the same way (a custom
``--chat-template``, tools, images) gets hashes no replica holds, so it falls back to affinity: slower,
never wrong.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Mapping

from kvplug import vllm_compat

log = logging.getLogger("kvplug.router")


class PromptHasher:
    def __init__(self, model_path: str, hash_seed: str, hash_algo: str = "sha256") -> None:
        self.model_path, self.hash_seed, self.hash_algo = model_path, hash_seed, hash_algo
        self._tokenizer: Any = None
        self._loading = threading.Lock()

    @property
    def tokenizer(self) -> Any:
        """Loaded once: the first requests (tokenized in threads) wait for one load instead of each loading."""
        if self._tokenizer is None:
            with self._loading:
                if self._tokenizer is None:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self.model_path)
        return self._tokenizer

    def warm_up(self) -> None:
        """Load the tokenizer, compile the chat template and import vLLM's hashing (together ~10 s on a busy
        CPU) before the first request needs them, not in its TTFT."""
        self.block_hashes("/v1/chat/completions", {"messages": [{"role": "user", "content": "warm up " * 40}]}, 16)

    def token_ids(self, path: str, body: Mapping[str, Any]) -> list[int] | None:
        """The prompt's token ids as the replica will see them, or None for a request shape not handled."""
        tok = self.tokenizer
        if path.endswith("/chat/completions"):
            messages = [{**m, "content": _text(m.get("content"))} for m in body["messages"]]
            kwargs = dict(body.get("chat_template_kwargs") or {})
            text = tok.apply_chat_template(
                messages, tokenize=False, tools=body.get("tools"),
                add_generation_prompt=body.get("add_generation_prompt", True),
                continue_final_message=body.get("continue_final_message", False), **kwargs)
            return tok.encode(text, add_special_tokens=bool(body.get("add_special_tokens", False)))
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], int):
            return list(prompt)
        if isinstance(prompt, list) and prompt:
            prompt = prompt[0]  # a batch: the first prompt, as routing.shared_prefix_text does
            if isinstance(prompt, list):
                return list(prompt)
        if not isinstance(prompt, str):
            return None
        return tok.encode(prompt, add_special_tokens=bool(body.get("add_special_tokens", True)))

    def block_hashes(self, path: str, body: Mapping[str, Any], block_size: int) -> list[bytes]:
        """vLLM's chained hashes of the prompt's full blocks ([] when the prompt cannot be rendered here)."""
        try:
            ids = self.token_ids(path, body)
        except Exception as exc:  # noqa: BLE001 - a template error here must not fail the request; vLLM says why
            log.debug("cannot tokenize a request for tier-aware routing: %s", exc)
            return []
        if not ids:
            return []
        return vllm_compat.prefix_block_hashes(ids, block_size, self.hash_seed, self.hash_algo,
                                               body.get("cache_salt") or None)


def _text(content: Any) -> Any:
    """Content parts joined as vLLM's 'string' content format does (text parts, newline-separated)."""
    if isinstance(content, list):
        return "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content
