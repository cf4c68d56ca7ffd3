"""The data layer's one error type (annotations, image files), below coco.py and images.py.

Every entry point reports a DataError as one line naming the file and exits with status 2
(ezsd_jax.core.cli.run); with data.on_error='skip' the loaders drop and count instead.
"""


class DataError(ValueError):
    """Bad input data: the message names the file and the record."""
