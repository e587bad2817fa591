# Sourced by scripts/test.sh and scripts/demo.sh: create .venv and install recall-hf with pinned versions, once.
# Re-installs only when pyproject.toml or constraints.txt changed since the last install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RECALL_HF_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if ! command -v "$PY" >/dev/null 2>&1; then
  echo "recall-hf: $PY not found; install Python 3.10+ (Debian: apt-get install python3 python3-venv)." >&2
  exit 1
fi
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "recall-hf: Python 3.10+ is required, found $("$PY" --version 2>&1)." >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    rm -rf "$VENV"
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "recall-hf: installing python3-venv with apt-get" >&2
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      "$PY" -m venv "$VENV"
    else
      echo "recall-hf: '$PY -m venv' failed; install the venv module (Debian: sudo apt-get install python3-venv)." >&2
      exit 1
    fi
  fi
fi
STAMP="$VENV/.recall-hf-installed"
if [ ! -f "$STAMP" ] || [ "$ROOT/pyproject.toml" -nt "$STAMP" ] || [ "$ROOT/constraints.txt" -nt "$STAMP" ]; then
  echo "recall-hf: installing into $VENV (pinned versions from constraints.txt)" >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
  # torch first, pinned: it is the CPU build; everything else must not pull a CUDA build.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/constraints.txt" torch
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/constraints.txt" -e "$ROOT[test]"
  touch "$STAMP"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
