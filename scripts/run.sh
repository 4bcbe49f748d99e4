#!/usr/bin/env bash
# Installs what is missing (scripts/setup.sh pipeline), then runs the main job:
# `frameshm run`, the whole pipeline (test-pattern camera with a person walking in, the DNN
# person detector, controller, gateway) as separate processes; the live page is printed with
# its access token, a new one each run: http://127.0.0.1:8080/?token=... (Ctrl-C stops all). Extra arguments go to `frameshm run`
# (e.g. --port 8081, --source v4l2:/dev/video0).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh pipeline
. scripts/_python.sh
exec "$FRAMESHM_PY" -m frameshm run "$@"
