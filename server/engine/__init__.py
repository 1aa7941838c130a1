"""The engine: requests, the pure-Python scheduler, and the backends that run the model."""
