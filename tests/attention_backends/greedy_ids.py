"""Greedy token ids of the default model on fixed prompts, as JSON (run in a fresh process per engine).

    python -m tests.attention_backends.greedy_ids OUT.json      # VLLM_PLUGINS=none for vanilla vLLM
"""
from __future__ import annotations

import json
import sys

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "List three primary colors:",
    # Long enough for several KV blocks and, with the default 2048-token batch budget, chunked prefill.
    " ".join(f"Item {i} costs {i * 3 % 97} dollars." for i in range(250)) + " The most expensive item is",
]


def main(out: str) -> None:
    from vllm import LLM, SamplingParams

    from kvplug import models
    from kvplug.vllm_compat import attention_impl_names

    llm = LLM(model=str(models.prepare()), max_model_len=4096, kv_cache_memory_bytes=1 << 30, seed=0,
              max_num_batched_tokens=2048)
    impls = sorted({c for per_worker in llm.collective_rpc(attention_impl_names) for c in per_worker})
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    json.dump({"attention_impls": impls, "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
               "token_ids": [list(o.outputs[0].token_ids) for o in outs]}, open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1])
