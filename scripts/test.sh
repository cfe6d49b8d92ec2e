#!/usr/bin/env bash
# Set up (if needed) and run every check: generated code, lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
export PATH="$PWD/.venv/bin:$PATH"

echo "== generated code"; python scripts/gen_protos.py --check
echo "== ruff";  ruff check .
echo "== mypy";  mypy memosd clients/python/memos scripts
echo "== pytest"
set +e
pytest "$@"
code=$?
set -e
if [[ $code == 5 ]]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $code
