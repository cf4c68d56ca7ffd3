"""Inference side of EZSD: the Detector API (detector.py), exported bundles (bundle.py),
input/vocabulary buckets (buckets.py), output files (outputs.py), a trained run read back
(trained_run.py) and the `python -m ezsd_jax.predict` command (cli.py).
"""
