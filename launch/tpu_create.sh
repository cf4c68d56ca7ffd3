#!/usr/bin/env bash
# Step 1 of a TPU run: request a TPU slice as a queued resource (the TPU VM "node"
# TPU_NAME inside the queued resource QR_NAME). Next: tpu_setup.sh.
#
#   TPU_NAME=ezsd-v4 ZONE=us-central2-b PROJECT=my-project ACCELERATOR_TYPE=v4-32 \
#     SPOT=1 WAIT=1 launch/tpu_create.sh
#
# Required: TPU_NAME, ZONE, PROJECT, ACCELERATOR_TYPE (v4-8, v4-32, v5litepod-16, v5p-8,
#   v6e-16, ...).
# Optional: QR_NAME (default ${TPU_NAME}-qr); RUNTIME_VERSION (default from the
#   accelerator: v4 -> tpu-ubuntu2204-base, v5litepod -> v2-alpha-tpuv5-lite, v5p ->
#   v2-alpha-tpuv5, v6e -> v2-alpha-tpuv6e); SPOT=1 (spot capacity: cheaper, preemptible)
#   or RESERVED=1 (your reservation); VALID_UNTIL_DURATION (e.g. 6h: give up waiting
#   after); SERVICE_ACCOUNT; NETWORK; SUBNETWORK; WAIT=1 (poll until ACTIVE, at most
#   WAIT_TIMEOUT_S, default 3600); DRY_RUN=1 (print the commands only); ENV_FILE;
#   CONFIG (a config file, with its --config.* overrides as arguments): before the request,
#   the deviceless AOT check compiles it for ACCELERATOR_TYPE and refuses a config that
#   does not fit (docs/aot.md; AOT_CHECK=0 skips it).
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require TPU_NAME "TPU VM node id, e.g. ezsd-v4" \
  ZONE "e.g. us-central2-b" \
  PROJECT "GCP project id" \
  ACCELERATOR_TYPE "e.g. v4-32, v5litepod-16"
tpu_defaults
gcloud_loc_flags

default_runtime() {
  case "$1" in
    v2-* | v3-* | v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) echo "" ;;
  esac
}

RUNTIME_VERSION="${RUNTIME_VERSION:-$(default_runtime "$ACCELERATOR_TYPE")}"
[[ -n "$RUNTIME_VERSION" ]] || die "no default RUNTIME_VERSION for ACCELERATOR_TYPE=${ACCELERATOR_TYPE}; set RUNTIME_VERSION (see https://cloud.google.com/tpu/docs/runtimes)"
if is_true "${SPOT:-0}" && is_true "${RESERVED:-0}"; then
  die "SPOT=1 and RESERVED=1 exclude each other"
fi

cmd=(gcloud compute tpus queued-resources create "$QR_NAME" "${GCLOUD_LOC[@]}"
  "--node-id=${TPU_NAME}" "--accelerator-type=${ACCELERATOR_TYPE}"
  "--runtime-version=${RUNTIME_VERSION}")
if is_true "${SPOT:-0}"; then
  cmd+=(--spot)
fi
if is_true "${RESERVED:-0}"; then
  cmd+=(--reserved)
fi
if [[ -n "${VALID_UNTIL_DURATION:-}" ]]; then
  cmd+=("--valid-until-duration=${VALID_UNTIL_DURATION}")
fi
if [[ -n "${SERVICE_ACCOUNT:-}" ]]; then
  cmd+=("--service-account=${SERVICE_ACCOUNT}")
fi
if [[ -n "${NETWORK:-}" ]]; then
  cmd+=("--network=${NETWORK}")
fi
if [[ -n "${SUBNETWORK:-}" ]]; then
  cmd+=("--subnetwork=${SUBNETWORK}")
fi
if [[ -n "${CONFIG:-}" ]]; then
  check_config "$CONFIG"
  aot_check "$CONFIG" "$ACCELERATOR_TYPE" "$@"
else
  note "no CONFIG: the slice is requested without checking that a config fits it"
fi
run "${cmd[@]}"

describe=(gcloud compute tpus queued-resources describe "$QR_NAME" "${GCLOUD_LOC[@]}"
  "--format=value(state.state)")
if ! is_true "${WAIT:-0}"; then
  note "requested ${QR_NAME} (${ACCELERATOR_TYPE}); check its state with:"
  echo "  $(join_quoted "${describe[@]}")" >&2
  exit 0
fi
if dry_run; then
  note "would poll until ACTIVE (every 30 s, at most ${WAIT_TIMEOUT_S:-3600} s):"
  run "${describe[@]}"
  exit 0
fi
deadline=$((SECONDS + ${WAIT_TIMEOUT_S:-3600}))
while :; do
  state="$("${describe[@]}" 2>/dev/null || echo UNKNOWN)"
  note "${QR_NAME}: ${state}"
  case "$state" in
    ACTIVE) break ;;
    FAILED | SUSPENDED | SUSPENDING) die "${QR_NAME} is ${state}; see: gcloud compute tpus queued-resources describe ${QR_NAME} --zone=${ZONE} --project=${PROJECT}" ;;
  esac
  ((SECONDS < deadline)) || die "${QR_NAME} not ACTIVE after ${WAIT_TIMEOUT_S:-3600} s (state ${state}); it stays queued"
  sleep 30
done
note "${TPU_NAME} is ready: next, launch/tpu_setup.sh"
