"""Locally generated long prompts (seeded): KV retrieval (SCBench Retr.KV recipe) and passkey needles.

Used by `kvplug patterns search` as the calibration prompt and by the accuracy tests.
"""
from __future__ import annotations

import json
import random
import uuid
from typing import Callable

FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def kv_retrieval(count_tokens: Callable[[str], int], target_tokens: int, seed: int) -> tuple[str, str]:
    """(prompt, answer): a JSON object of UUID pairs about ``target_tokens`` long; ask one key's value."""
    rng = random.Random(seed)
    per_pair = max(1, count_tokens(json.dumps({_uuid(rng): _uuid(rng)})) - 2)
    n = max(2, (target_tokens - 80) // per_pair)
    pairs = {_uuid(rng): _uuid(rng) for _ in range(n)}
    key = list(pairs)[rng.randrange(n)]
    prompt = ("Extract the value corresponding to the specified key in the JSON object below.\n\n"
              f"{json.dumps(pairs, indent=0)}\n\nKey: \"{key}\"\nThe value associated with the specified key is: ")
    return prompt, pairs[key]


def passkey(count_tokens: Callable[[str], int], target_tokens: int, seed: int) -> tuple[str, str]:
    """(prompt, answer): a 5-digit pass key hidden at a random depth of repeated filler."""
    rng = random.Random(seed)
    key = str(rng.randrange(10000, 100000))
    per_filler = max(1, count_tokens(FILLER * 10) // 10)
    reps = max(2, (target_tokens - 60) // per_filler)
    depth = rng.randrange(reps)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    body = FILLER * depth + needle + FILLER * (reps - depth)
    prompt = ("There is important info hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
              f"{body}\n\nWhat is the pass key? The pass key is ")
    return prompt, key


GENERATORS = {"kv": kv_retrieval, "passkey": passkey}
