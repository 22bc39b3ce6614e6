"""Entry identity (offload/layout.py): the model fingerprint and the layout behind every entry key.
Moved from tests/kvplug/test_vllm_compat.py with the code."""
import os
from types import SimpleNamespace

from offload import keys, layout


class _HfConfig:
    def __init__(self, values):
        self.values = values

    def to_dict(self):
        return dict(self.values)


def _vllm_config(model_dir, **model):
    fields = dict(hf_overrides=None, revision=None, quantization=None, seed=0)
    fields.update(model)
    mc = SimpleNamespace(model=str(model_dir), hf_config=_HfConfig(fields.pop("hf", {"rope_theta": 10000.0})),
                         **fields)
    return SimpleNamespace(model_config=mc, load_config=SimpleNamespace(load_format="auto"))


def test_model_fingerprint_changes_with_weights_config_and_revision_not_otherwise(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\0" * 64)
    (tmp_path / "README.md").write_text("docs")
    base = layout.model_fingerprint(_vllm_config(tmp_path))
    assert layout.model_fingerprint(_vllm_config(tmp_path)) == base  # stable (scheduler = every restart)
    (tmp_path / "README.md").write_text("other docs")
    assert layout.model_fingerprint(_vllm_config(tmp_path)) == base  # not the weights
    assert layout.model_fingerprint(_vllm_config(tmp_path, hf={"rope_theta": 5e5})) != base  # RoPE override
    assert layout.model_fingerprint(_vllm_config(tmp_path, revision="v2")) != base
    st = weights.stat()
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # new weights copied over the old ones
    assert layout.model_fingerprint(_vllm_config(tmp_path)) != base


def test_entry_keys_differ_across_model_fingerprints_and_key_versions(monkeypatch):
    lay = layout.KvLayout(model="/m", dtype="bfloat16", num_layers=2, kv_heads=2, head_dim=64,
                          block_size=16, kv_cache_dtype="auto", tp_rank=0, tp_size=1, model_id="a")
    other = layout.KvLayout(**{**lay.__dict__, "model_id": "b"})
    k = keys.entry_key(lay.identity(), "keep", b"h")
    assert keys.entry_key(other.identity(), "keep", b"h") != k
    monkeypatch.setattr(keys, "KEY_VERSION", b"kvplug-entry-v3")
    assert keys.entry_key(lay.identity(), "keep", b"h") != k


def test_kv_layout_reads_vllms_config_objects_by_attribute(tmp_path):
    cfg = _vllm_config(tmp_path, dtype="torch.bfloat16", get_num_layers=lambda pc: 4,
                       get_num_kv_heads=lambda pc: 2, get_head_size=lambda: 64)
    cfg.parallel_config = SimpleNamespace(tensor_parallel_size=2)
    cfg.cache_config = SimpleNamespace(block_size=16, cache_dtype="auto")
    got = layout.kv_layout(cfg, tp_rank=1)
    assert (got.dtype, got.num_layers, got.kv_heads, got.head_dim, got.block_size, got.tp_rank, got.tp_size) == \
        ("bfloat16", 4, 2, 64, 16, 1, 2)
    assert got.model_id == layout.model_fingerprint(cfg)


def test_key_maker_gives_the_keys_stored_entries_already_have():
    """Disk entries outlive a restart: the per-policy precomputed hash must give byte-identical keys (the
    length-prefixed SHA-256 of version, layout identity, policy and block hash)."""
    import hashlib

    lay = layout.KvLayout(model="/m", dtype="bfloat16", num_layers=2, kv_heads=2, head_dim=64,
                          block_size=16, kv_cache_dtype="auto", tp_rank=0, tp_size=1, model_id="a")

    def spelled_out(policy, raw):
        h = hashlib.sha256()
        for part in (keys.KEY_VERSION, lay.identity(), policy.encode(), raw):
            h.update(len(part).to_bytes(4, "little"))
            h.update(part)
        return h.hexdigest()[:48]

    maker = keys.KeyMaker(lay.identity(), "quant:int8")
    for block_hash in (b"h", b"\x00" * 32, ("tuple", 3)):
        raw = block_hash if isinstance(block_hash, bytes) else repr(block_hash).encode()
        assert maker(block_hash) == keys.entry_key(lay.identity(), "quant:int8", block_hash) == spelled_out(
            "quant:int8", raw)
    assert maker(b"h") == maker(b"h") != keys.KeyMaker(lay.identity(), "keep")(b"h")
