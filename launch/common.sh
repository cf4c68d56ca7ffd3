# shellcheck shell=bash
# Shared helpers for the launch scripts (sourced, never run): variable checks, dry-run
# aware command execution, quoting, the gcloud TPU flags and the ezsd_jax.main command
# line. Every launch/*.sh does:
#   source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# Settings come from environment variables (or a file named by ENV_FILE, sourced first);
# DRY_RUN=1 prints each command, shell-quoted and copy-pasteable, instead of running it.

if [[ -n "${EZSD_LAUNCH_COMMON_LOADED:-}" ]]; then
  return 0
fi
EZSD_LAUNCH_COMMON_LOADED=1

LAUNCH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "${LAUNCH_DIR}/.." && pwd)"
SCRIPT_NAME="$(basename "$0")"
export LAUNCH_DIR REPO_ROOT SCRIPT_NAME

if [[ -n "${ENV_FILE:-}" ]]; then
  if [[ ! -f "${ENV_FILE}" ]]; then
    echo "error: ${SCRIPT_NAME}: ENV_FILE=${ENV_FILE} does not exist" >&2
    exit 2
  fi
  set -a
  # shellcheck source=/dev/null
  source "${ENV_FILE}"
  set +a
fi

JAX_VERSION="${JAX_VERSION:-0.10.2}"

# die MESSAGE: one clear line on stderr, exit status 2 (usage/config error).
die() {
  echo "error: ${SCRIPT_NAME}: $*" >&2
  exit 2
}

# note MESSAGE: progress/info line on stderr (stdout stays the command transcript).
note() {
  echo "[${SCRIPT_NAME}] $*" >&2
}

