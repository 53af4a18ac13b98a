#!/usr/bin/env bash
# The main job: set up .venv, then `bitsmith compare` with no arguments: the default model (SmolLM2-135M)
# quantized by every installed method at the bits each is useful at, measured on the same held-out text.
# Writes out/compare/report.html (self-contained), report.md and report.json; prints the table and the
# recommendation. Extra arguments go to compare: --resume reuses finished configurations, --overwrite
# recomputes them, --output DIR writes elsewhere.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh
exec .venv/bin/bitsmith compare "$@"
