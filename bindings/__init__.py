"""The llama.cpp bindings package: the only code that imports `llama_cpp` or calls into libllama/libggml.

It depends on nothing else in this project (server/, convert/ and offload/ may all use it), so the
boundary that keeps llama.cpp out of the pure Python parts is one import rule, checked by import-linter
(see pyproject.toml). `protocol.py` is the engine-facing contract and imports only the standard library.
"""
