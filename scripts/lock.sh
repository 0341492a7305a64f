#!/usr/bin/env bash
# Re-pin requirements.lock from pyproject.toml (core + dev, fast, tune, kubeflow, spark, lightgbm, xgboost and feast extras), for Python 3.11 on Linux.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q uv
uv pip compile pyproject.toml --extra dev --extra fast --extra tune --extra kubeflow --extra spark --extra lightgbm --extra xgboost --extra feast --python-version 3.11 \
  --python-platform x86_64-unknown-linux-gnu -o requirements.lock -q --no-header
sed -i '1i # Pinned set CI installs (uv pip compile pyproject.toml --extra dev --extra fast --extra tune --extra kubeflow --extra spark --extra lightgbm --extra xgboost --extra feast --python-version 3.11).\n# Regenerate: scripts/lock.sh' requirements.lock
