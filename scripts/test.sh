#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, offline, on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev,app
bash scripts/install_browser.sh  # Debian's chromium for the app's real-browser test
exec .venv/bin/python -m pytest -q "$@"
