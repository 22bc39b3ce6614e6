"""Retr.Prefix-Suffix: a long list of random strings; find the one with a given
prefix and suffix.  Every target has distractors that share only its prefix or
only its suffix, and exactly one string in the list has both.
"""

from __future__ import annotations

import string

from .base import Case, Turn, case_rng, fitted_case
from .registry import register

NAME = "prefix-suffix"
ALPHABET = string.ascii_letters + string.digits
AFFIX = 4  # prefix / suffix length
DISTRACTORS = 2  # per side and target
INSTRUCTION = ("Below is a list of random strings, one per line. You will be asked to find "
               "the string that starts with a given prefix and ends with a given suffix.")


def _rand(rng, n: int) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(n))


def _build(seed, index: int, turns: int, n: int) -> tuple[str, list[Turn]]:
    rng = case_rng(seed, NAME, index)
    per_target = 1 + 2 * DISTRACTORS
    n_filler = max(0, n - turns * per_target)
    strings: list[str] = []
    seen: set[str] = set()

    def fresh(prefix: str = "", suffix: str = "") -> str:
        while True:
            mid = _rand(rng, rng.randint(16, 24) - 2 * AFFIX)
            s = (prefix or _rand(rng, AFFIX)) + mid + (suffix or _rand(rng, AFFIX))
            if s not in seen:
                seen.add(s)
                return s

    targets = []
    for _ in range(turns):
        while True:  # affixes unique among targets
            p, s = _rand(rng, AFFIX), _rand(rng, AFFIX)
            if all(p != tp and s != ts for tp, ts, _ in targets):
                break
        targets.append((p, s, fresh(p, s)))
    group = [t[2] for t in targets]
    for p, s, _ in targets:
        group += [fresh(prefix=p) for _ in range(DISTRACTORS)]
        group += [fresh(suffix=s) for _ in range(DISTRACTORS)]
    filler = [fresh() for _ in range(n_filler)]
    # Reject accidental matches: exactly one string per target has both affixes.
    for p, s, t in targets:
        filler = [f for f in filler if not (f.startswith(p) and f.endswith(s))]
        group = [g for g in group if g == t or not (g.startswith(p) and g.endswith(s))]
    strings = group + filler
    rng.shuffle(strings)
    context = INSTRUCTION + "\n\n" + "\n".join(strings)
    out = [Turn(
        input=(f'Which string in the list above starts with "{p}" and ends with "{s}"? '
               f"Answer with the string only.\nThe string is: "),
        answer=t, scorer="substring", task=NAME,
        meta={"prefix": p, "suffix": s, "position": strings.index(t),
              "num_strings": len(strings)}) for p, s, t in targets]
    return context, out


@register(NAME, "random strings; find the one with a given prefix and suffix", max_tokens=32)
def generate(seed, index: int, context_tokens: int, turns: int, count_tokens, **_) -> Case:
    return fitted_case(NAME, seed, index, context_tokens, count_tokens,
                       lambda n: _build(seed, index, turns, n),
                       min_units=turns * (1 + 2 * DISTRACTORS))
