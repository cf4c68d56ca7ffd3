"""python -m ezsd_jax.aot: see ezsd_jax/aot/cli.py."""
from ezsd_jax.aot.cli import run

run()
