"""pattern_config=auto finds shipped per-head configs by model identity (model_identity.py), not folder name;
budgets scale with the context beyond the length a config was searched at (head_config.budget_scale)."""
from __future__ import annotations

import json
import logging

import pytest

from attention_backends.sparse_prefill import head_config, model_identity, planner
from attention_backends.sparse_prefill.head_config import HeadPattern, LayerPlan, PatternConfig

# Qwen2.5-Coder-0.5B-Instruct's config.json as kvplug's GGUF conversion writes it (transformers 5)...
QWEN = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "hidden_size": 896, "intermediate_size": 4864,
        "vocab_size": 151936, "max_position_embeddings": 32768, "max_window_layers": 28,
        "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "sliding_window": None,
        "use_sliding_window": False, "rms_norm_eps": 9.999999974752427e-07, "tie_word_embeddings": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16", "transformers_version": "5.19.0",
        "_model_name_or_path": "Qwen2.5 Coder 0.5B Instruct AWQ"}
# ... and as an older transformers writes the same model (rope_theta at the top, a disabled sliding window,
# tied embeddings, another eps rounding and name): the same identity
QWEN_OLD_STYLE = {k: v for k, v in QWEN.items() if k not in ("rope_parameters", "_model_name_or_path")} | {
    "rope_theta": 1000000, "rope_scaling": None, "sliding_window": 4096, "use_sliding_window": False,
    "rms_norm_eps": 1e-06, "tie_word_embeddings": True, "transformers_version": "4.51.0",
    "_name_or_path": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "torch_dtype": "bfloat16"}


def folder(tmp_path, name: str, cfg: dict):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize("name,cfg", [("qwen2.5-coder-0.5b", QWEN), ("my-renamed-model", QWEN),
                                      ("Qwen2.5-Coder-0.5B-Instruct", QWEN_OLD_STYLE)])
def test_renamed_folder_with_the_same_config_finds_the_shipped_config(tmp_path, name, cfg):
    path, reason = model_identity.find_shipped(model_identity.model_identity(folder(tmp_path, name, cfg)))
    assert path == model_identity.SHIPPED_CONFIGS / "qwen2.5-coder-0.5b-instruct.json"
    assert reason.startswith("identity match: Qwen2ForCausalLM (24 layers, 14 q / 2 kv heads, head dim 64")


def test_other_models_do_not_get_it(tmp_path):
    deeper = model_identity.model_identity(folder(tmp_path, "qwen2.5-coder-0.5b-instruct", QWEN | {"num_hidden_layers": 28}))
    path, reason = model_identity.find_shipped(deeper)
    assert path is None and "no shipped config for Qwen2ForCausalLM (28 layers" in reason
    # same shape, other positions (rope theta): the hash differs and the reason says so
    other_rope = QWEN | {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}}
    path, reason = model_identity.find_shipped(model_identity.model_identity(folder(tmp_path, "x", other_rope)))
    assert path is None and "qwen2.5-coder-0.5b-instruct.json has the same shape but another config hash" in reason
    assert model_identity.find_shipped(model_identity.model_identity(tmp_path / "no-config"))[0] is None


def test_auto_uses_identity_and_logs_why(tmp_path, caplog):
    renamed = folder(tmp_path, "smollm2-135m-instruct", QWEN)  # a Qwen config.json under SmolLM2's name
    with caplog.at_level(logging.INFO, logger="vllm.kvplug.sparse_prefill"):
        chosen = planner.choose_pattern_config("auto", str(renamed), "vertical_slash", "{}")
    assert chosen.config.num_layers == 24 and chosen.config.num_heads == 14  # Qwen's, whatever the name says
    assert "qwen2.5-coder-0.5b-instruct.json (identity match" in caplog.text
    unknown = planner.choose_pattern_config("auto", str(folder(tmp_path, "m", QWEN | {"num_hidden_layers": 3})),
                                            "block_sparse", '{"top_k": 8}')
    assert unknown.source == "uniform default" and unknown.config.default.pattern == "block_sparse"
    assert "no shipped config" in unknown.reason


