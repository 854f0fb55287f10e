#!/usr/bin/env bash
# Install the system tools the observability tests drive (idempotent):
# Prometheus (server + promtool) and headless Chromium, from Debian's registry.
# Needs root (CI containers run as root); does nothing when both are present.
set -euo pipefail
missing=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
