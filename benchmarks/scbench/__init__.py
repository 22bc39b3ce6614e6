"""SCBench-style shared-context benchmark and load tester for OpenAI-compatible endpoints."""
