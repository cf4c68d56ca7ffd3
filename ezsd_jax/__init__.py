"""EZSD in JAX: zero-shot detection by distilling re-normalized CLIP region features.

Pipeline: data -> clip (re-normalization, proposals) -> models (detector) -> train ->
evaluate. Shared infrastructure (mesh/sharding, checkpoints, metrics, config) lives in this
package once and is imported by isal_jax too.
"""
__version__ = "0.1.0"
