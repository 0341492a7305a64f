#!/usr/bin/env bash
# What an install costs: packages and disk for `pip install mloop` (core, no extras, pinned by the
# lock) next to the full lock CI installs (every extra + dev tools). Prints one line per set.
# Usage: bash scripts/install_footprint.sh [WORKDIR]   (default: a temp folder, removed after)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-$(mktemp -d)}
keep=${1:+yes}
measure() {  # name, pip args...
  local name=$1; shift
  local venv="$work/$name"
  rm -rf "$venv"; python3 -m venv "$venv"
  local t0=$(date +%s)
  "$venv/bin/pip" install -q --disable-pip-version-check "$@" 2>/dev/null
  local secs=$(( $(date +%s) - t0 ))
  local n=$("$venv/bin/pip" list --format=freeze --disable-pip-version-check 2>/dev/null | grep -vcE '^(pip|setuptools)==')
  local mb=$(du -sm "$venv" | cut -f1)
  printf '%-6s %4d packages %6d MB  %4d s\n' "$name" "$n" "$mb" "$secs"
}
measure core -c "$root/requirements.lock" "$root"
measure full -r "$root/requirements.lock"
[ -n "$keep" ] || rm -rf "$work"
