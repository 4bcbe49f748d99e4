#!/usr/bin/env bash
# The core suite under the supported extremes: the oldest Python with the oldest numpy, and
# the newest Python with the newest numpy, each in a fresh virtual environment with frameshm
# installed from this tree (a real build, not the editable one). Interpreters are looked up
# on PATH and in pyenv; a missing one is reported as SKIPPED, never silently.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
# What depends on the interpreter and numpy: the API, errors, numpy views and their
# lifetime, DLPack. (Region validation and multi-process behaviour are the C library's,
# the same under every Python: the main suite covers them once.)
CORE_TESTS=(test_api.py test_errors.py test_writer_reader.py test_lifetime.py test_threads.py)
[ -f tests/python/test_dlpack.py ] && CORE_TESTS+=(test_dlpack.py)
# "python-version numpy-requirement"
COMBOS=("3.9 numpy==1.23.5" "3.13 numpy")

find_python() {
  local v="$1" p
  for p in "$(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/"python$v" 2>/dev/null | sort -V | tail -n 1)" \
           "/usr/bin/python$v" "$(command -v "python$v" 2>/dev/null)"; do
    # (a pyenv shim is on PATH for versions it cannot run: try it)
    if [ -n "$p" ] && "$p" -c "import venv" 2>/dev/null; then echo "$p"; return; fi
  done
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0
for combo in "${COMBOS[@]}"; do
  read -r v req <<<"$combo"
  py="$(find_python "$v")"
  if [ -z "$py" ]; then
    echo "== Python $v with $req: SKIPPED (no python$v on this machine)"
    continue
  fi
  venv="$work/py$v"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "$req" pytest pytest-timeout hypothesis posix_ipc
  # A product build (no test hooks), installed like a user installs it.
  env -u FRAMESHM_TEST_BUILD "$venv/bin/python" -m pip install -q --disable-pip-version-check "$ROOT"
  echo "== Python $("$venv/bin/python" -c 'import sys, numpy; print(sys.version.split()[0], "with numpy", numpy.__version__)'): core suite"
  tests=("${CORE_TESTS[@]/#/$ROOT/tests/python/}")
  set +e
  # From outside the checkout: the installed frameshm is imported, not the source tree's.
  (cd "$work" && "$venv/bin/python" -m pytest -q -p no:cacheprovider --rootdir "$ROOT" -c "$ROOT/pyproject.toml" "${tests[@]}")
  rc=$?
  set -e
  if [ "$rc" = 5 ]; then echo "no tests collected under Python $v: failing" >&2; rc=1; fi
  [ "$rc" = 0 ] || failed=1
done
exit "$failed"
