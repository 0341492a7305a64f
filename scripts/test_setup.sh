#!/usr/bin/env bash
# Make this machine ready for mloop's test suite, idempotently (README's test command runs it):
# - Debian packages the tests drive for real: headless Chromium renders the HTML reports (and,
#   through chromium-driver, the dashboard's pages),
#   promtool checks the generated alerting rules, Java runs Spark batch scoring;
# - PostgreSQL on 127.0.0.1:5432 (trust auth, database `test`) for the tests marked `postgres`.
# It changes nothing when all of that is already in place.
set -euo pipefail

need=()
command -v chromium >/dev/null || need+=(chromium)
command -v chromedriver >/dev/null || need+=(chromium-driver)
command -v promtool >/dev/null || need+=(prometheus)
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] && ! command -v sudo >/dev/null; then
    echo "test_setup: missing ${need[*]}; install them: apt-get install -y --no-install-recommends ${need[*]}" >&2
    exit 1
  fi
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "test_setup: installing ${need[*]} from Debian's packages" >&2
  $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null; }
fi

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if ! command -v pg_ctlcluster >/dev/null || [ ! -d /etc/postgresql ]; then
    echo "test_setup: PostgreSQL is not running on 127.0.0.1:5432 and no Debian cluster was found;" \
         "start a server there with trust auth and a database named test" >&2
    exit 1
  fi
  echo "test_setup: PostgreSQL is down; starting it" >&2
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
  pg_isready -q -h 127.0.0.1 -p 5432 || { echo "test_setup: PostgreSQL did not come up" >&2; exit 1; }
fi
