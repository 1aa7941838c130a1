"""Hardware planner: place a GGUF model's layers and MoE experts across GPUs and RAM for llama.cpp.

Data flows one way: `gguf_shape.read_model_shape` (header only) and `hardware.detect` (the one impure probe)
feed the pure `planner.plan`, whose `Plan` becomes llama.cpp parameters through `placement.placement_for`.
"""
