"""core/quiet_logs: a normal run prints no library notice that does not concern the user
(orbax's 'Metadata file does not exist' when a run resumes from its checkpoint,
transformers' Flax deprecation notice; libtpu's
environment hints on a machine without accelerator), while real warnings still print."""
import logging
import os
import subprocess
import sys
import types

from absl import logging as absl_logging

from ezsd_jax.core import quiet_logs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_resumed_run_prints_no_orbax_notice(tmp_path, optimized_env):
    """`ezsd --config=configs/toy.py` twice: the second run restores the checkpoint
    (where orbax logs its metadata notice) and prints nothing on stderr."""
    cmd = [sys.executable, "-m", "ezsd_jax.main", "--config=configs/toy.py",
           f"--workdir={tmp_path}", "--config.toy.ckpt_every=2", "--config.toy.log_every=2"]
    for steps in (2, 4):
        p = subprocess.run(cmd + [f"--config.toy.steps={steps}"], cwd=ROOT,
                           env=optimized_env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-2000:]
    assert "resumed from checkpoint at step 2" in p.stdout
    assert p.stderr == "", p.stderr


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.msgs = []

    def emit(self, record):
        self.msgs.append(record.getMessage())


def test_benign_notices_dropped_real_warnings_kept():
    quiet_logs.setup()
    quiet_logs.setup()                                   # idempotent: one filter
    for name, _ in quiet_logs.BENIGN:
        assert sum(isinstance(f, quiet_logs._DropBenign)
                   for f in logging.getLogger(name).filters) == 1
    flax_log = logging.getLogger("transformers.modeling_flax_utils")
    loggers = [logging.getLogger("absl"), logging.getLogger("jax"), flax_log]
    sink = _Collect()         # on the loggers themselves (transformers does not propagate)
    for lg in loggers:
        lg.addHandler(sink)
    try:
        absl_logging.warning("Metadata file does not exist: %s", "/x/_CHECKPOINT_METADATA")
        absl_logging.warning("Failed to read Metadata file: %s", "/x")
        absl_logging.error("checkpoint step 3 is corrupt")
        logging.getLogger("jax").warning("Metadata file does not exist: other library")
        flax_log.warning("TensorFlow and JAX classes are deprecated and will be removed")
        flax_log.warning("Some weights of the model checkpoint were not used")
    finally:
        for lg in loggers:
            lg.removeHandler(sink)
    assert sink.msgs == ["Failed to read Metadata file: /x", "checkpoint step 3 is corrupt",
                         "Metadata file does not exist: other library",
                         "Some weights of the model checkpoint were not used"]


def test_cpu_only_platform_with_libtpu_but_no_accelerator(monkeypatch):
    calls = []
    fake_jax = types.SimpleNamespace(config=types.SimpleNamespace(
        update=lambda k, v: calls.append((k, v))))
    monkeypatch.setitem(sys.modules, "jax", fake_jax)
    monkeypatch.setattr(quiet_logs, "has_accelerator", lambda: False)
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    monkeypatch.setattr(quiet_logs, "libtpu_installed", lambda: False)
    quiet_logs.setup()                           # no libtpu: no hints to silence
    assert "JAX_PLATFORMS" not in os.environ and calls == []
    monkeypatch.setattr(quiet_logs, "libtpu_installed", lambda: True)
    quiet_logs.setup()
    assert os.environ["JAX_PLATFORMS"] == "cpu" and calls == [("jax_platforms", "cpu")]
    # a user's choice and a machine with an accelerator are left alone
    monkeypatch.setenv("JAX_PLATFORMS", "tpu")
    quiet_logs.setup()
    assert os.environ["JAX_PLATFORMS"] == "tpu" and len(calls) == 1
    monkeypatch.delenv("JAX_PLATFORMS")
    monkeypatch.setattr(quiet_logs, "has_accelerator", lambda: True)
    quiet_logs.setup()
    assert "JAX_PLATFORMS" not in os.environ and len(calls) == 1
