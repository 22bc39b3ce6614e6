"""benchmarks/sparse_prefill_accuracy.py pieces that need no engine: answer agreement classes, config lookup."""
from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import sparse_prefill_accuracy as acc


def test_agreement_classes():
    top2 = [[[5, -0.1], [6, -2.0]], [[7, -0.6], [8, -0.8]]]
    assert acc.agreement([5, 7], top2, [5, 7]) == "same"
    assert acc.agreement([5, 7], top2, [5, 8]) == "near_tie"  # dense's runner-up, 0.2 nats behind
    assert acc.agreement([5, 7], top2, [5, 8], near_tie=0.1) == "differ"
    assert acc.agreement([5, 7], top2, [6, 7]) == "differ"  # 1.9 nats: a real change
    assert acc.agreement([5, 7], top2, [5, 9]) == "differ"  # not even dense's runner-up


def test_pattern_config_lookup(tmp_path):
    """By the model's identity (its config.json), whatever the folder is called."""
    import json

    from attention_backends.sparse_prefill import head_config, model_identity

    def folder(name: str, shipped: str) -> Path:
        ident = head_config.load(model_identity.SHIPPED_CONFIGS / shipped).identity
        cfg = {"architectures": [ident.architecture], "num_hidden_layers": ident.num_layers,
               "num_attention_heads": ident.num_heads} | {k: v for k, v in ident.fields.items() if k in (
                   "model_type", "hidden_size", "intermediate_size", "vocab_size", "max_position_embeddings")}
        cfg |= {"num_key_value_heads": ident.num_kv_heads, "head_dim": ident.head_dim,
                "rope_theta": ident.fields["rope_theta"]}
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        return tmp_path / name

    staged = folder("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct.json")  # stage-model.sh's folder name
    assert acc.pattern_config_path("auto", staged).endswith("qwen2.5-coder-0.5b-instruct.json")
    assert acc.pattern_config_path("auto", folder("renamed", "smollm2-135m-instruct.json")).endswith(
        "smollm2-135m-instruct.json")
    assert acc.pattern_config_path("/x/cfg.json", staged) == "/x/cfg.json"
    with pytest.raises(SystemExit, match="--pattern-config"):
        acc.pattern_config_path("auto", Path("/no/such-model"))


def test_task_summary_counts_what_dense_gets_right():
    """--tasks mode: per-task accuracy from the scorer, the paired difference, and answers kept where dense is
    right (a sparse answer that differs from a wrong dense answer does not count against it)."""
    items = [{"case": i // 2, "task": "passkey", "turn": i % 2, "context_tokens": 8000, "answer": "123",
              "scorer": "substring"} for i in range(4)]
    top = [[[1, -0.1], [2, -3.0]]]
    dense = {"prompt_tokens": [9000] * 4, "token_ids": [[1], [1], [1], [1]], "top2": [top] * 4,
             "texts": ["123", "123", "9", "9"]}
    sparse = {"token_ids": [[1], [2], [1], [2]], "texts": ["123", "8", "9", "123"]}
    out = acc.task_summary(items, dense, sparse, near_tie=0.5)
    t = out["per_task"]["passkey"]
    assert t["n"] == 4 and t["dense_accuracy"] == 0.5 and t["sparse_accuracy"] == 0.5
    assert t["dense_right"] == 2 and t["kept_where_dense_right"] == 0.5
    assert t["identical"] == 0.5
    assert t["sparse_minus_dense"]["mean"] == 0.0
    assert out["per_turn"]["1"]["n"] == 2
    assert out["overall"]["n"] == 4


