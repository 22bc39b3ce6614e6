"""Retr.KV: a JSON object of UUID keys -> UUID values; each turn asks a different key.

Prompt wording follows SCBench (from InfiniteBench's kv_retrieval).
"""

from __future__ import annotations

import json
import uuid

from .base import Case, Turn, case_rng, fitted_case
from .registry import register

NAME = "kv"
INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."


def _uuid(rng) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _build(seed, index: int, turns: int, n: int) -> tuple[str, list[Turn]]:
    rng = case_rng(seed, NAME, index)
    pairs: dict[str, str] = {}
    while len(pairs) < n:
        pairs[_uuid(rng)] = _uuid(rng)
    keys = list(pairs)
    asked = rng.sample(keys, turns)
    context = f"{INSTRUCTION}\n\nJSON data:\n{json.dumps(pairs)}"
    out = []
    for k in asked:
        out.append(Turn(
            input=f'Key: "{k}"\nThe value associated with the specified key is: ',
            answer=pairs[k], scorer="substring", task=NAME,
            meta={"key": k, "position": keys.index(k), "num_pairs": n}))
    return context, out


# 96: a model that restates the question ('The value associated with the key "<uuid>" ... is "<uuid>".') needs
# ~80 tokens (Qwen2.5: 78, SmolLM2: 83); 64 cut such right answers before the value.
@register(NAME, "JSON of UUID key -> UUID value; each turn asks another key", max_tokens=96)
def generate(seed, index: int, context_tokens: int, turns: int, count_tokens, **_) -> Case:
    return fitted_case(NAME, seed, index, context_tokens, count_tokens,
                       lambda n: _build(seed, index, turns, n), min_units=turns)
