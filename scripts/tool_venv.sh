# Sourced by scripts/airflow_env.sh and scripts/checkov_env.sh (run from the repository's root):
# tool_venv builds or reuses a tool's own virtual environment, installed from its lock file,
# apart from mloop's environment.
#
#   tool_venv VENV LOCK SPEC TOOL HEADER [--relock]
#
# VENV the folder, LOCK the lock file, SPEC what --relock pins, TOOL the executable whose path it
# prints (stdout carries only that line; uv's and pip's output goes to stderr), HEADER the
# comment lines --relock puts on top of LOCK (a sed `i` text: \n between lines). Without
# --relock it is a no-op when VENV was synced from LOCK as it is now (a sha256 stamp in VENV).
# Two callers at once: the second waits on VENV.setup-lock, then finds it done.
tool_venv() {
  local venv=$1 lock=$2 spec=$3 tool=$4 header=$5 relock=${6:-}
  local stamp="$venv/.mloop-lock-sha256"
  if [ "$relock" != "--relock" ] && [ ! -f "$lock" ]; then
    # without it the stamp check below compares two empty strings and reports a stale venv
    echo "$0: lock file $lock not found (scripts/$(basename "$0") --relock writes it)" >&2
    exit 1
  fi

  mkdir -p "$(dirname "$venv")"
  exec 9>"$venv.setup-lock"
  flock 9

  if [ "$relock" != "--relock" ] && [ -x "$venv/bin/$tool" ] \
      && [ "$(cat "$stamp" 2>/dev/null)" = "$(sha256sum "$lock" | cut -d' ' -f1)" ]; then
    echo "$venv/bin/$tool"
    return 0
  fi

  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/python" -m uv --version >/dev/null 2>&1 \
    || "$venv/bin/python" -m pip install -q --disable-pip-version-check uv >&2
  local uv=("$venv/bin/python" -m uv)

  if [ "$relock" = "--relock" ]; then
    echo "$spec" | "${uv[@]}" pip compile - --python-version 3.11 \
      --python-platform x86_64-unknown-linux-gnu -q --no-header -o "$lock"
    sed -i "1i $header" "$lock"
  fi

  rm -f "$stamp"
  "${uv[@]}" pip sync -q --python "$venv/bin/python" "$lock" >&2
  sha256sum "$lock" | cut -d' ' -f1 >"$stamp"
  echo "$venv/bin/$tool"
}
