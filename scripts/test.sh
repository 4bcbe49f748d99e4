#!/usr/bin/env bash
# Installs what is missing, then runs every test: the C core's cmocka suites and the
# Python suite (which also executes the quickstart notebook).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
PY=${PYTHON:-python3}

echo "== libframeshm and devices (cmocka) =="
make -s check

echo "== Python (pytest) =="
set +e
$PY -m pytest -q -p no:cacheprovider tests/python "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$rc"
