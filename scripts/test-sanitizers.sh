#!/usr/bin/env bash
# The library and the binding built with AddressSanitizer and UndefinedBehaviorSanitizer,
# in a copy of the tree, running the tests that share handles and mappings between threads
# and outlive them: one Reader used from several threads across epoch changes (the crash of
# issue 14), views outliving their Reader/Writer/stream, DLPack exports, and the Reader's
# spin-window hook, which builds Python objects with the GIL taken inside a wait; and the
# C library's publish fill team (helper threads) under ThreadSanitizer. Any report fails.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_python.sh
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
git ls-files -z | xargs -0 cp --parents -t "$work"
cd "$work"
san="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined"
echo "== ASan + UBSan build =="
CFLAGS="$san" LDFLAGS="-fsanitize=address,undefined" FRAMESHM_TEST_BUILD=1 \
  "$FRAMESHM_PY" setup.py -q build_ext --inplace --force > build.log 2>&1 || { cat build.log; exit 1; }
ldd frameshm/_core*.so | grep libasan > /dev/null || { echo "the extension is not instrumented" >&2; exit 1; }
# The interpreter is not instrumented: the runtimes are preloaded. Leak checking is off
# (CPython keeps objects alive at exit on purpose); every other report aborts the process.
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
# The copy's frameshm, not the environment's (an editable install points at the checkout).
got="$("$FRAMESHM_PY" -c 'import frameshm._core as c; print(c.__file__)')"
case "$got" in "$work"/*) ;; *) echo "imported $got, not the instrumented copy" >&2; exit 1;; esac
echo "== ASan + UBSan: threads, lifetime, DLPack, spin window =="
# (The leak tests count mappings and bytes, which the sanitizers' allocator changes: they
# run in the main suite.)
"$FRAMESHM_PY" -m pytest -q -p no:cacheprovider tests/python/test_threads.py \
    tests/python/test_lifetime.py tests/python/test_dlpack.py tests/python/test_spin_window.py \
    -k "not leak"
echo "== TSan: the publish fill team and the doorbells' race (tests/c test_fill, test_doorbell) =="
# Not under the ASan runtime preloaded above for the interpreter.
env -u LD_PRELOAD -u ASAN_OPTIONS -u UBSAN_OPTIONS make -s -C tests/c tsan-fill tsan-doorbell
