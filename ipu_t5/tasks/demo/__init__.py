"""Each shipped task's generated offline data (the demo's), deterministic in its seed."""
