#!/usr/bin/env bash
# Step 2 of a TPU run: put the code and a Python environment on EVERY worker of the
# slice (and optionally mount a GCS bucket with gcsfuse for a shared workdir). Re-run it
# after changing the code; the venv is kept and only updated. Next: tpu_run.sh.
#
#   TPU_NAME=ezsd-v4 ZONE=us-central2-b PROJECT=my-project GCS_BUCKET=my-bucket \
#     launch/tpu_setup.sh
#
# Required: TPU_NAME, ZONE, PROJECT.
# Code sync (one of):
#   - default: a tarball of this checkout (tracked + untracked, not ignored, files,
#     i.e. with uncommitted edits) copied with `gcloud compute tpus tpu-vm scp`;
#   - GIT_REPO=<url> GIT_COMMIT=<sha|tag>: every worker clones/fetches and checks out
#     that commit (needs the workers to reach the repository).
# Optional: REMOTE_DIR (code dir on the workers, relative to $HOME; default ezsd);
#   PYTHON (remote interpreter, >= 3.11 for jax 0.10.2; default python3.11, installed
#   with apt when missing); JAX_VERSION (default 0.10.2: pip "jax[tpu]==$JAX_VERSION");
#   GCS_BUCKET (mount gs://$GCS_BUCKET at $GCS_MOUNT_ROOT/$GCS_BUCKET, default root
#   /mnt/gcs) with GCSFUSE_FLAGS (default "--implicit-dirs --rename-dir-limit=200000");
#   VERIFY=0 (skip the final device check); INTERNAL_IP=1; DRY_RUN=1; ENV_FILE.
set -euo pipefail
# shellcheck source=SCRIPTDIR/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

require TPU_NAME "TPU VM node id" ZONE "e.g. us-central2-b" PROJECT "GCP project id"
tpu_defaults
PYTHON="${PYTHON:-python3.11}"
GCSFUSE_FLAGS="${GCSFUSE_FLAGS:---implicit-dirs --rename-dir-limit=200000}"
if [[ -n "${GIT_REPO:-}" ]]; then
  require GIT_COMMIT "commit/tag to check out on every worker (with GIT_REPO)"
fi
if [[ -n "${GCS_BUCKET:-}" ]]; then
  [[ "$GCS_BUCKET" =~ ^[a-z0-9][a-z0-9._-]*$ ]] || die "GCS_BUCKET=${GCS_BUCKET}: give the bucket name only (no gs://, no path)"
fi

# ---- 1. code --------------------------------------------------------------------------
if [[ -n "${GIT_REPO:-}" ]]; then
  body=$(
    cat <<'EOF'
if [ -d "$REMOTE_DIR/.git" ]; then
  git -C "$REMOTE_DIR" fetch --quiet --tags origin
else
  git clone --quiet "$GIT_REPO" "$REMOTE_DIR"
fi
git -C "$REMOTE_DIR" checkout --quiet --detach "$GIT_COMMIT"
git -C "$REMOTE_DIR" rev-parse HEAD > "$REMOTE_DIR/SOURCE_REVISION"
echo "$(hostname): code at $(cat "$REMOTE_DIR/SOURCE_REVISION")"
EOF
  )
  tpu_ssh all "$(remote_script "$body" "REMOTE_DIR=$REMOTE_DIR" "GIT_REPO=$GIT_REPO" "GIT_COMMIT=$GIT_COMMIT")"
else
  git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
    die "${REPO_ROOT} is not a git checkout: set GIT_REPO/GIT_COMMIT, or run from a clone"
  REVISION="$(git -C "$REPO_ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
  if [[ -n "$(git -C "$REPO_ROOT" status --porcelain 2>/dev/null)" ]]; then
    REVISION+="+local-changes"
  fi
  TARBALL="${TMPDIR:-/tmp}/ezsd_code_${TPU_NAME}.tar.gz"
  REMOTE_TARBALL="ezsd_code.tar.gz"
  # Files as git sees them: tracked + untracked-but-not-ignored (no .venv, no workdirs).
  run bash -c "cd $(quote "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard | tar --null -T - -czf $(quote "$TARBALL")"
  tpu_scp "$TARBALL" "$REMOTE_TARBALL"
  body=$(
    cat <<'EOF'
mkdir -p "$REMOTE_DIR"
# Replace the code, keep the venv and the run logs.
find "$REMOTE_DIR" -mindepth 1 -maxdepth 1 ! -name .venv ! -name logs -exec rm -rf {} +
tar -xzf "$REMOTE_TARBALL" -C "$REMOTE_DIR"
rm -f "$REMOTE_TARBALL"
echo "$REVISION" > "$REMOTE_DIR/SOURCE_REVISION"
echo "$(hostname): code at $REVISION"
EOF
  )
  tpu_ssh all "$(remote_script "$body" "REMOTE_DIR=$REMOTE_DIR" "REMOTE_TARBALL=$REMOTE_TARBALL" "REVISION=$REVISION")"
fi

# ---- 2. python environment --------------------------------------------------------------
body=$(
  cat <<'EOF'
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$PYTHON" "$PYTHON-venv"
fi
cd "$REMOTE_DIR"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "jax[tpu]==$JAX_VERSION" -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "$(hostname): $(.venv/bin/python -c 'import jax; print("jax", jax.__version__)')"
EOF
)
tpu_ssh all "$(remote_script "$body" "REMOTE_DIR=$REMOTE_DIR" "PYTHON=$PYTHON" "JAX_VERSION=$JAX_VERSION")"

# ---- 3. shared workdir: gcsfuse mount (optional) ------------------------------------------
if [[ -n "${GCS_BUCKET:-}" ]]; then
  MOUNT="${GCS_MOUNT_ROOT%/}/${GCS_BUCKET}"
  body=$(
    cat <<'EOF'
if ! command -v gcsfuse >/dev/null 2>&1; then
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) main" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse
fi
sudo mkdir -p "$MOUNT"
sudo chown "$(id -u):$(id -g)" "$MOUNT"
if ! mountpoint -q "$MOUNT"; then
  gcsfuse $GCSFUSE_FLAGS "$GCS_BUCKET" "$MOUNT"
fi
echo "$(hostname): gs://$GCS_BUCKET mounted at $MOUNT"
EOF
  )
  tpu_ssh all "$(remote_script "$body" "GCS_BUCKET=$GCS_BUCKET" "MOUNT=$MOUNT" "GCSFUSE_FLAGS=$GCSFUSE_FLAGS")"
fi

# ---- 4. check: every worker sees the whole slice ------------------------------------------
if is_true "${VERIFY:-1}"; then
  body=$(
    cat <<'EOF'
cd "$REMOTE_DIR"
.venv/bin/python -c 'import jax; jax.distributed.initialize(); print(f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} local of {jax.device_count()} devices ({jax.devices()[0].device_kind})")'
EOF
  )
  tpu_ssh all "$(remote_script "$body" "REMOTE_DIR=$REMOTE_DIR")"
fi
note "setup done on all workers of ${TPU_NAME}: next, launch/tpu_run.sh"
