"""Library code for the offload benchmarks' peers (LMCache, vLLM's native offloading): not scripts."""
