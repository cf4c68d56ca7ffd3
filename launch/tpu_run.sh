#!/usr/bin/env bash
# Step 3 of a TPU run: start `python -m ezsd_jax.main` on ALL workers at once (one JAX
# process per host, jax.distributed discovers the slice itself), or stop / inspect it.
# Arguments after the script name go to ezsd_jax.main unchanged. Logs: tpu_logs.sh.
#
#   TPU_NAME=ezsd-v4 ZONE=us-central2-b PROJECT=my-project CONFIG=configs/coco.py \
#     WORKDIR=gs://my-bucket/runs/coco launch/tpu_run.sh --config.train.steps=90000
#   ACTION=stop TPU_NAME=... ZONE=... PROJECT=... launch/tpu_run.sh
#
# Required: TPU_NAME, ZONE, PROJECT; for ACTION=start also CONFIG (relative to the repo
#   root) and WORKDIR.
# WORKDIR must be the same shared directory for every worker on a multi-host slice
# (orbax writes each host's shards of a checkpoint there; process 0 writes the rest).
# gs://BUCKET/PATH is run as $GCS_MOUNT_ROOT/BUCKET/PATH, the gcsfuse mount made by
# `GCS_BUCKET=BUCKET launch/tpu_setup.sh`: the project's writers (metrics CSV, JSON/npz
# outputs, dataset files, workdir checks) use POSIX file calls, not gs:// URLs.
# Optional: ACTION=start|stop|status (default start); RUN_NAME (default run: the log
#   is ~/$REMOTE_DIR/logs/$RUN_NAME.log on each worker); STAGES (comma list);
#   DETACH=0 (stay attached and stream the output instead of nohup in the background);
#   REMOTE_DIR (default ezsd); GCS_MOUNT_ROOT (default /mnt/gcs); INTERNAL_IP=1;
#   DRY_RUN=1; ENV_FILE.
# Before anything starts, ACTION=start runs the deviceless AOT check of CONFIG (with the
#   --config.* arguments) for ACCELERATOR_TYPE (the slice's, e.g. v5litepod-16) and refuses
#   a config that does not fit (docs/aot.md); AOT_CHECK=0 skips it.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACTION="${ACTION:-start}"
require TPU_NAME "TPU VM node id" ZONE "e.g. us-central2-b" PROJECT "GCP project id"
tpu_defaults
LOG="logs/${RUN_NAME}.log"
PIDFILE="logs/${RUN_NAME}.pid"

case "$ACTION" in
  stop)
    body=$(
      cat <<'EOF'
cd "$REMOTE_DIR"
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  kill "$(cat "$PIDFILE")"
  for _ in $(seq 30); do kill -0 "$(cat "$PIDFILE")" 2>/dev/null || break; sleep 1; done
  if kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then kill -9 "$(cat "$PIDFILE")"; fi
  echo "$(hostname): stopped $RUN_NAME"
else
  echo "$(hostname): $RUN_NAME is not running"
fi
rm -f "$PIDFILE"
EOF
    )
    tpu_ssh all "$(remote_script "$body" "REMOTE_DIR=$REMOTE_DIR" "PIDFILE=$PIDFILE" "RUN_NAME=$RUN_NAME")"
    exit 0
    ;;
  status)
    body=$(
      cat <<'EOF'
cd "$REMOTE_DIR"
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "$(hostname): $RUN_NAME running (pid $(cat "$PIDFILE"))"
else
  echo "$(hostname): $RUN_NAME not running"
fi
tail -n 2 "$LOG" 2>/dev/null || true
EOF
    )
    tpu_ssh all "$(remote_script "$body" "REMOTE_DIR=$REMOTE_DIR" "PIDFILE=$PIDFILE" "RUN_NAME=$RUN_NAME" "LOG=$LOG")"
    exit 0
    ;;
  start) ;;
  *) die "ACTION=${ACTION}: use start, stop or status" ;;
esac

require CONFIG "config file, e.g. configs/coco.py" \
  WORKDIR "shared output dir, e.g. gs://my-bucket/runs/coco (gcsfuse-mounted)"
check_config "$CONFIG"
if is_true "${AOT_CHECK:-1}"; then
  require ACCELERATOR_TYPE "the slice's type, e.g. v5litepod-16, for the AOT fit check (AOT_CHECK=0 skips it)"
  aot_check "$CONFIG" "$ACCELERATOR_TYPE" "$@"
else
  note "AOT_CHECK=0: not checking that ${CONFIG} fits the slice"
fi
RUN_WORKDIR="$(gcs_to_mount "$WORKDIR")"
MOUNT=""
if [[ "$WORKDIR" == gs://* ]]; then
  bucket="${WORKDIR#gs://}"
  bucket="${bucket%%/*}"
  MOUNT="${GCS_MOUNT_ROOT%/}/${bucket}"
  note "WORKDIR ${WORKDIR} -> ${RUN_WORKDIR} (gcsfuse mount from tpu_setup.sh GCS_BUCKET=${bucket})"
elif [[ "$WORKDIR" != /* ]]; then
  note "warning: WORKDIR=${WORKDIR} is relative to ~/${REMOTE_DIR} on each worker's own disk:" \
    "fine on a single-host slice; a multi-host slice needs a shared directory (gs://...)"
fi

main_cmd .venv/bin/python "$CONFIG" "$RUN_WORKDIR" 1 "$@"
MAIN="$(join_quoted "${MAIN_CMD[@]}")"
# on every worker: enter the checkout, check the mount, (detached: refuse a second copy of
# the run), write the log header, then run the job detached or attached
prelude=$(
  cat <<'EOF'
cd "$REMOTE_DIR"
mkdir -p logs
if [ -n "$MOUNT" ] && ! mountpoint -q "$MOUNT"; then
  echo "$(hostname): $MOUNT is not mounted: run launch/tpu_setup.sh with GCS_BUCKET set" >&2
  exit 1
fi
EOF
)
header=$(
  cat <<'EOF'
export EZSD_DISTRIBUTED=1
echo "# $(date -u '+%F %T UTC') $(hostname) code $(cat SOURCE_REVISION 2>/dev/null || echo unknown)" > "$LOG"
EOF
)
if is_true "${DETACH:-1}"; then
  run=$(
    cat <<'EOF'
if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
  echo "$(hostname): $RUN_NAME already running (pid $(cat "$PIDFILE")); ACTION=stop first" >&2
  exit 1
fi
EOF
  )
  launch=$(
    cat <<'EOF'
nohup bash -c "exec $MAIN" >> "$LOG" 2>&1 < /dev/null &
echo $! > "$PIDFILE"
echo "$(hostname): started $RUN_NAME (pid $!), log ~/$REMOTE_DIR/$LOG"
EOF
  )
else
  run=""
  launch=$(
    cat <<'EOF'
bash -c "exec $MAIN" 2>&1 | tee -a "$LOG"
EOF
  )
fi
body="${prelude}
${run}
${header}
${launch}"
tpu_ssh all "$(remote_script "$body" "REMOTE_DIR=$REMOTE_DIR" "RUN_NAME=$RUN_NAME" "LOG=$LOG" "PIDFILE=$PIDFILE" "MOUNT=$MOUNT" "MAIN=$MAIN")"
if is_true "${DETACH:-1}"; then
  note "follow it with: TPU_NAME=${TPU_NAME} ZONE=${ZONE} PROJECT=${PROJECT} RUN_NAME=${RUN_NAME} launch/tpu_logs.sh"
fi
