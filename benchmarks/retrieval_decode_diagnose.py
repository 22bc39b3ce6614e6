"""Diagnose retrieval-decode accuracy: per layer, on live engine data, is the kernel right and is the selection good?

Runs the engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so it can wrap each retrieval layer's forward and
compare, for every decode step of every retrieval layer (slow: dense attention recomputed in torch):
  kernel_vs_ref  max |engine output - torch reference over the same selected blocks| (plumbing)
  rel_err        ||sparse attention - dense attention|| / ||dense|| (approximation)
  quest_mass     dense softmax mass inside the blocks Quest selected (mean over heads)
  oracle_mass    the same for the best possible selection of the same size (top blocks by true mass)
and prints, per budget, the answers and the first token where each diverges from dense.

    TASKS=passkey CASES=1 BUDGETS=0.4,0.1 OUT=x.json python benchmarks/retrieval_decode_diagnose.py
    INSTR=0 NUMERICS=1 TASKS=kv,passkey CASES=3 BUDGETS=0.1,0.4,0.9 python benchmarks/retrieval_decode_diagnose.py

INSTR=0 skips the per-layer checks (fast); NUMERICS=1 adds a sweep with exact attention through the per-head
kernel path (summation order only). SmolLM2 on CPU by default (MODEL=path for another prepared model).
The retrieval settings are benchmarks/retrieval_decode_accuracy.py's defaults (sink 1 block, recent 64 tokens,
min context 1024, first 2 layers dense), 2 questions per case, seed 0; new tokens per answer: each task's own
budget (kv 96, passkey 16, ...: benchmarks/scbench/tasks), or MAX_TOKENS=N for every answer.
"""
import os, sys, json, time, collections
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch

from benchmarks import harness


