"""qwen3-local: an OpenAI-compatible server over llama.cpp with slot-based continuous batching."""