# require NAME "hint" [NAME "hint" ...]: every NAME must be set and non-empty.
require() {
  local missing=()
  while (($# >= 2)); do
    local name="$1" hint="$2"
    shift 2
    if [[ -z "${!name:-}" ]]; then
      missing+=("  ${name}${hint:+  (${hint})}")
    fi
  done
  if ((${#missing[@]})); then
    {
      echo "error: ${SCRIPT_NAME}: required variable(s) not set:"
      printf '%s\n' "${missing[@]}"
      echo "Set them in the environment (e.g. NAME=value ${SCRIPT_NAME}) or in ENV_FILE."
    } >&2
    exit 2
  fi
}

# is_true VALUE: 1/true/yes/on (any case) -> success.
is_true() {
  case "$1" in
    1 | [Tt][Rr][Uu][Ee] | [Yy][Ee][Ss] | [Oo][Nn]) return 0 ;;
    *) return 1 ;;
  esac
}

dry_run() {
  is_true "${DRY_RUN:-0}"
}

# quote WORD: WORD as-is when it is made of safe characters, else single-quoted.
quote() {
  local w="$1"
  if [[ -n "$w" && "$w" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$w"
  else
    printf "'%s'" "${w//\'/\'\\\'\'}"
  fi
}

# join_quoted WORDS...: the words as one shell command line.
join_quoted() {
  local out="" w
  for w in "$@"; do
    out+="${out:+ }$(quote "$w")"
  done
  printf '%s' "$out"
}

# run CMD ARGS...: prints the command (+ prefix) and runs it; with DRY_RUN=1 only prints.
run() {
  echo "+ $(join_quoted "$@")"
  if ! dry_run; then
    "$@"
  fi
}

# check_config PATH[:ARG]: the ml_collections config file must exist in this checkout
# (remote machines run the same code, synced by tpu_setup.sh).
check_config() {
  local file="${1%%:*}"
  if [[ "$file" != /* ]]; then
    file="${REPO_ROOT}/${file}"
  fi
  [[ -f "$file" ]] || die "CONFIG=$1: no such config file (paths are relative to the repo root)"
}

# aot_check CONFIG ACCELERATOR_TYPE [ARGS...]: the deviceless AOT check (docs/aot.md)
# before anything is queued or started: every jitted step of CONFIG's stages is compiled
# here, for the slice, with libtpu (pip install -r requirements-tpu.txt), and a config that
# does not fit in HBM (or does not compile) stops the script with the check's one line and
# its exit status. The --config.* ARGS are passed on; others are ignored. Printed like
# every command (DRY_RUN=1 prints it only). AOT_CHECK=0 skips it; AOT_PYTHON (default
# the checkout's .venv/bin/python) runs it.
aot_check() {
  local cfg_file="$1" accel="$2"
  shift 2
  if ! is_true "${AOT_CHECK:-1}"; then
    note "AOT_CHECK=0: not checking that ${cfg_file} fits ${accel}"
    return 0
  fi
  local py="${AOT_PYTHON:-${REPO_ROOT}/.venv/bin/python}" arg
  [[ "$cfg_file" == /* ]] || cfg_file="${REPO_ROOT}/${cfg_file}"
  local cmd=("$py" -m ezsd_jax.aot "--config=${cfg_file}" "--topology=${accel}")
  for arg in "$@"; do
    if [[ "$arg" == --config.* ]]; then
      cmd+=("$arg")
    fi
  done
  echo "+ $(join_quoted "${cmd[@]}")"
  if dry_run; then
    return 0
  fi
  note "checking that ${cfg_file#"${REPO_ROOT}"/} fits ${accel} (deviceless compile; AOT_CHECK=0 skips)"
  local status=0
  (cd "$REPO_ROOT" && "${cmd[@]}" >&2) || status=$?
  if ((status)); then
    echo "error: ${SCRIPT_NAME}: the AOT check refused ${cfg_file#"${REPO_ROOT}"/} on ${accel} (above); nothing was started (AOT_CHECK=0 skips the check)" >&2
    exit "$status"
  fi
}

# main_cmd PYTHON CONFIG WORKDIR DISTRIBUTED(0|1) [EXTRA_ARGS...]: sets the global array
# MAIN_CMD to the `python -m ezsd_jax.main` command line. STAGES (comma list) is added
# when set. Extra args (e.g. --config.train.steps=100) are passed through unchanged.
main_cmd() {
  local python="$1" cfg_file="$2" out_dir="$3" distributed="$4"
  shift 4
  MAIN_CMD=("$python" -m ezsd_jax.main "--config=${cfg_file}" "--workdir=${out_dir}")
  if [[ -n "${STAGES:-}" ]]; then
    MAIN_CMD+=("--stages=${STAGES}")
  fi
  if [[ "$distributed" == 1 ]]; then
    MAIN_CMD+=(--config.distributed.enabled=True)
  fi
  MAIN_CMD+=("$@")
}

# ---- TPU (gcloud) -------------------------------------------------------------------

# tpu_defaults: derived names shared by the tpu_*.sh scripts.
tpu_defaults() {
  QR_NAME="${QR_NAME:-${TPU_NAME:-}-qr}"
  REMOTE_DIR="${REMOTE_DIR:-ezsd}"
  RUN_NAME="${RUN_NAME:-run}"
  GCS_MOUNT_ROOT="${GCS_MOUNT_ROOT:-/mnt/gcs}"
  [[ "$RUN_NAME" =~ ^[A-Za-z0-9_.-]+$ ]] || die "RUN_NAME=${RUN_NAME}: use letters, digits, . _ -"
  [[ "$REMOTE_DIR" != *" "* ]] || die "REMOTE_DIR=${REMOTE_DIR}: no spaces"
}

# gcloud_loc_flags: --zone/--project for every gcloud TPU command (array GCLOUD_LOC).
gcloud_loc_flags() {
  GCLOUD_LOC=("--zone=${ZONE}" "--project=${PROJECT}")
}

# tpu_ssh WORKER REMOTE_COMMAND: runs a bash command on the TPU VM worker(s) (all|N).
tpu_ssh() {
  local worker="$1" remote="$2"
  gcloud_loc_flags
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_LOC[@]}"
    "--worker=${worker}")
  if is_true "${INTERNAL_IP:-0}"; then
    cmd+=(--internal-ip)
  fi
  cmd+=("--command=${remote}")
  run "${cmd[@]}"
}

# tpu_scp LOCAL REMOTE_PATH: copies a local file to every worker.
tpu_scp() {
  local local_path="$1" remote_path="$2"
  gcloud_loc_flags
  local cmd=(gcloud compute tpus tpu-vm scp "$local_path" "${TPU_NAME}:${remote_path}"
    "${GCLOUD_LOC[@]}" --worker=all)
  if is_true "${INTERNAL_IP:-0}"; then
    cmd+=(--internal-ip)
  fi
  run "${cmd[@]}"
}

# remote_script BODY NAME=VALUE...: a bash script for the workers: `set -euo pipefail`,
# then NAME=<VALUE, quoted> lines, then BODY (write BODY in a quoted heredoc so its
# $(...) and $VARS are evaluated on the workers).
remote_script() {
  local body="$1" out="set -euo pipefail"$'\n' kv
  shift
  for kv in "$@"; do
    [[ "${kv%%=*}" =~ ^[A-Z_][A-Z0-9_]*$ ]] || die "remote_script: bad assignment ${kv}"
    out+="${kv%%=*}=$(quote "${kv#*=}")"$'\n'
  done
  printf '%s' "${out}${body}"
}

# gcs_to_mount PATH: gs://BUCKET/PATH -> ${GCS_MOUNT_ROOT}/BUCKET/PATH (the gcsfuse mount
# made by tpu_setup.sh with GCS_BUCKET=BUCKET); other paths unchanged. Our writers
# (metrics CSV, atomic JSON/npz, dataset files) use plain POSIX file calls, so the run
# sees the bucket through the mount, never as a gs:// URL.
gcs_to_mount() {
  local p="$1"
  if [[ "$p" == gs://* ]]; then
    local rest="${p#gs://}"
    printf '%s/%s' "${GCS_MOUNT_ROOT%/}" "${rest%/}"
  else
    printf '%s' "$p"
  fi
}

# ---- GPU ----------------------------------------------------------------------------

# default_python: the repo's venv python when it exists, else python3 (array-free string).
default_python() {
  if [[ -x "${REPO_ROOT}/.venv/bin/python" ]]; then
    printf '%s' "${REPO_ROOT}/.venv/bin/python"
  else
    printf '%s' python3
  fi
}
