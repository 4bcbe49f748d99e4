#!/usr/bin/env bash
# CI's check of the README's first command as a user meets it: `bash scripts/run.sh` in a
# virtual environment of its own, made from scratch by the main-job set-up (what the
# pipeline needs and nothing of the test toolchain). It must bring the pipeline up and
# serve the page at the printed URL (and only with the access token in it), show a person detection in the gateway's metrics, and stop cleanly
# (exit 0) on Ctrl-C (SIGINT).
set -euo pipefail
cd "$(dirname "$0")/.."
work="$(mktemp -d)"
export FRAMESHM_VENV="$work/venv" FRAMESHM_DIR="$work/shm"
mkdir -p "$FRAMESHM_DIR"
unset PYTHON FRAMESHM_TEST_BUILD
log="$work/run.log"
cleanup() { [ -n "${pid:-}" ] && kill -KILL -- -"$pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

# Its own process group, so that Ctrl-C can be delivered the way a terminal does.
setsid bash scripts/run.sh --port 0 >"$log" 2>&1 &
pid=$!
url=""
for _ in $(seq 1 900); do     # the set-up installs from scratch: allow 15 minutes
  url="$(sed -n 's/.*is up; open \(http:[^ ]*\).*/\1/p' "$log" | head -n 1)"
  [ -n "$url" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$log"; echo "check-main-job: run.sh exited early" >&2; exit 1; }
  sleep 1
done
[ -n "$url" ] || { cat "$log"; echo "check-main-job: the pipeline never came up" >&2; exit 1; }
echo "main job up: $url"
page="$(curl -fsS --max-time 10 "$url")"
grep -q "<canvas" <<<"$page" || { echo "check-main-job: no page at $url" >&2; exit 1; }
case "$url" in *"?token="?*) ;; *) echo "check-main-job: no access token in $url" >&2; exit 1 ;; esac
bare="$(curl -sS -o /dev/null -w '%{http_code}' --max-time 10 "${url%%\?*}")"
[ "$bare" = 401 ] || { echo "check-main-job: ${url%%\?*} answered $bare without the token, not 401" >&2; exit 1; }
sleep 5   # frames and detections flow
"$FRAMESHM_VENV/bin/frameshm" ls --sample 1 | tee "$work/ls.txt"
grep -q "capture" "$work/ls.txt"
kill -INT -- -"$pid"
for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$pid" 2>/dev/null; then cat "$log"; echo "check-main-job: still running 10 s after Ctrl-C" >&2; exit 1; fi
wait "$pid" && rc=0 || rc=$?
pid=""
[ "$rc" = 0 ] || { cat "$log"; echo "check-main-job: run.sh exited $rc after Ctrl-C" >&2; exit 1; }
echo "check-main-job: set-up from scratch, page served (401 without its token), clean stop on Ctrl-C: passed"
