# Sourced by the scripts: FRAMESHM_PY = the interpreter frameshm is installed into.
# PYTHON=/path/to/python: that interpreter (an environment you manage); else the project's
# virtual environment, $FRAMESHM_VENV (default: .venv in this checkout).
FRAMESHM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FRAMESHM_VENV="${FRAMESHM_VENV:-$FRAMESHM_ROOT/.venv}"
if [ -n "${PYTHON:-}" ]; then
  FRAMESHM_PY="$PYTHON"
else
  FRAMESHM_PY="$FRAMESHM_VENV/bin/python"
fi
