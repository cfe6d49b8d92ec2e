#!/usr/bin/env bash
# Set up (if needed) and run every check: generated code, lint, types, tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
scripts/install_etcd.sh  # the cluster tests run a real etcd cluster
export PATH="$PWD/.venv/bin:$PATH"

echo "== generated code"; python scripts/gen_protos.py --check
echo "== ruff";  ruff check .
echo "== mypy";  mypy memosd clients/python/memosd_client clients/python/memos scripts
echo "== pytest"
# Shuffled (pytest-randomly) but reproducible: a fixed seed unless MEMOSD_TEST_SEED names another, so a
# failure that depends on the order reruns with the same order. Arguments that choose the seed or turn
# the plugin off (-p no:randomly) win.
order=(--randomly-seed="${MEMOSD_TEST_SEED:-20261202}")
for arg in "$@"; do
  [[ $arg == --randomly-seed* || $arg == no:randomly || $arg == -pno:randomly ]] && order=()
done
# The slowest tests are printed at the end of every run: the suite's budget is ~20 minutes on 2 cores.
set +e
pytest --durations=30 "${order[@]}" "$@"
code=$?
set -e
if [[ $code == 5 ]]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit $code