def test_parse_variants_keys_and_searches():
    vs = acc.parse_variants("shipped; gs:group_shared_selection=true ;x2:budgets=2;"
                            "s24:search_tokens=24000,target_recall=0.98,group_shared_selection=true;"
                            "p16:search_tokens=16000,search_task=passkey,search_chunk=4096", chunk=8192)
    assert [v.label for v in vs] == ["shipped", "gs", "x2", "s24", "p16"]
    assert vs[0] == acc.Variant("shipped")
    assert vs[1].keys == {"group_shared_selection": "true"} and vs[1].search is None
    assert vs[2].budgets == 2.0
    assert vs[3].search == acc.Search(24000, 0.98, "kv", 8192)  # the search replays the chunk served
    assert vs[3].keys == {"group_shared_selection": "true"}
    assert vs[4].search == acc.Search(16000, 0.95, "passkey", 4096)
    assert acc.parse_variants("", chunk=8192) == []


def test_parse_variants_dense_tail_rows():
    vs = acc.parse_variants("tail64:dense_tail_rows=64;tail256_gs:dense_tail_rows=256,group_shared_selection=true",
                            chunk=8192)
    assert vs[0].keys == {"dense_tail_rows": "64"}
    assert vs[1].keys == {"dense_tail_rows": "256", "group_shared_selection": "true"}


def test_parse_variants_vertical_segment_rows():
    assert acc.parse_variants("seg1024:vertical_segment_rows=1024", chunk=8192)[0].keys == {
        "vertical_segment_rows": "1024"}


def test_parse_variants_ablation_keys():
    """The replay's oracle and dense_first_chunk as gate variants (sparse_prefill keys switched in the engine)."""
    vs = acc.parse_variants("oracle:exact_selection=true,vertical_segment_rows=64;dfc:min_prompt_tokens=8193",
                            chunk=8192)
    assert vs[0].keys == {"exact_selection": "true", "vertical_segment_rows": "64"}
    assert vs[1].keys == {"min_prompt_tokens": "8193"}


def test_recall_options_are_the_keys_recall_replays():
    """A variant's recall is measured with its group-shared selection and segment rows (as text, as --variants
    gives them); keys recall does not replay (a dense tail, exact selection, the floor) leave the options default, so
    variants differing only in them share one measurement."""
    from attention_backends.sparse_prefill.index_options import IndexOptions

    assert acc.recall_options({}) == IndexOptions()
    assert acc.recall_options({"group_shared_selection": "true", "vertical_segment_rows": "1024"}) == IndexOptions(
        group_shared_selection=True, vertical_segment_rows=1024)
    assert acc.recall_options({"dense_tail_rows": "64", "exact_selection": "true", "min_prompt_tokens": "8193",
                               "fused_estimate": "true"}) == IndexOptions()


def test_gqa_shaped_estimate_variant_reaches_the_engine_and_recall():
    """The gate's variant for sparse_prefill.gqa_shaped_estimate: passed to the engine as a key, and replayed by the
    recall measurement (it can change the selected keys)."""
    from attention_backends.sparse_prefill.index_options import IndexOptions

    v = acc.parse_variants("shipped;gqa:gqa_shaped_estimate=true", chunk=8192)[1]
    assert v.label == "gqa" and v.keys == {"gqa_shaped_estimate": "true"}
    assert acc.recall_options(v.keys) == IndexOptions(gqa_shaped_estimate=True)
    with pytest.raises(SystemExit, match="gqa_shaped_estimate"):
        acc.parse_variants("gqa:gqa_shaped_estimate=maybe", chunk=8192)


@pytest.mark.parametrize("spec, needle", [
    ("a:nope=1", "unknown key 'nope'"),
    ("a:budgets=0", "budgets must be a number > 0"),
    ("a:budgets", "is not KEY=VALUE"),
    ("a;a:budgets=2", "label 'a' used twice"),
    (":budgets=2", "has no label"),
    ("a:target_recall=0.98", "need search_tokens"),
    ("a:search_tokens=8000,target_recall=1.5", "target_recall must be in"),
    ("a:search_tokens=lots", "search_tokens must be an integer"),
    ("a:search_tokens=8000,search_task=qa", "search_task must be kv or passkey"),
    ("a:search_tokens=8000,config=x.json", "exclude each other"),
    ("a:dense_tail_rows=-64", "dense_tail_rows must be >= 0"),  # before any engine starts
    ("a:dense_tail_rows=some", "dense_tail_rows"),
    ("a:vertical_segment_rows=1000", "vertical_segment_rows must be 0 .off. or a positive multiple of 64"),
    ("a:group_shared_selection=maybe", "group_shared_selection"),
    ("a:exact_selection=maybe", "exact_selection"),
    ("a:min_prompt_tokens=0", "min_prompt_tokens must be >= 1"),
])
def test_parse_variants_names_what_is_wrong(spec, needle):
    with pytest.raises(SystemExit, match=needle):
        acc.parse_variants(spec, chunk=8192)


