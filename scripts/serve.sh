#!/usr/bin/env bash
# Install what is missing, then serve SmolLM2-135M-Instruct on 127.0.0.1:8000
# (NF4 target, draft-target speculative decoding, LoRA enabled).
# Usage: bash scripts/serve.sh [python -m server flags, see --help]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m server "$@"
