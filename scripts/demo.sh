#!/usr/bin/env bash
# The whole product end to end on built-in defaults (offline): daemon + three tasks fine-tuned with RecallCallback,
# each folded into the deployed model, compared with sequential fine-tuning. Extra arguments go to examples/demo.py
# (e.g. --model smollm2).
set -euo pipefail
source "$(dirname "$0")/setup-env.sh"
cd "$ROOT"
python examples/demo.py "$@"
