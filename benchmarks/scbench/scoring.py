"""Per-task scorers (SCBench definitions).

* ``substring``   retrieval: 1.0 if the label is a substring of the prediction.
* ``all_of_set``  multi-hop: fraction of the reference set found in the prediction
                  (case-insensitive, as RULER's string_match_all).
* ``first_number`` Math.Find: 1.0 if the first number in the prediction equals the label.
"""

from __future__ import annotations

import re
from typing import Any, Callable

_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?")


def substring(prediction: str, answer: Any) -> float:
    return 1.0 if str(answer) in (prediction or "") else 0.0


def all_of_set(prediction: str, answer: Any) -> float:
    refs = [answer] if isinstance(answer, str) else list(answer)
    if not refs:
        return 0.0
    pred = (prediction or "").lower()
    return sum(1.0 for r in refs if str(r).lower() in pred) / len(refs)


def first_number(prediction: str, answer: Any) -> float:
    m = _NUMBER.search(prediction or "")
    if not m:
        return 0.0
    text = m.group(0).replace(",", "")
    try:
        value = float(text)
        return 1.0 if value == float(answer) else 0.0
    except ValueError:
        return 0.0


SCORERS: dict[str, Callable[[str, Any], float]] = {
    "substring": substring,
    "all_of_set": all_of_set,
    "first_number": first_number,
}


def score(scorer: str, prediction: str, answer: Any) -> float:
    return SCORERS[scorer](prediction, answer)


def answer_text(answer: Any) -> str:
    """The golden answer as the assistant would say it (multi-turn history)."""
    if isinstance(answer, (list, tuple)):
        return ", ".join(map(str, answer))
    return str(answer)
