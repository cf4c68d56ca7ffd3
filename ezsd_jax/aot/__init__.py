"""Deviceless ahead-of-time check: compile every jitted hot step of a config for a TPU slice
that is not there and report its per-chip memory, cost and collectives (docs/aot.md)."""
