#!/usr/bin/env bash
# Install what is missing, then serve SmolLM2-135M-Instruct on 127.0.0.1:8000
# (NF4 target, draft-target speculative decoding, LoRA enabled).
# Usage: bash scripts/serve.sh [python -m server flags, see --help]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# tcmalloc: the server preloads it into vLLM's engine processes (server/engine/build.py), as vLLM's CPU
# backend asks; Debian's libtcmalloc-minimal4.
if ! ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ]; then
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libtcmalloc-minimal4
    else
        echo "tcmalloc is not installed and this is not root: the engine will run on glibc malloc" \
             "(vLLM logs 'libtcmalloc is not found in LD_PRELOAD'); to install it:" \
             "sudo apt-get install libtcmalloc-minimal4" >&2
    fi
fi
exec .venv/bin/python -m server "$@"
