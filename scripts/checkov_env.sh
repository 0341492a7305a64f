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
spec="checkov==3.3.30"
header="# Pinned checkov for \`mloop export terraform\`'s checks ($spec, Python 3.11), in .venv-checkov.\n# Regenerate: scripts/checkov_env.sh --relock"

. scripts/tool_venv.sh
tool_venv "${MLOOP_CHECKOV_VENV:-.venv-checkov}" requirements-checkov.lock "$spec" checkov \
  "$header" "${1:-}"
