#!/usr/bin/env bash
# The system packages the test suite talks to: headless Chromium + chromedriver (the
# dashboard test) and docker-compose v1 (the compose file check). `make test` and
# `.ci/run` both call this, so a newcomer's run equals CI's. No-op when all are there.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v docker-compose >/dev/null; then
    exit 0
fi
echo "[install_test_system_packages] installing chromium, chromium-driver, docker-compose" >&2
SUDO=""
if [[ $EUID -ne 0 ]]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver docker-compose >/dev/null
