"""Deviceless compilation for accelerator slices: compile-only devices of a topology
(topology.py), one jitted step compiled over them with its largest fitting batch
(program.py), and what the compiled program says about memory, FLOPs, collectives and
donation (report.py). The steps themselves come from the packages (ezsd_jax/aot, isal_jax)."""