def test_scaled_config_multiplies_length_proportional_budgets_only():
    from attention_backends.sparse_prefill import head_config
    from attention_backends.sparse_prefill.head_config import HeadPattern as HP

    cfg = head_config.PatternConfig(
        default=HP(pattern="vertical_slash", budgets={"vertical": 100, "slash": 256}), num_layers=2, num_heads=3,
        calibration={"tokens": 32000}, layers={0: {0: HP(pattern="block_sparse", budgets={"top_k": 8}, recall=0.96),
                                                   1: HP(pattern="a_shape", budgets={"sink": 64, "window": 512}),
                                                   2: HP(pattern="dense", recall=1.0)}}).validate()
    out = acc.harness.scaled_config(cfg, 2)  # the accuracy run's budgets=F (and the replay's budgets<F>)
    assert out.head(0, 0) == HP(pattern="block_sparse", budgets={"top_k": 16})  # recorded recall dropped
    assert out.head(0, 1).budgets == {"sink": 64, "window": 512}  # a local structure: not length-proportional
    assert out.head(0, 2) == HP(pattern="dense")  # no recorded recall left to average
    assert out.head(1, 0).budgets == {"vertical": 200, "slash": 512}  # the default's too
    assert out.searched_tokens == 32000 and out.calibration["budgets_scaled_by"] == 2


def _answers(texts, cut=()):
    """Outputs of one sweep: one token per answer (its character code), a clear top-1; answers ``cut`` (indices)
    stopped at their token budget."""
    return {"prompt_tokens": [9000] * len(texts), "token_ids": [[ord(t)] for t in texts],
            "top2": [[[[ord(t), -0.1], [1000, -5.0]]] for t in texts], "texts": texts,
            "cut": [i in cut for i in range(len(texts))]}


def test_variants_result_pairs_every_variant_with_one_dense_run():
    from types import SimpleNamespace

    items = [{"case": i, "task": "passkey", "turn": i % 2, "context_tokens": 8000, "answer": str(i),
              "scorer": "substring"} for i in range(4)]
    args = SimpleNamespace(tasks="passkey", contexts="8000", turns=2, min_prompt_tokens=8192, cost_table="none",
                           max_batched_tokens=8192, near_tie=0.5, max_tokens=None)
    stats = {"sparse_tokens": 100, "dense_prefill_tokens": 0, "computed_pairs": 30, "causal_pairs": 100}
    done = {"dense": {**_answers(["0", "1", "2", "x"], cut=(3,)), "seconds": 1.0, "stats": {}},
            "a": {**_answers(["0", "1", "2", "x"], cut=(2, 3)), "seconds": 2.0, "stats": stats},
            "b": {**_answers(["0", "y", "2", "3"]), "seconds": 2.0, "stats": dict(stats, sparse_tokens=0)}}
    sweeps = [{"label": lb, "pattern_config": f"{lb}.json", "keys": {}, "config": {}} for lb in ("a", "b", "c")]
    summary, runs = acc.variants_result(args, "m", items, done, sweeps)
    assert summary["n"] == 4 and summary["dense"]["accuracy"] == 0.75
    assert summary["max_tokens"] == {"passkey": 16}  # the task's own budget
    assert summary["dense"]["cut_at_max_tokens"] == 1 and summary["variants"]["a"]["cut_at_max_tokens"] == 2
    assert summary["variants"]["b"]["cut_at_max_tokens"] == 0
    a, b = summary["variants"]["a"], summary["variants"]["b"]
    assert a["overall"]["sparse_minus_dense"]["mean"] == 0.0 and a["overall"]["kept_where_dense_right"] == 1.0
    assert a["density"] == 0.3 and "warning" not in a
    # b: loses question 1 (dense right), gains question 3 (dense wrong): same accuracy, 2 of 3 kept
    assert b["overall"]["sparse_accuracy"] == 0.75 and b["overall"]["kept_where_dense_right"] == 2 / 3
    assert "warning" in b  # its sparse path never ran: said in the result
    assert "c" not in summary["variants"]  # not run yet (a partial file)
    assert summary["overall"] == a["overall"] and summary["pattern_config"] == "a.json"  # the first at the top
    assert [r["variant"] for r in runs] == ["a", "b"] and runs[1]["cases"][1]["sparse"] == "y"


