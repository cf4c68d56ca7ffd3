"""Library log noise that does not concern the user, silenced in ONE place (cli.run calls
`setup()` before an entry point's work): orbax's notices that a checkpoint has no metadata
file (it reads the step fine without it) and that a reader opened it read-only (on purpose), transformers' deprecation notice of the Flax
classes (pinned on purpose), tfds' OpenCV hint, and the environment hints of an installed
libtpu on a machine with no accelerator (there JAX is pointed at the CPU it would end up
on anyway). Everything else, warnings and errors of the same libraries included, prints.
"""
from __future__ import annotations

import glob
import logging
import os
import sys

# (logger name, message prefix) of records that are dropped: orbax (through absl) on a
# checkpoint without its optional metadata file; transformers on its Flax classes, which
# the project uses at the pinned 4.57.6 on purpose (the notice recommends that pin)
_FLAX_NOTICE = "TensorFlow and JAX classes are deprecated"
BENIGN = (("absl", "Metadata file does not exist"),
          ("absl", "Given directory is read only"),      # readers open checkpoints read-only
          ("absl", "OpenCV is not installed"),          # tfds decodes masks with PIL
          ("transformers.modeling_flax_utils", _FLAX_NOTICE),
          ("transformers.feature_extraction_utils", _FLAX_NOTICE))

_GOOGLE_PCI_VENDOR = "0x1ae0"          # TPU chips (jax._src.hardware_utils)


class _DropBenign(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        return not any(record.name == name and msg.startswith(prefix)
                       for name, prefix in BENIGN)


_FILTER = _DropBenign()


def has_accelerator() -> bool:
    """A TPU chip (Google PCI device, /dev/accel*, /dev/vfio), an NVIDIA or an AMD GPU."""
    if glob.glob("/dev/accel*") or glob.glob("/dev/nvidia*") or os.path.exists("/dev/kfd"):
        return True
    if glob.glob("/dev/vfio/[0-9]*"):
        return True
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def libtpu_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("libtpu") is not None


def _cpu_only_jax() -> None:
    """libtpu installed, no accelerator and no JAX_PLATFORMS: JAX would try libtpu (which
    prints its environment hints to stderr, then fails) and fall back to the CPU; go
    there directly."""
    if os.environ.get("JAX_PLATFORMS") or not libtpu_installed() or has_accelerator():
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:          # imported already: its config read the variable
        sys.modules["jax"].config.update("jax_platforms", "cpu")


def install_filters() -> None:
    """Drops the BENIGN records (idempotent; also for Python API users: checkpoint.py)."""
    for name in dict.fromkeys(name for name, _ in BENIGN):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def setup() -> None:
    """Idempotent; called by cli.run."""
    install_filters()
    _cpu_only_jax()


__all__ = ["setup", "install_filters", "has_accelerator", "BENIGN"]
