"""Does LMCache's in-process connector (VLLMPagedMemGPUConnectorV2, the path LMCacheConnectorV1 uses)
round-trip vLLM 0.26's fused per-layer KV layout [NB, BS, NH, 2*HS] (K|V packed per head, NHD)? LMCache #4463:
on 0.5.3 it stores only the K half with a wrong slot stride, so the lmcache-<version> peer modes reload wrong KV
(benchmarks/peers/lmcache.py's known_issue); lmcache-mp-<version> is not affected.

Run on one GPU with the staged LMCache first on PYTHONPATH (no vLLM or model needed; seconds):
  PYTHONPATH=/tmp/kvstage/lmcache-0.5.3:/tmp/kvstage/lmcache-deps python -m benchmarks.peers.check_lmcache_fused_kv
A correct connector prints True for the K plane, the V plane and the restored slots, False for "V plane never
written", about 0 for the values still 0 and 0 written outside the request's slots (LMCache #4463 on 0.5.3: the V
plane is never written and the load leaves values 0 / writes outside). A pure-torch gather is the reference.
"""
from __future__ import annotations

import types

NL, NB, BS, NH, HS, T = 4, 64, 16, 2, 64, 256  # Qwen2.5-0.5B-like heads; one 256-token chunk
CS = 2 * HS


def main() -> None:
    import torch

    import lmcache
    from lmcache.v1.gpu_connector.gpu_connectors import VLLMPagedMemGPUConnectorV2
    from lmcache.v1.memory_management import MemoryFormat

    dev = torch.device("cuda:0")
    print("lmcache", lmcache.__version__, "from", lmcache.__file__)

    # vLLM 0.26 (layer-compact NHD): per-layer contiguous [NB, BS, NH, CS], K = [..., :HS], V = [..., HS:]
    pool = torch.randn(NL, NB, BS, NH, CS, dtype=torch.bfloat16, device=dev)
    kv = [pool[layer] for layer in range(NL)]
    slots = torch.arange(T, device=dev, dtype=torch.long) + 5 * BS  # blocks 5..20

    def gather(p):  # [NL, T, NH, CS] for the request's slots
        s = slots.cpu()
        return p[:, s // BS, s % BS].cpu()

    ref = gather(pool)
    ref_k = ref[..., :HS].reshape(NL, T, NH * HS)
    ref_v = ref[..., HS:].reshape(NL, T, NH * HS)
    conn = VLLMPagedMemGPUConnectorV2(hidden_dim_size=NH * HS, num_layers=NL)

    def memobj(t):
        return types.SimpleNamespace(tensor=t, metadata=types.SimpleNamespace(fmt=MemoryFormat.KV_2LTD))

    # store (D2H direction) into a KV_2LTD [2, L, T, NH*HS] buffer, as LMCache's CPU backend uses
    buf = torch.zeros(2, NL, T, NH * HS, dtype=torch.bfloat16, device=dev)
    conn.from_gpu(memobj(buf), 0, T, kvcaches=kv, slot_mapping=slots)
    torch.cuda.synchronize()
    print("format:", conn.engine_kv_format, "head_size passed:", conn.head_size)
    print("STORE  K plane == engine K:", torch.equal(buf[0].cpu(), ref_k))
    print("STORE  V plane == engine V:", torch.equal(buf[1].cpu(), ref_v))
    print("STORE  V plane never written (all 0):", bool((buf[1] == 0).all()))

    # load (H2D) a *correct* KV_2LTD object into a zeroed pool
    pool.zero_()
    good = torch.stack([ref_k, ref_v]).to(dev).contiguous()
    conn.to_gpu(memobj(good), 0, T, kvcaches=kv, slot_mapping=slots)
    torch.cuda.synchronize()
    got = gather(pool)
    print("LOAD   request slots restored exactly:", torch.equal(got, ref))
    print("LOAD   fraction of request-slot values still 0:", (got == 0).float().mean().item())
    outside = pool.clone()
    s = slots.cpu()
    outside[:, s // BS, s % BS] = 0
    print("LOAD   nonzero values written OUTSIDE the request's slots:", int((outside != 0).sum()))


if __name__ == "__main__":
    main()