def test_stats_delta_counts_one_sweep():
    before = {"sparse_tokens": 10, "computed_pairs": 5, "chunks": {"sparse/threshold": 2}}
    after = {"sparse_tokens": 25, "computed_pairs": 9, "chunks": {"sparse/threshold": 2, "dense/below_floor": 3}}
    assert acc.stats_delta(before, after) == {"sparse_tokens": 15, "computed_pairs": 4,
                                              "chunks": {"dense/below_floor": 3}}


@pytest.mark.parametrize("argv,table", [([], "none"), (["--cost-table", "auto"], "auto")])
def test_cost_table_reaches_the_engine(monkeypatch, argv, table):
    """--cost-table sets sparse_prefill.cost_table of the engine: none by default (every chunk from
    --min-prompt-tokens on sparse: the sparse path's accuracy), auto to let the cost model decide as serving does."""
    from benchmarks import harness

    seen = {}
    monkeypatch.setattr(harness, "run_worker", lambda module, label, argv, env: seen.update(env) or {})
    args = acc._parse(["--tokens", "1000", *argv])
    args.argv = []
    acc.run_engine(args, True, "cfg.json")
    assert seen["KVPLUG_SPARSE_PREFILL__COST_TABLE"] == table
    assert seen["KVPLUG_SPARSE_PREFILL__MIN_PROMPT_TOKENS"] == "8192"


class _ChatLLM:
    """vllm.LLM of the --tasks worker without an engine: answers each question with ``max_tokens`` characters of a
    UUID, one token each, cut (finish_reason "length") where that is short of the whole UUID; records every
    question's max_tokens."""

    UUID = "095d6969-63a6-46cb-a001-c74dda2991e4"

    def __init__(self, **_kw) -> None:
        self.max_tokens: list[list[int]] = []

    def collective_rpc(self, fn, kwargs=None):
        return [{}]

    def reset_prefix_cache(self) -> bool:
        return True

    def chat(self, messages, sps, use_tqdm=False):
        from types import SimpleNamespace

        assert len(sps) == len(messages)  # one SamplingParams per question
        self.max_tokens.append([sp.max_tokens for sp in sps])
        assert {sp.logprobs for sp in sps} == {2} and {sp.temperature for sp in sps} == {0.0}
        outs = []
        for sp in sps:
            text = self.UUID[:sp.max_tokens]
            outs.append(SimpleNamespace(prompt_token_ids=[0] * 100, outputs=[SimpleNamespace(
                text=text, token_ids=[ord(c) for c in text],
                logprobs=[{ord(c): SimpleNamespace(logprob=-0.1), 1000: SimpleNamespace(logprob=-5.0)} for c in text],
                finish_reason="length" if len(text) < len(self.UUID) else "stop")]))
        return outs


@pytest.mark.parametrize("argv,budgets,cut", [([], {"kv": 96, "passkey": 16}, 1),
                                              (["--max-tokens", "24"], {"kv": 24, "passkey": 24}, 2)])
