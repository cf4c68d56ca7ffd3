"""The shared runtime of both packages: CLI and config validation, mesh and shardings,
checkpoints, the training loop, metrics, atomic IO, optimizers, the workdir lock and the one
image decoder. It imports neither ezsd_jax's detector layers nor isal_jax.
"""
