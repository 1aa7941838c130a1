"""models.yaml and the local hub cache: which models qwen3-local knows by name and where each one's GGUF is.

A package of its own so that server/, convert/ and offload/ can all read it without importing each other.
"""
