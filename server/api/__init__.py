"""The HTTP layer: OpenAI-compatible routes, admin routes, request schemas and the one error mapping."""
