#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh test), then runs every test: libframeshm's and
# the device code's cmocka suites, the Python suite (which also executes the notebooks, the
# C library's install paths and the gateway page in headless Chromium), the thread, lifetime
# and DLPack tests under ASan + UBSan (scripts/test-sanitizers.sh), then the core suite
# under the oldest and newest supported Python and numpy (scripts/test-versions.sh).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. scripts/_python.sh

echo "== libframeshm and devices (cmocka) =="
make -s check

echo "== Python (pytest, $("$FRAMESHM_PY" -c 'import sys, numpy; print(f"Python {sys.version.split()[0]}, numpy {numpy.__version__}")')) =="
set +e
# FRAMESHM_TEST_WORKERS=2 runs the files on two pytest-xdist workers (one file per
# worker). Serial by default: a worker that dies makes xdist wait forever (seen), and a
# serial run fails loudly instead.
workers=()
[ "${FRAMESHM_TEST_WORKERS:-0}" -gt 1 ] && workers=(-n "$FRAMESHM_TEST_WORKERS" --dist loadfile)
"$FRAMESHM_PY" -m pytest -q -p no:cacheprovider -rs --durations=30 "${workers[@]}" tests/python "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
[ "$rc" = 0 ] || exit "$rc"

bash scripts/test-sanitizers.sh
bash scripts/test-versions.sh