def test_shipped_configs_carry_their_identity_and_the_index_matches():
    assert json.loads(model_identity.INDEX.read_text()) == model_identity.build_index()
    for entry in model_identity.load_index().values():
        cfg = head_config.load(model_identity.SHIPPED_CONFIGS / entry["file"])
        ident = cfg.identity
        assert (ident.num_layers, ident.num_heads) == (cfg.num_layers, cfg.num_heads)
        # the hash is the hash of the fields it records (no hand-edited identity)
        assert model_identity.hash_fields(ident.fields) == ident.config_hash
        assert cfg.searched_tokens  # the length it was searched at: what budget scaling starts from


def test_smollm2_identity_from_its_config_fields():
    cfg = head_config.load(model_identity.SHIPPED_CONFIGS / "smollm2-135m-instruct.json")
    assert cfg.identity.describe() == ("LlamaForCausalLM (30 layers, 9 q / 3 kv heads, head dim 64, config hash "
                                       f"{cfg.identity.config_hash})")


@pytest.mark.parametrize("searched,L,limit,factor", [
    (32000, 8000, 4.0, 1.0),  # within the searched length: budgets as searched
    (32000, 32000, 4.0, 1.0),
    (32000, 64000, 4.0, 2.0),  # twice the length: twice the columns/diagonals/blocks (same fraction)
    (32000, 96000, 4.0, 2 ** (6 / 4)),  # 3x, in quarter-octave steps (a bounded set of layer plans)
    (32000, 1_000_000, 4.0, 4.0),  # capped
    (32000, 128000, 1.0, 1.0),  # scaling off
    (None, 128000, 4.0, 1.0),  # not searched (uniform default): never scaled
])
def test_budget_scale_rule(searched, L, limit, factor):
    assert head_config.budget_scale(searched, L, limit) == pytest.approx(factor)


def test_scaled_budgets_keep_local_ones_and_minimums():
    assert head_config.scaled_budgets("vertical_slash", {"vertical": 1000, "slash": 512}, 2.0) == \
        {"vertical": 2000, "slash": 1024}
    assert head_config.scaled_budgets("block_sparse", {"top_k": 1}, 0.25) == {"top_k": 1}  # the pattern's minimum
    assert head_config.scaled_budgets("a_shape", {"sink": 64, "window": 512}, 4.0) == {"sink": 64, "window": 512}
    assert head_config.scaled_budgets("dense", {}, 4.0) == {}


def test_layer_plan_at_a_budget_factor():
    cfg = PatternConfig(default=HeadPattern(pattern="vertical_slash", budgets={"vertical": 100, "slash": 64}),
                        layers={0: {1: HeadPattern(pattern="a_shape", budgets={"sink": 64, "window": 256})}}).validate()
    plan = LayerPlan.from_config(cfg, 0, 2, budget_factor=2.0)
    groups = {g.pattern: g for g in plan.groups}
    assert groups["vertical_slash"].budget_max == {"vertical": 200, "slash": 128}
    assert groups["a_shape"].budget_max == {"sink": 64, "window": 256}


# Qwen2.5-Coder-1.5B-Instruct's config.json (as the staged model's converter writes it): the shipped 1.5B config
# (searched at 24K on the H100 on 2026-12-07, budgets x2) must be found by identity, and the 0.5B's must not.
QWEN_15B = QWEN | {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
                   "num_key_value_heads": 2, "_model_name_or_path": "Qwen2.5 Coder 1.5B Instruct"}


def test_qwen_15b_finds_its_own_shipped_config(tmp_path):
    path, reason = model_identity.find_shipped(model_identity.model_identity(folder(tmp_path, "q15", QWEN_15B)))
    assert path == model_identity.SHIPPED_CONFIGS / "qwen2.5-coder-1.5b-instruct.json", reason
    assert reason.startswith("identity match: Qwen2ForCausalLM (28 layers, 12 q / 2 kv heads, head dim 128")
