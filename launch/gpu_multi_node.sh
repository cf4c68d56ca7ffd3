#!/usr/bin/env bash
# Several GPU machines: ONE process per node, each driving all of its local GPUs, joined
# by jax.distributed (process 0's host is the coordinator). Arguments after the script
# name go to ezsd_jax.main unchanged. CONFIG, WORKDIR and the code must be at the same
# paths on every node, and WORKDIR on a filesystem they share (NFS, Lustre, gcsfuse...):
# a checkpoint is written by all processes together.
#
# Where the process layout comes from (first match):
#   1. explicit: COORDINATOR_ADDRESS=host:port NUM_PROCESSES=N PROCESS_ID=i
#   2. SLURM (inside `srun`, one task per node): SLURM_NTASKS, SLURM_PROCID, the first
#      host of SLURM_JOB_NODELIST (via scontrol) : COORDINATOR_PORT (default 12355)
#   3. torchrun-style env: MASTER_ADDR, MASTER_PORT, and NNODES + NODE_RANK (or
#      WORLD_SIZE + RANK)
#   4. launcher mode, HOSTS="node1 node2 ...": ssh to every host and start this script
#      there with PROCESS_ID=i (coordinator: the first host : COORDINATOR_PORT).
#
#   sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --wrap \
#     "srun env CONFIG=configs/coco.py WORKDIR=/shared/runs/coco launch/gpu_multi_node.sh"
#   HOSTS="gpu1 gpu2" CONFIG=configs/coco.py WORKDIR=/shared/runs/coco \
#     launch/gpu_multi_node.sh --config.train.batch_size=32
#
# Required: CONFIG (relative to the repo root), WORKDIR, and one of the layouts above.
# Optional: PYTHON (default the repo's .venv/bin/python, else python3); STAGES;
#   COORDINATOR_PORT (default 12355); REMOTE_DIR (launcher mode: repo path on the hosts,
#   default this repo's path); SSH (launcher mode: ssh command, default "ssh");
#   DRY_RUN=1; ENV_FILE.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require CONFIG "config file, e.g. configs/coco.py" WORKDIR "output dir on a shared filesystem"
check_config "$CONFIG"
COORDINATOR_PORT="${COORDINATOR_PORT:-12355}"
[[ "$COORDINATOR_PORT" =~ ^[0-9]+$ ]] || die "COORDINATOR_PORT=${COORDINATOR_PORT}: not a port number"

