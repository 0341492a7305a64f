#!/usr/bin/env bash
# MLServer 1.7.1 + its MLflow runtime in a virtualenv of their own, for bench_serving.py.
#
#   benchmarks/serving/setup_mlserver.sh [VENV_DIR]     (default: .venv-mlserver in the repo root)
#
# Creates the venv, or does nothing when it already holds these pins; prints the path of its
# `mlserver` on stdout (progress on stderr).
#
# Why a venv of its own: MLServer 1.7.1 requires Python < 3.13 and FastAPI < 0.116, and
# mloop's lock moves FastAPI/Starlette on. What must match mloop's environment is what loads
# the model: the registered version is an MLflow scikit-learn model that mloop logged with the
# versions in requirements.lock (skops serialization), so mlflow, scikit-learn, skops, numpy,
# pandas, scipy and cloudpickle are pinned here to the lock's versions, and lightgbm (the
# benchmark's second model is a LightGBM pipeline). uvloop stays below 0.22:
# from 0.22 on, asyncio.get_event_loop() no longer creates a loop, and MLServer 1.7.1's
# inference worker calls it at start-up ("There is no current event loop"), so every worker dies
# and the model never loads. Everything else is what pip resolves for mlserver==1.7.1 and
# mlserver-mlflow==1.7.1.
#
# Exits non-zero, naming the step, when the pins cannot be resolved; bench_serving.py then
# reports MLServer as failed and measures the other servers.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="${1:-$repo/.venv-mlserver}"
lock="$repo/requirements.lock"

# a Python that MLServer 1.7.1 accepts (>=3.9,<3.13) and scikit-learn from the lock runs on
python=""
for candidate in ${PYTHON:-} python3.11 python3.12 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c \
        'import sys; sys.exit(0 if (3, 11) <= sys.version_info[:2] < (3, 13) else 1)' 2>/dev/null
    then
        python="$candidate"
        break
    fi
done
if [ -z "$python" ]; then
    echo "setup_mlserver.sh: no Python 3.11 or 3.12 found (MLServer 1.7.1 needs < 3.13; set" \
         "PYTHON=/path/to/python3.12)" >&2
    exit 2
fi

# the model-loading libraries at the versions the model was logged with
pins=()
for name in mlflow mlflow-skinny scikit-learn skops numpy pandas scipy cloudpickle lightgbm; do
    line="$(grep -iE "^${name}==" "$lock" || true)"
    if [ -z "$line" ]; then
        echo "setup_mlserver.sh: $lock has no pin for '$name'" >&2
        exit 2
    fi
    pins+=("$line")
done

pins+=("uvloop<0.22")
spec="mlserver==1.7.1 mlserver-mlflow==1.7.1 ${pins[*]}"
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.setup-lock"  # two callers at once: the second waits, then finds it done
flock 9
stamp="$venv/.mloop-pins"
if [ -x "$venv/bin/mlserver" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$spec" ]; then
    echo "$venv/bin/mlserver"
    exit 0
fi

echo "creating $venv with $("$python" --version 2>&1): $spec" >&2
rm -f "$stamp"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
if ! "$venv/bin/python" -m pip install --quiet "mlserver==1.7.1" "mlserver-mlflow==1.7.1" \
        "${pins[@]}"; then
    echo "setup_mlserver.sh: pip could not install mlserver==1.7.1 mlserver-mlflow==1.7.1 with" \
         "${pins[*]}" >&2
    exit 3
fi
"$venv/bin/python" -m pip check >&2 || {
    echo "setup_mlserver.sh: pip check reports conflicts in $venv (see above)" >&2
    exit 3
}
"$venv/bin/mlserver" --version >&2
echo "$spec" >"$stamp"
echo "$venv/bin/mlserver"
