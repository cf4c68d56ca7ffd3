#!/usr/bin/env bash
# Every accelerator figure from one command (benchmarks/accelerator_suite.py has the
# benchmarks, caps and the 8-minute budget). Output: $OUT (default
# workdir/accelerator_suite)/suite.json + suite.md; extra flags go to the driver:
#   bash benchmarks/accelerator_suite.sh            # one H100/H200, < 8 min
#   bash benchmarks/accelerator_suite.sh --smoke    # CPU, tiny sizes (CI runs this)
# Python: $PY, else .venv/bin/python, else python3 (a GPU venv needs jax[cuda12]).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" benchmarks/accelerator_suite.py --out="${OUT:-workdir/accelerator_suite}" "$@"
