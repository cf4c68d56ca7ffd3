"""`python -m ezsd_jax.aot --config=configs/coco.py --topology=v5e:2x2 [--out=FILE]
[--find_max_batch] [--steps=REGEX] [--config.x=y]`: compiles every jitted hot step of the
config's stages for a TPU slice that is not there (libtpu's compile-only devices) and
reports per-chip memory, FLOPs, collectives, donation and a throughput estimate
(docs/aot.md). A step that does not fit in HBM: one line, exit status 2.
"""
from __future__ import annotations

import json
import re

from absl import flags

from ezsd_jax.aot.registry import step_specs
from ezsd_jax.core import cli

FLAGS = flags.FLAGS
if "config" not in FLAGS:
    cli.define_flags(workdir_required=False)
flags.DEFINE_string("topology", None, "TPU slice: v5e:2x2, v4:2x2x2, v5p:2x2x4, v5e-8, ...")
flags.DEFINE_string("out", "", "write the report (JSON, one entry per step) here")
flags.DEFINE_bool("find_max_batch", False, "also search the largest per-chip batch that "
                  "fits for every step (bisection: several compiles per step)")
flags.DEFINE_string("steps", "", "only the steps whose 'stage/step' matches this regex")
flags.DEFINE_integer("num_classes", None, "classes of a plain detector whose config has no "
                     "data.category_names (default 80; e.g. 20 for configs/isal_voc.py)")


def check(cfg, topology: str, *, find_max_batch: bool = False, steps: str = "",
          num_classes: int | None = None, log=print) -> tuple[list[dict], list[str]]:
    """Compiles the config's steps for `topology` -> (report entries, one-line problems
    of the steps that do not fit)."""
    from ezsd_jax.core.aot import program, topology as topo
    from ezsd_jax.core import sharding
    sl = topo.get_slice(topology)
    mesh = sharding.make_mesh(cfg.mesh, devices=sl.devices)
    specs = step_specs(cfg, mesh, num_classes)
    if steps:
        specs = [s for s in specs if re.search(steps, f"{s.stage}/{s.step}")]
    if not specs and steps:
        raise cli.UsageError(f"--steps={steps}: matches no step of config.stages="
                             f"{tuple(cfg.stages)}")
    entries, problems = [], []
    for spec in specs:
        log(f"[aot] {sl.name}: compiling {spec.stage}/{spec.step} at {spec.batch_per_chip} "
            "per chip ...")
        e = program.run_step(spec, mesh, sl.chip)
        e["topology"] = sl.name
        e["chips"], e["hosts"] = sl.num_chips, sl.num_hosts
        if find_max_batch or not e["fits"]:
            e["max_batch_per_chip"] = program.max_batch_per_chip(
                spec, mesh, sl.chip, known={spec.batch_per_chip: e})
        if not e["fits"]:
            need = (f"{e['total_bytes'] / 2 ** 30:.2f} GiB" if e["total_bytes"]
                    else "more HBM than it has")
            problems.append(
                f"{spec.stage}/{spec.step} does not fit on {sl.name}: needs {need} per chip "
                f"of {e['capacity_bytes'] / 2 ** 30:.2f} GiB at {spec.batch_per_chip} per "
                f"chip ({spec.batch_field}); largest per-chip batch that fits: "
                f"{e['max_batch_per_chip']}")
        entries.append(e)
    return entries, problems


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments: {argv[1:]}")
    if not FLAGS.topology:
        raise cli.UsageError("--topology is required (e.g. v5e:2x2, v4:2x2x2, v5e-8)")
    cfg = cli.get_config()
    from ezsd_jax.core.aot import report
    from ezsd_jax.core.aot.topology import TopologyError
    try:
        entries, problems = check(cfg, FLAGS.topology, find_max_batch=FLAGS.find_max_batch,
                                  steps=FLAGS.steps, num_classes=FLAGS.num_classes)
    except (TopologyError, ValueError) as e:
        raise cli.UsageError(cli.one_line(e)) from None
    cfg_name = FLAGS["config"].config_filename
    if not entries:
        print(f"[aot] {cfg_name}: its stages {tuple(cfg.get('stages', ()))} have no jitted "
              "hot step to compile; nothing to check", flush=True)
        return
    print(report.markdown(entries, f"AOT check of {cfg_name} on {entries[0]['topology']} "
                                   f"({entries[0]['chips']} chips, {entries[0]['hosts']} "
                                   f"hosts, mesh {entries[0]['mesh']}); estimates are "
                                   "roofline upper bounds"), flush=True)
    if FLAGS.out:
        from ezsd_jax.core.io_utils import atomic_write_json
        atomic_write_json(FLAGS.out, {"config": cfg_name, "topology": entries[0]["topology"],
                                      "config_values": json.loads(cfg.to_json_best_effort()),
                                      "steps": entries})
    if problems:
        raise cli.UsageError("; ".join(problems))


def run():
    cli.run(main)