# ---- 4. launcher mode -------------------------------------------------------------------
if [[ -n "${HOSTS:-}" && -z "${PROCESS_ID:-}" ]]; then
  read -r -a hosts <<<"$HOSTS"
  n=${#hosts[@]}
  ((n >= 1)) || die "HOSTS is empty"
  REMOTE_DIR="${REMOTE_DIR:-$REPO_ROOT}"
  read -r -a ssh_cmd <<<"${SSH:-ssh}"
  coordinator="${hosts[0]}:${COORDINATOR_PORT}"
  pids=()
  for i in "${!hosts[@]}"; do
    env_words=("COORDINATOR_ADDRESS=${coordinator}" "NUM_PROCESSES=${n}" "PROCESS_ID=${i}"
      "CONFIG=${CONFIG}" "WORKDIR=${WORKDIR}")
    if [[ -n "${PYTHON:-}" ]]; then
      env_words+=("PYTHON=${PYTHON}")
    fi
    if [[ -n "${STAGES:-}" ]]; then
      env_words+=("STAGES=${STAGES}")
    fi
    remote="cd $(quote "$REMOTE_DIR") && $(join_quoted env "${env_words[@]}" launch/gpu_multi_node.sh "$@")"
    if dry_run; then
      run "${ssh_cmd[@]}" "${hosts[$i]}" "$remote"
    else
      echo "+ $(join_quoted "${ssh_cmd[@]}" "${hosts[$i]}" "$remote") &"
      ("${ssh_cmd[@]}" "${hosts[$i]}" "$remote" 2>&1 | sed -u "s/^/[${hosts[$i]}] /") &
      pids+=("$!")
    fi
  done
  status=0
  if ((${#pids[@]})); then
    for pid in "${pids[@]}"; do
      wait "$pid" || status=1
    done
  fi
  ((status == 0)) || die "a node failed (see its [host] lines above)"
  exit 0
fi

# ---- 1-3. this node's process --------------------------------------------------------------
source_of_layout=""
if [[ -n "${COORDINATOR_ADDRESS:-}${NUM_PROCESSES:-}${PROCESS_ID:-}" ]]; then
  require COORDINATOR_ADDRESS "host:port of process 0 (explicit layout)" \
    NUM_PROCESSES "number of nodes/processes" PROCESS_ID "this node's index, 0-based"
  source_of_layout="explicit"
elif [[ -n "${SLURM_JOB_NODELIST:-}" && -n "${SLURM_PROCID:-}" ]]; then
  require SLURM_NTASKS "set by srun"
  if [[ -n "${SLURM_NTASKS_PER_NODE:-}" && "${SLURM_NTASKS_PER_NODE}" != 1 ]]; then
    die "SLURM_NTASKS_PER_NODE=${SLURM_NTASKS_PER_NODE}: run one task per node (--ntasks-per-node=1); each process uses all local GPUs"
  fi
  command -v scontrol >/dev/null 2>&1 ||
    die "scontrol not found to resolve SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST}: set COORDINATOR_ADDRESS"
  # (no `| head -n 1`: with pipefail, scontrol's SIGPIPE would fail the script)
  all_hosts="$(scontrol show hostnames "$SLURM_JOB_NODELIST")"
  first_host="${all_hosts%%$'\n'*}"
  [[ -n "$first_host" ]] || die "scontrol listed no hosts for SLURM_JOB_NODELIST=${SLURM_JOB_NODELIST}"
  COORDINATOR_ADDRESS="${first_host}:${COORDINATOR_PORT}"
  NUM_PROCESSES="$SLURM_NTASKS"
  PROCESS_ID="$SLURM_PROCID"
  source_of_layout="SLURM"
elif [[ -n "${MASTER_ADDR:-}" ]]; then
  require MASTER_PORT "coordinator port (torchrun-style)"
  COORDINATOR_ADDRESS="${MASTER_ADDR}:${MASTER_PORT}"
  NUM_PROCESSES="${NNODES:-${WORLD_SIZE:-}}"
  PROCESS_ID="${NODE_RANK:-${RANK:-}}"
  [[ -n "$NUM_PROCESSES" && -n "$PROCESS_ID" ]] ||
    die "MASTER_ADDR is set but not NNODES+NODE_RANK (or WORLD_SIZE+RANK)"
  source_of_layout="torchrun-style env"
else
  die "no process layout: set COORDINATOR_ADDRESS, NUM_PROCESSES and PROCESS_ID, run under SLURM srun, set MASTER_ADDR/MASTER_PORT/NNODES/NODE_RANK, or give HOSTS=\"node1 node2 ...\""
fi
[[ "$NUM_PROCESSES" =~ ^[0-9]+$ && "$NUM_PROCESSES" -ge 1 ]] || die "NUM_PROCESSES=${NUM_PROCESSES}: not a positive number"
[[ "$PROCESS_ID" =~ ^[0-9]+$ && "$PROCESS_ID" -lt "$NUM_PROCESSES" ]] ||
  die "PROCESS_ID=${PROCESS_ID}: must be in [0, NUM_PROCESSES=${NUM_PROCESSES})"
[[ "$COORDINATOR_ADDRESS" == *:* ]] || die "COORDINATOR_ADDRESS=${COORDINATOR_ADDRESS}: use host:port"
note "process ${PROCESS_ID}/${NUM_PROCESSES}, coordinator ${COORDINATOR_ADDRESS} (${source_of_layout})"

PYTHON="${PYTHON:-$(default_python)}"
cd "$REPO_ROOT"
export EZSD_DISTRIBUTED=1
main_cmd "$PYTHON" "$CONFIG" "$WORKDIR" 1 \
  "--config.distributed.coordinator_address=${COORDINATOR_ADDRESS}" \
  "--config.distributed.num_processes=${NUM_PROCESSES}" \
  "--config.distributed.process_id=${PROCESS_ID}" "$@"
run "${MAIN_CMD[@]}"
