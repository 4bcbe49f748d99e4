#!/usr/bin/env bash
# Installs what is missing, then runs the main job: a live stream from the built-in
# test pattern with consumers in separate processes (Ctrl-C to stop).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m frameshm demo "$@"
