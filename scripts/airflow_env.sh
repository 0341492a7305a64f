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
venv=${MLOOP_AIRFLOW_VENV:-.venv-airflow}
lock=requirements-airflow.lock
spec="apache-airflow>=3.3,<4"

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.setup-lock"  # two callers at once: the second waits, then finds it done
flock 9

stamp="$venv/.mloop-lock-sha256"
if [ "${1:-}" != "--relock" ] && [ -x "$venv/bin/airflow" ] \
    && [ "$(cat "$stamp" 2>/dev/null)" = "$(sha256sum "$lock" | cut -d' ' -f1)" ]; then
  echo "$venv/bin/airflow"
  exit 0
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m uv --version >/dev/null 2>&1 \
  || "$venv/bin/python" -m pip install -q --disable-pip-version-check uv >&2
uv=("$venv/bin/python" -m uv)

if [ "${1:-}" = "--relock" ]; then
  echo "$spec" | "${uv[@]}" pip compile - --python-version 3.11 \
    --python-platform x86_64-unknown-linux-gnu -q --no-header -o "$lock"
  sed -i "1i # Pinned Airflow for \`mloop export airflow\` ($spec, Python 3.11), in .venv-airflow.\n# Regenerate: scripts/airflow_env.sh --relock" "$lock"
fi

rm -f "$stamp"
"${uv[@]}" pip sync -q --python "$venv/bin/python" "$lock" >&2
sha256sum "$lock" | cut -d' ' -f1 >"$stamp"
echo "$venv/bin/airflow"
