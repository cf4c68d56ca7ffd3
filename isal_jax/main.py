"""Entry point of the active-learning experiment (installed: the `isal` command):

    python -m isal_jax.main --config=configs/isal_digits.py --workdir=DIR
    python -m isal_jax.main --config=configs/isal_cifar10.py --workdir=DIR \
        --config.data.data_dir=/path/to/tfds

Place in the pipeline: config -> task adapter (config.task: 'classification' ->
isal_jax.classification_al, 'detection' -> isal_jax.detection_al; each module has
`build_task(cfg, workdir)`) -> isal_jax.loop.run_experiment -> workdir/al/results.csv,
curves.png, savings.csv/.json. Rerunning the same command resumes a killed experiment.
"""
from __future__ import annotations

import importlib

from absl import flags

from ezsd_jax.core import cli
from isal_jax import config_schema  # noqa: F401  (registers the ISAL config rules)

FLAGS = flags.FLAGS
if "config" not in FLAGS:      # isal_jax.select defines the same two flags
    cli.define_flags()

# config.task -> module with build_task(cfg, workdir) -> ActiveLearningTask (lazy imports).
TASKS = {"classification": "isal_jax.classification_al",
         "detection": "isal_jax.detection_al"}


def build_task(cfg, workdir: str):
    name = cfg.get("task", "classification")
    if name not in TASKS:
        raise cli.UsageError(f"config.task={name!r} is not one of {sorted(TASKS)}")
    return importlib.import_module(TASKS[name]).build_task(cfg, workdir)


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = cli.get_config()
    workdir = cli.prepare_workdir(FLAGS.workdir)
    from isal_jax.loop import run_experiment
    cli.save_config(cfg, workdir)
    task = build_task(cfg, workdir)
    path = run_experiment(task, cfg.al, workdir)  # errors: one line via cli.run
    print(path, flush=True)


def run():
    """The `isal` console script."""
    from isal_jax.loop import LoopError
    from isal_jax.select import SelectError
    cli.run(main, extra_user_errors=(LoopError, SelectError), doc=__doc__)


if __name__ == "__main__":
    run()
