"""Entry point of the EZSD package: `python -m ezsd_jax.main --config=configs/coco.py --workdir=DIR`
(installed: `ezsd --config=... --workdir=DIR`; the built-in configs lie in the installed
`configs` package: `python -c "import configs; print(configs.__path__[0])"`).

Runs the stages listed in `config.stages` (or --stages=a,b) in order; each stage reads what
the previous ones wrote into the workdir and skips/resumes work already done, so the same
command can be re-run after a crash. Stages are looked up in ezsd_jax/stages.py; an unknown name is a
clear error listing the known ones.
"""
from __future__ import annotations

import logging
import time

from absl import flags

from ezsd_jax.core import cli
from ezsd_jax.stages import resolve_stage

flags.DEFINE_list("stages", None, "Comma-separated stages to run (default: config.stages).")
cli.define_flags()


def _lock_key(cfg, process_index: int) -> str:
    """Runs that share a workdir by design lock apart: the processes of one multi-host job
    and the `clip.proposal_shard=i/n` jobs; any other second run is refused."""
    parts = [f"process{process_index}"] if process_index else []
    shard = cfg.clip.get("proposal_shard", "") if "clip" in cfg else ""
    if shard:
        parts.append("proposal_shard" + str(shard).replace("/", "of"))
    return ".".join(parts)


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cfg = cli.get_config()
    stages = flags.FLAGS.stages or list(cfg.stages)
    if not stages:
        raise cli.UsageError("no stages: set config.stages or pass --stages")
    fns = [(s, resolve_stage(s)) for s in stages]  # validate all names before any work
    workdir = cli.prepare_workdir(flags.FLAGS.workdir, lock=False)
    from ezsd_jax.core import sharding
    d = cfg.distributed
    sharding.maybe_initialize_distributed(
        d.enabled or None, coordinator_address=d.coordinator_address,
        num_processes=d.num_processes, process_id=d.process_id)
    import jax
    cli.lock_workdir(workdir, _lock_key(cfg, jax.process_index()))
    if "synth" in cfg:  # data generated into the workdir: later stages read it from there
        from ezsd_jax.data.synthetic_stage import point_data_config
        point_data_config(cfg, workdir)
    if jax.process_index() == 0:
        cli.save_config(cfg, workdir)
    for name, fn in fns:
        t0 = time.perf_counter()
        print(f"=== stage {name} ===", flush=True)
        try:
            fn(cfg, workdir)
        except cli.MissingInput as e:
            raise cli.UsageError(f"stage {name}: {e}") from None
        logging.info("stage %s done in %.1f s", name, time.perf_counter() - t0)
        print(f"=== stage {name} done in {time.perf_counter() - t0:.1f} s ===", flush=True)


def run():
    """The `ezsd` console script."""
    cli.run(main, doc=__doc__)


if __name__ == "__main__":
    run()
