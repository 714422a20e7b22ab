#!/usr/bin/env bash
# The test command: a fresh virtual environment, the project installed from pyproject.toml, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export VENV="${VENV:-.venv-test}"
rm -rf "$VENV"
bash scripts/install.sh
# Fail fast instead of retrying the hub for minutes when offline.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" HF_DATASETS_OFFLINE="${HF_DATASETS_OFFLINE:-1}"
"$VENV/bin/python" -m pytest -q "$@"
