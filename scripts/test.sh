#!/usr/bin/env bash
# Run the whole test suite (the command .ci/run calls). Extra arguments go to pytest.
set -euo pipefail
source "$(dirname "$0")/setup-env.sh"
cd "$ROOT"
python -m pytest -q "$@"
