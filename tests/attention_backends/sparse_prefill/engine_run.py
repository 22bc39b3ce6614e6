"""Greedy answers of the default model on long local prompts, in one engine, as JSON (a subprocess per run).

    python -m tests.attention_backends.sparse_prefill.engine_run OUT.json N_PROMPTS TOKENS
kvplug config comes from KVPLUG_* env (the test sets sparse_prefill on or off). Besides the greedy ids it
records the top-2 logprobs of every step, so a disagreement can be told apart from a near-tie.
"""
from __future__ import annotations

import json
import sys

MAX_TOKENS = 8


def main(out: str, n_prompts: int, tokens: int) -> None:
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from attention_backends.sparse_prefill import calibration, runner
    from benchmarks.sparse_prefill_accuracy import top2
    from kvplug import models

    path = str(models.prepare())
    tok = AutoTokenizer.from_pretrained(path)
    count = lambda s: len(tok(s).input_ids)  # noqa: E731
    kinds = ["passkey" if i % 2 else "kv" for i in range(n_prompts)]
    cases = [calibration.GENERATORS[kind](count, tokens, seed=i) for i, kind in enumerate(kinds)]
    # Small batch budget: every long prompt is prefilled in several chunks.
    llm = LLM(model=path, max_model_len=8192, kv_cache_memory_bytes=1 << 30, seed=0, max_num_batched_tokens=1024,
              enable_prefix_caching=True)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, logprobs=2)
    first = llm.generate([p for p, _ in cases], params, use_tqdm=False)
    stats_first = llm.collective_rpc(runner.stats_snapshot)[0]
    # Second turn: the same context + a new question hits the prefix cache; only the suffix is prefilled.
    # The last two prompts: their blocks are the most recently used, so the cache still holds them.
    second_prompts = [p + first[i].outputs[0].text + "\nRepeat the answer: " for i, (p, _) in enumerate(cases)][-2:]
    second = llm.generate(second_prompts, SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
    stats = llm.collective_rpc(runner.stats_snapshot)[0]
    json.dump({"kinds": kinds,
               "prompt_tokens": [len(o.prompt_token_ids) for o in first],
               "answers": [c[1] for c in cases],
               "texts": [o.outputs[0].text for o in first],
               "token_ids": [list(o.outputs[0].token_ids) for o in first],
               "top2": [[top2(step) for step in o.outputs[0].logprobs] for o in first],
               "second_token_ids": [list(o.outputs[0].token_ids) for o in second],
               "second_cached_tokens": [o.num_cached_tokens for o in second],
               "stats_first": stats_first, "stats": stats}, open(out, "w"))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
