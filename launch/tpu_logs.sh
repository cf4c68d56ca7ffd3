#!/usr/bin/env bash
# Shows the output of a run started by tpu_run.sh (its log file on the workers).
# Process 0 (worker 0) prints the progress lines and the eval metrics; the other
# workers' logs matter when one of them fails.
#
#   TPU_NAME=ezsd-v4 ZONE=us-central2-b PROJECT=my-project launch/tpu_logs.sh
#   WORKER=all FOLLOW=0 LINES=20 TPU_NAME=... ZONE=... PROJECT=... launch/tpu_logs.sh
#
# Required: TPU_NAME, ZONE, PROJECT.
# Optional: RUN_NAME (default run); WORKER (0, 1, ... or all; default 0); LINES (default
#   100); FOLLOW=0 (print and exit instead of following); REMOTE_DIR (default ezsd);
#   INTERNAL_IP=1; DRY_RUN=1; ENV_FILE.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require TPU_NAME "TPU VM node id" ZONE "e.g. us-central2-b" PROJECT "GCP project id"
tpu_defaults
WORKER="${WORKER:-0}"
LINES="${LINES:-100}"
[[ "$WORKER" == all || "$WORKER" =~ ^[0-9]+$ ]] || die "WORKER=${WORKER}: use a worker number or all"
[[ "$LINES" =~ ^[0-9]+$ ]] || die "LINES=${LINES}: not a number"
LOG="logs/${RUN_NAME}.log"
FOLLOW_FLAG=""
if is_true "${FOLLOW:-1}"; then
  FOLLOW_FLAG="-F"
fi
body=$(
  cat <<'EOF'
cd "$REMOTE_DIR"
[ -f "$LOG" ] || echo "$(hostname): no log ~/$REMOTE_DIR/$LOG yet (RUN_NAME=$RUN_NAME)" >&2
tail -n "$LINES" $FOLLOW_FLAG "$LOG"
EOF
)
tpu_ssh "$WORKER" "$(remote_script "$body" "REMOTE_DIR=$REMOTE_DIR" "RUN_NAME=$RUN_NAME" "LOG=$LOG" "LINES=$LINES" "FOLLOW_FLAG=$FOLLOW_FLAG")"
