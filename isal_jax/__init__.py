"""ISAL in JAX: influence selection for active learning (any model, any task).

Pipeline: influence engine (reference gradient, LiSSA s_test, JVP pool scores) ->
strategies (isal and baselines) -> active-learning loop / standalone selection step.
Infrastructure (mesh, checkpoints, metrics) comes from ezsd_jax; never the other way round.
"""
__version__ = "0.1.0"
