#!/usr/bin/env bash
# Airflow 3 for `mloop export airflow` (its integration test, or a local try): .venv-airflow,
# installed from requirements-airflow.lock, apart from mloop's own environment. They cannot
# share one: Airflow 3.3 pins fastapi<0.137 where mloop's lock has 0.165, and 3.2.2, the newest
# Airflow that resolves with mloop's lock, fails its first task with that lock's pydantic. The
# exported DAG runs the mloop CLI, so this environment never imports mloop.
#
#   scripts/airflow_env.sh            create or sync it (a no-op when it matches the lock);
#                                     prints the path of its `airflow`
#   scripts/airflow_env.sh --relock   re-pin requirements-airflow.lock (newest Airflow 3.x), sync
#
# MLOOP_AIRFLOW_VENV overrides the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
spec="apache-airflow>=3.3,<4"
header="# Pinned Airflow for \`mloop export airflow\` ($spec, Python 3.11), in .venv-airflow.\n# Regenerate: scripts/airflow_env.sh --relock"

. scripts/tool_venv.sh
tool_venv "${MLOOP_AIRFLOW_VENV:-.venv-airflow}" requirements-airflow.lock "$spec" airflow \
  "$header" "${1:-}"
