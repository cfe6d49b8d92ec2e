#!/usr/bin/env bash
# Set up (if needed) and start memosd in the foreground on its embedded defaults:
# 127.0.0.1:50051, data in ~/.local/share/memosd. Extra arguments go to memosd.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/memosd "$@"
