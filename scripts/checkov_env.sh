#!/usr/bin/env bash
# checkov for `mloop export terraform` (its test, or a local check of infra/): .venv-checkov,
# installed from requirements-checkov.lock, apart from mloop's own environment. They cannot
# share one: checkov pins exact versions of boto3, jsonschema, networkx and others that differ
# from mloop's lock. checkov only reads the .tf files, so this environment never imports mloop.
#
#   scripts/checkov_env.sh            create or sync it (a no-op when it matches the lock);
#                                     prints the path of its `checkov`
#   scripts/checkov_env.sh --relock   re-pin requirements-checkov.lock, then sync
#
# MLOOP_CHECKOV_VENV overrides the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${MLOOP_CHECKOV_VENV:-.venv-checkov}
lock=requirements-checkov.lock
spec="checkov==3.3.30"

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.setup-lock"  # two callers at once: the second waits, then finds it done
flock 9

stamp="$venv/.mloop-lock-sha256"
if [ "${1:-}" != "--relock" ] && [ -x "$venv/bin/checkov" ] \
    && [ "$(cat "$stamp" 2>/dev/null)" = "$(sha256sum "$lock" | cut -d' ' -f1)" ]; then
  echo "$venv/bin/checkov"
  exit 0
fi

[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/python" -m uv --version >/dev/null 2>&1 \
  || "$venv/bin/python" -m pip install -q --disable-pip-version-check uv >&2
uv=("$venv/bin/python" -m uv)

if [ "${1:-}" = "--relock" ]; then
  echo "$spec" | "${uv[@]}" pip compile - --python-version 3.11 \
    --python-platform x86_64-unknown-linux-gnu -q --no-header -o "$lock"
  sed -i "1i # Pinned checkov for \`mloop export terraform\`'s checks ($spec, Python 3.11), in .venv-checkov.\n# Regenerate: scripts/checkov_env.sh --relock" "$lock"
fi

rm -f "$stamp"
"${uv[@]}" pip sync -q --python "$venv/bin/python" "$lock" >&2
sha256sum "$lock" | cut -d' ' -f1 >"$stamp"
echo "$venv/bin/checkov"