def test_each_question_gets_its_tasks_answer_budget_and_cut_answers_are_counted(monkeypatch, tmp_path, capsys,
                                                                                  argv, budgets, cut):
    """--tasks worker: a kv question (a 36-character UUID answer) gets the kv task's 96 new tokens, a passkey
    question its 16, unless --max-tokens says otherwise; answers stopped at their budget are counted in each
    sweep's summary (dense and every variant), with a warning line per sweep."""
    import json

    import vllm

    from benchmarks import harness

    llm = _ChatLLM()
    monkeypatch.setattr(vllm, "LLM", lambda **kw: llm)
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 32768}')
    monkeypatch.setattr(harness, "prepare_model", lambda name: tmp_path)
    monkeypatch.setattr(harness, "kvplug_attention_kwargs", lambda: {})
    items = [{"case": f"{task}-0-0", "task": task, "context_tokens": 8000, "turn": 0, "messages": [],
              "answer": _ChatLLM.UUID, "scorer": "substring"} for task in ("kv", "passkey")]
    monkeypatch.setattr(acc, "question_items", lambda path, args: items)
    sweeps = tmp_path / "sweeps.json"
    sweeps.write_text(json.dumps([{"label": "sparse", "pattern_config": "p.json", "keys": {}, "config": {}}]))
    out = tmp_path / "r.json"
    args = acc._parse(["--tasks", "kv,passkey", "--contexts", "8000", "--turns", "1", "--worker", "--sweeps",
                       str(sweeps), "--out", str(out), *argv])
    acc._worker(args)
    assert llm.max_tokens == [[budgets["kv"], budgets["passkey"]]] * 2  # dense, then the variant
    summary = json.loads(out.read_text())["summary"]
    assert summary["max_tokens"] == budgets
    assert summary["dense"]["cut_at_max_tokens"] == cut and summary["variants"]["sparse"]["cut_at_max_tokens"] == cut
    assert summary["dense"]["accuracy"] == (2 - cut) / 2
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("WARNING")]
    assert len(warnings) == 2 and f"{cut} of 2 answers stopped at their max tokens" in warnings[0]


def test_variants_that_bring_their_configs_need_no_shipped_one(monkeypatch, tmp_path):
    """A new model's first run (no shipped config): `--variants x:search_tokens=...` must start (on the H100,
    2026-12-07, it stopped at once asking for --pattern-config); a variant without its own config still asks."""
    model = tmp_path / "new-model"
    model.mkdir()
    monkeypatch.setattr(acc.harness, "prepare_model", lambda m: model)
    got = {}
    monkeypatch.setattr(acc, "run_tasks", lambda args, path, pattern_config: got.setdefault("config", pattern_config))
    base = ["--model", str(model), "--tasks", "kv", "--out", str(tmp_path / "o.json")]
    acc.run(acc._parse(base + ["--variants", "s:search_tokens=4000;c:config=/x.json,budgets=2"]))
    assert got["config"] is None
    with pytest.raises(SystemExit, match="--pattern-config"):
        acc.run(acc._parse(base + ["--variants", "s:search_tokens=4000;plain:budgets=2"]))


def test_without_a_shipped_config_the_engine_starts_on_the_first_variants(monkeypatch, tmp_path):
    sweeps = [{"label": "s", "pattern_config": "/searched.json", "keys": {}, "config": {}}]
    monkeypatch.setattr(acc, "prepare_variants", lambda args, path, pattern_config, variants: sweeps)
    seen = {}

    def worker(module, mode, argv, env):
        seen["env"] = env
        raise RuntimeError("stop here")

    monkeypatch.setattr(acc.harness, "run_worker", worker)
    argv = ["--model", "m", "--tasks", "kv", "--recall-tokens", "0", "--variants", "s:search_tokens=4000",
            "--out", str(tmp_path / "o.json")]
    args = acc._parse(argv)
    args.argv = argv  # as main() sets it
    with pytest.raises(RuntimeError, match="stop here"):
        acc.run_tasks(args, tmp_path, None)
    assert "/searched.json" in " ".join(seen["env"].values())