def main():
    env = os.environ.get
    budgets = env("BUDGETS", "0.1,0.2,0.5,0.98")
    os.environ.update(harness.kvplug_env(
        "retrieval_decode", enabled=True, budget_fraction=max(float(b) for b in budgets.split(",")), sink_blocks=1,
        recent_tokens=64, min_context_tokens=1024, dense_layers=2), VLLM_ALLOW_INSECURE_SERIALIZATION="1")
    os.environ.pop("KVPLUG_CONFIG_JSON", None)
    from vllm import LLM, SamplingParams
    from attention_backends.retrieval_decode import backend_hooks, runner, reference, selection
    from kvplug import vllm_compat
    # --- instrumentation: per layer, kernel vs reference, selected-vs-dense error, attention mass captured
    LOG = collections.defaultdict(list)
    orig = runner.RetrievalDecodeRunner.forward
    def fwd(self, rest_forward, layer, query, key, value, kv_cache, plan, output, dense_forward=None):
        out = orig(self, rest_forward, layer, query, key, value, kv_cache, plan, output, dense_forward)
        li = self._layer_index(layer)
        p = plan.params
        if p.dense_layers and li < p.dense_layers:
            return out
        q = query[plan.rows].float()
        kc, vc = vllm_compat.paged_kv_views(kv_cache, layer)
        kmin, kmax = self.summaries.kmin, self.summaries.kmax
        sel = selection.select_for_queries(q, kmin, kmax, plan.block_table, plan.num_blocks, plan.budget_blocks,
                                           plan.k, p.sink_blocks, p.recent_blocks, p.gqa_reduce)
        kf, vf = kc.float(), vc.float()
        ref = reference.selected_block_attention(q, kf, vf, plan.block_table, plan.seq_lens, sel, self.impl.scale)
        dense = reference.dense_decode_attention(q, kf, vf, plan.block_table, plan.seq_lens, self.impl.scale)
        got = out[plan.rows].float()
        # attention mass per block (dense softmax), per kv head max over group
        N, Hq, D = q.shape; Hkv = kmin.shape[1]; G = Hq // Hkv; bs = kc.shape[2]
        B = int(plan.num_blocks.max())
        bt = plan.block_table[:, :B].long()
        keys = kc.float()[bt]  # [N,B,Hkv,bs,D]
        keys = keys.permute(0, 2, 1, 3, 4).reshape(N, Hkv, B * bs, D)
        logits = torch.einsum("nhgd,nhtd->nhgt", q.view(N, Hkv, G, D), keys) * self.impl.scale
        pos = torch.arange(B * bs)
        logits = logits.masked_fill(pos.view(1, 1, 1, -1) >= plan.seq_lens.view(N, 1, 1, 1), float("-inf"))
        probs = torch.softmax(logits, -1).view(N, Hkv, G, B, bs).sum(-1)  # block mass [N,Hkv,G,B]
        chosen = torch.zeros(N, Hkv, B, dtype=torch.bool)
        for n in range(N):
            for h in range(Hkv):
                chosen[n, h, sel.blocks[n, h][sel.valid[n, h]]] = True
        quest_mass = (probs * chosen.unsqueeze(2)).sum(-1)  # [N,Hkv,G]
        # oracle: best budget blocks by group-summed mass
        gm = probs.sum(2)
        bud = plan.budget_blocks.view(N, 1, 1)
        rank = torch.argsort(torch.argsort(gm, -1, descending=True), -1)
        oracle = (probs * (rank < bud).unsqueeze(2)).sum(-1)
        LOG[li].append(dict(kernel_vs_ref=float((got - ref).abs().max()),
                            rel_err=float((ref - dense).norm() / dense.norm()),
                            quest_mass=float(quest_mass.mean()), oracle_mass=float(oracle.mean()),
                            budget=float(plan.budget_blocks.float().mean()), nb=float(plan.num_blocks.float().mean())))
        return out
    if os.environ.get("INSTR", "1") == "1":
        runner.RetrievalDecodeRunner.forward = fwd

    model_path = harness.prepare_model(env("MODEL"))
    tasks = env("TASKS", "passkey,multihop")
    items = harness.question_items(model_path, tasks, env("CTX", "4096"), int(env("CASES", "3")), 2, 0)
    new_tokens = harness.answer_budgets(tasks, int(env("MAX_TOKENS")) if env("MAX_TOKENS") else None)
    llm = LLM(model=str(model_path), max_model_len=8192, block_size=32, enable_prefix_caching=True, seed=0,
              max_num_batched_tokens=2048, kv_cache_memory_bytes=2 << 30, enforce_eager=True,
              max_num_seqs=int(os.environ.get("MAXSEQS", "256")))
    sp = [SamplingParams(temperature=0.0, max_tokens=new_tokens[it["task"]]) for it in items]
    from benchmarks.scbench.scoring import score
    tok = llm.get_tokenizer()
    res = {}
    dense_ids = None
    sweeps = [("dense", {"dense": True})] + [(b, {"budget_fraction": float(b)}) for b in budgets.split(",")]
    if os.environ.get("NUMERICS"):  # exact attention through the per-head kernel path (all layers "dense layers")
        sweeps.insert(1, ("dense-per-head", {"budget_fraction": 0.1, "dense_layers": 1000}))
    for name, ov in sweeps:
        backend_hooks.set_override(**ov)
        LOG.clear()
        t0 = time.time()
        outs = llm.chat([it["messages"] for it in items], sp, use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        if dense_ids is None:
            dense_ids = ids
        def first_div(a, b):
            for i, (x, y) in enumerate(zip(a, b)):
                if x != y:
                    return i
            return None if len(a) == len(b) else min(len(a), len(b))
        div = [first_div(a, b) for a, b in zip(ids, dense_ids)]
        sc = [score(it["scorer"], o.outputs[0].text, it["answer"]) for it, o in zip(items, outs)]
        cut = harness.count_cut(f"retrieval_decode_diagnose {name}", harness.cut_at_budget(outs),
                                [it["scorer"] for it in items])
        layers = {li: {k: round(sum(d[k] for d in v) / len(v), 4) for k in v[0]} for li, v in sorted(LOG.items())}
        agg = {k: round(sum(l[k] for l in layers.values()) / max(1, len(layers)), 4) for k in
               (next(iter(layers.values())).keys() if layers else [])}
        print(f"== {name}: acc {sum(sc)/len(sc):.3f} agree {sum(d is None for d in div)/len(div):.3f} first_div {div} "
              f"({time.time()-t0:.0f}s) mean over layers {agg}", flush=True)
        for it, o, s in zip(items, outs, sc):
            print("   ", it["task"], s, repr(o.outputs[0].text[:50]), "| gold", repr(str(it["answer"])[:30]))
        if layers:
            print("   per layer:", json.dumps(layers))
        res[name] = dict(acc=sum(sc)/len(sc), div=div, layers=layers, cut_at_max_tokens=cut)
    json.dump(res, open(os.environ.get("OUT", "/tmp/retrieval_decode_diagnose.json"), "w"), indent=1)

if __name__ == "__main__":
    main()
