"""Several models in one server: their specs (spec.py), keep_alive durations (keep_alive.py), what fits in memory
(admission.py), one model's lifecycle (slot.py) and the router that owns every slot (fleet.py)."""
