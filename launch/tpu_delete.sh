#!/usr/bin/env bash
# Last step: delete the queued resource and its TPU VMs (--force deletes the node with
# it). The workers' disks go with them; checkpoints and metrics in a gs:// workdir stay.
# To stop a run but keep the slice: ACTION=stop launch/tpu_run.sh.
#
#   TPU_NAME=ezsd-v4 ZONE=us-central2-b PROJECT=my-project YES=1 launch/tpu_delete.sh
#
# Required: TPU_NAME (or QR_NAME), ZONE, PROJECT.
# Optional: QR_NAME (default ${TPU_NAME}-qr); YES=1 (no confirmation prompt);
#   ASYNC=1 (return without waiting); DRY_RUN=1; ENV_FILE.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

if [[ -z "${QR_NAME:-}" ]]; then
  require TPU_NAME "TPU VM node id; the queued resource is \${TPU_NAME}-qr unless QR_NAME is set"
fi
require ZONE "e.g. us-central2-b" PROJECT "GCP project id"
tpu_defaults
gcloud_loc_flags
cmd=(gcloud compute tpus queued-resources delete "$QR_NAME" "${GCLOUD_LOC[@]}" --force)
if is_true "${YES:-0}"; then
  cmd+=(--quiet)
fi
if is_true "${ASYNC:-0}"; then
  cmd+=(--async)
fi
run "${cmd[@]}"
