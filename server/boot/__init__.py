"""Boot: from settings to running engines (download, probe, offload plan, backend)."""
