#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh test), then runs every test: libframeshm's and
# the device code's cmocka suites, the Python suite (which also executes the notebooks, the
# C library's install paths and the gateway page in headless Chromium), the thread, lifetime
# and DLPack tests under ASan + UBSan and publish's fill team and the doorbells' race under TSan
# (scripts/test-sanitizers.sh), then the core suite
# under the oldest and newest supported Python and numpy (scripts/test-versions.sh).
# Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
. scripts/_python.sh

echo "== libframeshm and devices (cmocka) =="
make -s check

echo "== Python (pytest, $("$FRAMESHM_PY" -c 'import sys, numpy; print(f"Python {sys.version.split()[0]}, numpy {numpy.__version__}")')) =="
t0=$SECONDS
set +e
# The files run on FRAMESHM_TEST_WORKERS pytest-xdist workers (3 by default: most tests wait
# on real processes, sockets and browsers, so three keep two cores busy), one whole file per
# worker at a time, the slowest files first (tests/python/conftest.py). FRAMESHM_TEST_WORKERS=0
# runs serially. A worker that crashes can leave xdist waiting forever (seen with
# --dist loadfile), so the run as a whole has a deadline and fails loudly past it.
workers=()
nworkers="${FRAMESHM_TEST_WORKERS:-3}"
[ "$nworkers" -gt 1 ] && workers=(-n "$nworkers" --dist loadfile --no-loadscope-reorder)
timeout --kill-after=30 "${FRAMESHM_TEST_DEADLINE:-2700}" \
  "$FRAMESHM_PY" -m pytest -q -p no:cacheprovider -rs --durations=30 "${workers[@]}" tests/python "$@"
rc=$?
set -e
echo "pytest: exit $rc after $((SECONDS - t0)) s"
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "pytest did not finish within ${FRAMESHM_TEST_DEADLINE:-2700} s: failing" >&2
  exit 1
fi
if [ "$rc" = 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
[ "$rc" = 0 ] || exit "$rc"

bash scripts/test-sanitizers.sh
bash scripts/test-versions.sh
