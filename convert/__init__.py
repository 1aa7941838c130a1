"""Getting a GGUF: the model registry, hub downloads, HF → GGUF conversion, quantization, test models."""
