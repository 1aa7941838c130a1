"""Who may call: named API keys (hashed on disk), JWT bearer tokens, scopes and per-principal rate limits."""
