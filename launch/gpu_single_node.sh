#!/usr/bin/env bash
# One machine, all its GPUs in ONE process: the mesh's 'data' axis spans the local GPUs
# (no jax.distributed). Arguments after the script name go to ezsd_jax.main unchanged.
#
#   CONFIG=configs/demo.py WORKDIR=workdir/demo_gpu launch/gpu_single_node.sh
#   GPUS=0,1 CONFIG=configs/coco.py WORKDIR=/data/runs/coco launch/gpu_single_node.sh \
#     --config.train.batch_size=16
#
# Required: CONFIG (relative to the repo root), WORKDIR.
# Optional: GPUS (comma list -> CUDA_VISIBLE_DEVICES; default all); PYTHON (default
#   .venv/bin/python of the repo, else python3; the venv needs "jax[cuda12]==0.10.2",
#   see launch/README.md); STAGES (comma list); LOG (also tee the output to this file);
#   DRY_RUN=1; ENV_FILE.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require CONFIG "config file, e.g. configs/demo.py" WORKDIR "output dir, e.g. workdir/demo_gpu"
check_config "$CONFIG"
PYTHON="${PYTHON:-$(default_python)}"
if [[ -n "${GPUS:-}" ]]; then
  [[ "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "GPUS=${GPUS}: use a comma list of GPU indices, e.g. 0,1"
  export CUDA_VISIBLE_DEVICES="$GPUS"
  note "CUDA_VISIBLE_DEVICES=${GPUS}"
fi
cd "$REPO_ROOT"
unset EZSD_DISTRIBUTED
main_cmd "$PYTHON" "$CONFIG" "$WORKDIR" 0 "$@"
if [[ -n "${LOG:-}" ]]; then
  echo "+ $(join_quoted "${MAIN_CMD[@]}") 2>&1 | tee -a $(quote "$LOG")"
  if ! dry_run; then
    mkdir -p "$(dirname "$LOG")"
    "${MAIN_CMD[@]}" 2>&1 | tee -a "$LOG"
  fi
else
  run "${MAIN_CMD[@]}"
fi
