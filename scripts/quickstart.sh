#!/usr/bin/env bash
# The main job: set up .venv, then quantize the default model (SmolLM2-135M) with RTN at 8 and 4 bits
# and print the size / perplexity table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
exec .venv/bin/bitsmith compare "$@"
