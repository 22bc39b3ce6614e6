"""Which model a per-head pattern config belongs to: its identity from config.json, not the folder's name.

A per-head config only fits a model with the same attention geometry and weights family, so shipped
configs are found by identity: architecture, layer and head counts, head dim, and a hash over the
config.json fields that shape attention (``HASHED_FIELDS``, normalized across transformers versions:
``rope_theta`` may sit in ``rope_parameters``). Fields that differ between conversions of the same
weights (dtype, token ids, ``rms_norm_eps`` rounded by GGUF, ``tie_word_embeddings``, transformers
version, the original name) are left out, so a renamed or re-converted folder of the same model still
matches; fine-tunes of one base model share an identity (their heads are close; `kvplug patterns search`
on the served model beats any shipped config). configs/index.json lists the shipped configs by hash
(``write_index`` regenerates it; a test checks it against the files).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import msgspec

SHIPPED_CONFIGS = Path(__file__).parent / "configs"
INDEX = SHIPPED_CONFIGS / "index.json"

# config.json fields hashed (after normalization): what decides where a model's heads attend.
HASHED_FIELDS = ("architecture", "model_type", "num_layers", "num_heads", "num_kv_heads", "head_dim", "hidden_size",
                 "intermediate_size", "vocab_size", "max_position_embeddings", "rope_theta", "rope_type",
                 "rope_factor", "sliding_window")


class ModelIdentity(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    config_hash: str  # sha256 (16 hex) of ``fields``
    fields: dict[str, Any] = {}  # the normalized config.json fields the hash covers (readable, for diffs)

    def describe(self) -> str:
        return (f"{self.architecture} ({self.num_layers} layers, {self.num_heads} q / {self.num_kv_heads} kv heads, "
                f"head dim {self.head_dim}, config hash {self.config_hash})")


class IdentityError(ValueError):
    """A config.json lacks what an identity needs (the message names the field)."""


def _rope(cfg: Mapping[str, Any]) -> tuple[float | None, str, float | None]:
    params = dict(cfg.get("rope_scaling") or {})
    params.update(cfg.get("rope_parameters") or {})
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    kind = params.get("rope_type") or params.get("type") or "default"
    factor = params.get("factor")
    return (None if theta is None else float(f"{float(theta):.6g}"), str(kind),
            None if factor is None else float(f"{float(factor):.6g}"))


def normalized_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """config.json (a dict) -> the fields an identity hashes, normalized across transformers versions."""
    cfg = dict(cfg)
    cfg.update(cfg.get("text_config") or {})  # multimodal wrappers keep the language model's fields there
    for key in ("num_hidden_layers", "num_attention_heads"):
        if not isinstance(cfg.get(key), int):
            raise IdentityError(f"config.json has no integer {key!r}")
    heads = cfg["num_attention_heads"]
    archs = cfg.get("architectures") or []
    theta, rope_type, rope_factor = _rope(cfg)
    sliding = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
    return {
        "architecture": str(archs[0]) if archs else str(cfg.get("model_type", "")),
        "model_type": str(cfg.get("model_type", "")),
        "num_layers": cfg["num_hidden_layers"],
        "num_heads": heads,
        "num_kv_heads": int(cfg.get("num_key_value_heads") or heads),
        "head_dim": int(cfg.get("head_dim") or cfg.get("hidden_size", 0) // heads),
        "hidden_size": cfg.get("hidden_size"),
        "intermediate_size": cfg.get("intermediate_size"),
        "vocab_size": cfg.get("vocab_size"),
        "max_position_embeddings": cfg.get("max_position_embeddings"),
        "rope_theta": theta,
        "rope_type": rope_type,
        "rope_factor": rope_factor,
        "sliding_window": sliding,
    }


def hash_fields(fields: Mapping[str, Any]) -> str:
    """sha256 (16 hex digits) of the normalized fields, in HASHED_FIELDS order."""
    return hashlib.sha256(json.dumps([fields[k] for k in HASHED_FIELDS]).encode()).hexdigest()[:16]


def identity_of(cfg: Mapping[str, Any]) -> ModelIdentity:
    fields = normalized_fields(cfg)
    digest = hash_fields(fields)
    return ModelIdentity(architecture=fields["architecture"], num_layers=fields["num_layers"],
                         num_heads=fields["num_heads"], num_kv_heads=fields["num_kv_heads"],
                         head_dim=fields["head_dim"], config_hash=digest, fields=fields)


def read_config(model: str | Path) -> dict[str, Any] | None:
    """config.json of a local model folder (or a Hugging Face id already in the local cache); None if absent."""
    path = Path(str(model))
    if path.is_dir():
        try:
            return json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            return None
    try:  # an HF id: only what is cached locally (no network from here)
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(str(model), "config.json")
        return json.loads(Path(cached).read_text()) if isinstance(cached, str) else None
    except Exception:  # noqa: BLE001 - hub client missing or odd id: no identity, the caller says so
        return None


def model_identity(model: str | Path) -> ModelIdentity | None:
    cfg = read_config(model)
    if cfg is None:
        return None
    try:
        return identity_of(cfg)
    except IdentityError:
        return None


def load_index(index: Path = INDEX) -> dict[str, dict[str, Any]]:
    """config hash -> {"file": name in configs/, "identity": ...} of the shipped configs."""
    if not index.exists():
        return {}
    return {e["identity"]["config_hash"]: e for e in json.loads(index.read_text())["configs"]}


def build_index(folder: Path = SHIPPED_CONFIGS) -> dict[str, Any]:
    """The index of every config in ``folder`` that records an identity (what index.json holds)."""
    entries = []
    for path in sorted(folder.glob("*.json")):
        if path.name == INDEX.name:
            continue
        ident = json.loads(path.read_text()).get("identity")
        if ident:
            entries.append({"file": path.name, "identity": {k: ident[k] for k in (
                "architecture", "num_layers", "num_heads", "num_kv_heads", "head_dim", "config_hash")}})
    return {"note": "generated by attention_backends.sparse_prefill.model_identity.write_index(); "
                    "pattern_config=auto looks configs up here by config_hash", "configs": entries}


def write_index(folder: Path = SHIPPED_CONFIGS) -> Path:
    out = folder / INDEX.name
    out.write_text(json.dumps(build_index(folder), indent=1) + "\n")
    return out


def find_shipped(ident: ModelIdentity | None, index: dict[str, dict[str, Any]] | None = None,
                 folder: Path = SHIPPED_CONFIGS) -> tuple[Path | None, str]:
    """(shipped config for this identity or None, why): the reason is what the log and the info metric say."""
    if ident is None:
        return None, "the model's config.json was not found: no identity to look up"
    index = load_index(folder / INDEX.name) if index is None else index
    hit = index.get(ident.config_hash)
    if hit is not None:
        return folder / hit["file"], f"identity match: {ident.describe()}"
    same_shape = [e["file"] for e in index.values() if all(
        e["identity"][k] == getattr(ident, k) for k in ("architecture", "num_layers", "num_heads", "num_kv_heads",
                                                         "head_dim"))]
    if same_shape:
        return None, (f"no shipped config for {ident.describe()}; {', '.join(same_shape)} has the same shape but "
                      "another config hash (other rope/vocab/width)")
    return None, f"no shipped config for {ident.describe()}"


if __name__ == "__main__":  # after adding a searched config to configs/: python -m ...model_identity
    print(f"wrote {write_index()}")
