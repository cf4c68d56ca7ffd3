"""EZSD in JAX: zero-shot detection by distilling re-normalized CLIP region features.

Pipeline: data -> clip (re-normalization, proposals) -> models (detector) -> train ->
evaluate. Shared infrastructure (mesh/sharding, checkpoints, metrics, config) lives in this
package once and is imported by isal_jax too.
"""
import logging

__version__ = "0.1.0"

# Progress of long jobs goes through `logging` (logger ezsd_jax.<module>); INFO here so it
# shows under absl (cli.run quiets library loggers to WARNING) and stays silent when the
# package is imported without a logging handler (Python's last-resort handler: WARNING+).
logging.getLogger("ezsd_jax").setLevel(logging.INFO)

def __getattr__(name):
    """`ezsd_jax.Detector` (detector_api.py), imported on first use so that
    `import ezsd_jax` stays light (no JAX)."""
    if name == "Detector":
        from ezsd_jax.predict.detector import Detector
        return Detector
    raise AttributeError(f"module 'ezsd_jax' has no attribute {name!r}")
