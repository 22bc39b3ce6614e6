"""Token counting with the target model's tokenizer."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

_APPROX = re.compile(r"\w+|[^\w\s]")


def approx_count(text: str) -> int:
    """Rough, tokenizer-free count (words + punctuation).  Only for offline tests
    or endpoints whose tokenizer is unavailable (``--tokenizer approx``)."""
    return len(_APPROX.findall(text))


class TokenizerError(RuntimeError):
    pass


def load_counter(spec: str) -> tuple[Callable[[str], int], str]:
    """``spec``: ``approx``, an HF folder / hub id, or a ``.gguf`` file.

    Returns ``(count_tokens, description)``.
    """
    if spec == "approx":
        return approx_count, "approx (words+punctuation)"
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover
        raise TokenizerError(f"transformers is not installed: {e}") from e
    path = Path(spec).expanduser()
    try:
        if path.suffix == ".gguf" and path.is_file():
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            kwargs = {"local_files_only": True} if path.exists() else {}
            tok = AutoTokenizer.from_pretrained(str(path) if path.exists() else spec, **kwargs)
    except Exception as e:  # noqa: BLE001 - report any loader failure in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TokenizerError(f"cannot load tokenizer {spec!r}: {msg}") from e

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    return count, str(spec)


def resolve_counter(tokenizer: str | None, model_id: str | None,
                    warn: Callable[[str], None] | None = None) -> tuple[Callable[[str], int], str]:
    """Pick the tokenizer per the CLI contract.

    Explicit ``--tokenizer`` wins; else the served model id when it is a local
    folder (or already in the local HF cache); else ``$KVPLUG_BENCH_TOKENIZER``;
    else ``kvplug.models.prepare(model_id)`` when the id is a model kvplug
    knows (e.g. ``smollm2-135m-instruct``), else ``kvplug.models.prepare()``
    (SmolLM2, with a warning).
    """
    if tokenizer:
        return load_counter(tokenizer)
    errors = []
    if model_id:
        if os.path.isdir(model_id):
            return load_counter(model_id)
        try:
            from transformers import AutoTokenizer
            tok = AutoTokenizer.from_pretrained(model_id, local_files_only=True)
            return (lambda text: len(tok(text, add_special_tokens=False)["input_ids"])), model_id
        except Exception as e:  # noqa: BLE001
            errors.append(f"model id {model_id!r}: {type(e).__name__}")
    env = os.environ.get("KVPLUG_BENCH_TOKENIZER")
    if env:
        return load_counter(env)
    named = False
    try:
        from kvplug import models as kv_models  # type: ignore
        named = bool(model_id) and kv_models.is_registered(model_id)
        folder = str(kv_models.prepare(model_id) if named else kv_models.prepare())
    except Exception as e:  # noqa: BLE001
        errors.append(f"kvplug.models.prepare(): {type(e).__name__}: {e}")
        raise TokenizerError("no tokenizer found (" + "; ".join(errors) +
                             "); pass --tokenizer PATH") from e
    if warn and not named:
        warn(f"warning: using the kvplug SmolLM2 tokenizer ({folder}) to size contexts; "
             f"pass --tokenizer if {model_id!r} uses another")
    return load_counter(folder)
