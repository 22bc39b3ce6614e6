"""kvplug: a vLLM plugin that manages the KV cache of long shared contexts."""
__version__ = "0.1.0"
