#!/usr/bin/env bash
# Run the whole test suite (the command .ci/run calls). Extra arguments go to pytest.
#   1. lint-imports: the layering contracts in pyproject.toml ([tool.importlinter]): recall_hf <- recall_daemon <-
#      benchmarks, no import cycles inside recall_hf.
#   2. pytest: the main suite (tests marked `slow` are left out, see pyproject.toml).
#   3. in CI (CI=true) or with RECALL_HF_SLOW=1: the benchmark smoke test, its own step; it fetches the benchmark's
#      models and data from package registries (pip, npm) the first time (cached after), so a developer's plain run
#      leaves it out.
set -euo pipefail
source "$(dirname "$0")/setup-env.sh"
cd "$ROOT"
lint-imports
python -m pytest -q "$@"
if [ "${RECALL_HF_SLOW:-0}" = 1 ] || [ "${CI:-}" = true ]; then
  python -m pytest -q -m slow tests/test_benchmark_smoke.py
fi
