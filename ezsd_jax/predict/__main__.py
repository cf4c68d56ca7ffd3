"""`python -m ezsd_jax.predict`: open-vocabulary detection on image files (predict/cli.py)."""
import sys

from ezsd_jax.predict import cli as predict_cli

__doc__ = predict_cli.__doc__   # absl's --help prints the __main__ module's docstring
sys.exit(predict_cli.run())
