#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install what it
# needs.  Sourced by scripts/main.sh and .ci/run so both see the same set-up.
#
# * --system-site-packages: a FederatedScope installed by hand on this
#   machine (it is not on PyPI) is visible to the tests; nothing here
#   installs it.
# * torch is pinned to 2.13.0: on these machines that resolves to a local
#   CPU build, where a bare "torch" would pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FS_BT_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv --system-site-packages "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" >/dev/null 2>&1; then
  pip install -q "torch==2.13.0"
fi
pip install -q -e "$ROOT[test,plots]"
