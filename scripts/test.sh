#!/usr/bin/env bash
# Install what is missing, then run the whole test suite (real vLLM engine,
# real server processes on 127.0.0.1, the official openai client).
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
if [ "$(id -u)" = 0 ]; then bash scripts/install_system.sh; fi  # Prometheus, Chromium (tests skip without them)
export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
exec .venv/bin/python -m pytest -p no:cacheprovider -rA --durations=15 "$@"
