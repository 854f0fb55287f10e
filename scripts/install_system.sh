#!/usr/bin/env bash
# Install the system tools the tests drive (idempotent): Prometheus (server + promtool), headless
# Chromium, PostgreSQL and HAProxy, from Debian's registry;
# and tcmalloc, which the server preloads into vLLM's engine processes (server/engine/build.py).
# Needs root (CI containers run as root); does nothing when all are present.
set -euo pipefail
missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# PostgreSQL (the replicas' shared adapter registry) and HAProxy (the router): tests/test_replicas.py.
command -v initdb >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
[ -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ] || [ -e /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 ] || missing+=(libtcmalloc-minimal4)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
